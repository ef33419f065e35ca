"""Neural Head Avatars against NeRFace on this machine.

    .venv/bin/python bench/nha_bench.py steps                  # -> bench/results/nha_steps.json
    .venv/bin/python bench/nha_bench.py compare [--figures-only] [CLIP ...]  # -> bench/results/nha_compare.json

`steps`: seconds per training step of each phase (geometry, texture, joint) of the `fast` preset at 256 px
and of the `paper` preset at 512 px (its batch sizes 16 / 2 / 2), on lp_d18 tracked with ICT FaceKit,
with this CPU's matrix-product throughput beside them.

`compare`: the whole pipeline (`avatar-pipeline workflow`) on clips of ../shared/data/videos at 256 px
(last 20% of frames held out), tracked with ICT FaceKit; one `nha` fast and one `nerface` fast avatar per
clip, each given the same training time (COMPARE_MINUTES as max_minutes, with step counts the budget cuts
short), one after the other on the same machine. Test metrics inside the head mask (NHA renders no torso)
and over the full frame, the sharpness figures (CPBD, and the render's gradient energy over the real
frame's inside the head mask), and the held-out frame's PSNR over training time. Clips are run one
invocation at a time if need be; figures accumulate in the results file. lp_d18 and dt_W009 tuned the
`fast` presets; dt_M030 and vr_face2 are reported apart as the untuned check.
"""

from __future__ import annotations

import datetime
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from avatar_pipeline import cache  # noqa: E402
from avatar_pipeline.avatars import find, trainer  # noqa: E402
from avatar_pipeline.avatars.data import SubjectFrames  # noqa: E402
from avatar_pipeline.errors import CacheError  # noqa: E402
from avatar_pipeline.runtime import cpu_info, matmul_gflops  # noqa: E402
from bench.nerface_bench import _read, _write, bench_config, head_commit, run_workflow, training_curve  # noqa: E402

COMPARE_MINUTES = 16.0  # the nha fast schedule's length here; NeRFace fast is cut to it
TUNED = ("lp_d18", "dt_W009_front_happy_level3_001")
CLIPS = (
    "lp_d18.mp4",
    "dt_W009_front_happy_level3_001.mp4",
    "dt_M030_front_neutral_level1_001.mp4",
    "vr_face2.mp4",
)
KEYS = ("psnr", "ssim", "ms_ssim", "l1", "lpips", "cpbd", "cpbd_truth", "gradient_energy")
# step counts the time budget cuts short, so both train for the same minutes; no orbit or sweep videos (no
# metric reads them; NeRFace renders a 256 px frame in about 15 s here, so they would add 10 minutes a clip)
SHORT_RENDERS = {"validate_every": 250, "orbit_frames": 0, "sweep_frames": 0}
AVATARS = {
    "nha_fast": {"method": "nha", "preset": "fast", "steps": 20000, **SHORT_RENDERS},
    "nerface_fast": {"method": "nerface", "preset": "fast", "steps": 20000, **SHORT_RENDERS},
}


def steps_bench(method: str = "nha", presets=(("fast", 256, 6), ("paper", 512, 2)), command: str = "") -> None:
    """Seconds per step of each phase of a method at each preset, on the tracked lp_d18 of a compare run;
    written to bench/results/<method>_steps.json."""
    spec = find(method)
    store = cache.SubjectCache(REPO / "bench" / "work" / "results", "lp_d18")
    compare_bench(["lp_d18.mp4"], tracking_only=True)  # (nothing runs when the caches are there)
    figures = {
        "command": command or f"bench/{method}_bench.py steps",
        "cpu": cpu_info(),
        "matmul_gflops_fp32": round(matmul_gflops(torch.float32), 1),
        "commit": head_commit(),
        "step_seconds": {},
    }
    for preset, size, repeats in presets:
        cfg = spec.config_from({"preset": preset, "size": size})
        frames = SubjectFrames(store, size, "train", **spec.model_class().training_data(cfg))
        torch.manual_seed(0)
        model = trainer.build_model(spec, cfg, frames, torch.device("cpu"))
        rng = np.random.default_rng(0)
        for phase in model.phases():
            times = []
            for _ in range(repeats + 1):  # the first step warms up
                start = time.perf_counter()
                terms, _ = model.training_step(phase, rng)
                phase.optimizer.zero_grad()
                sum(terms.values()).backward()
                phase.optimizer.step()
                times.append(time.perf_counter() - start)
            figures["step_seconds"][f"{preset}/{size}px/{phase.name}"] = round(min(times[1:]), 3)
            print(preset, phase.name, figures["step_seconds"][f"{preset}/{size}px/{phase.name}"], flush=True)
        figures[f"{preset}_planned_minutes"] = round(
            sum(figures["step_seconds"][f"{preset}/{size}px/{p.name}"] * p.steps for p in model.phases()) / 60,
            1,
        )
    _write(f"{method}_steps.json", figures)


def compare_arguments() -> dict:
    """compare_bench's clips (all four when the command line names none) and figures_only (--figures-only)."""
    clips = [a for a in sys.argv[2:] if not a.startswith("--")] or list(CLIPS)
    return {"clips": clips, "figures_only": "--figures-only" in sys.argv[2:]}


def compare_bench(
    clips: list[str],
    tracking_only: bool = False,
    methods: dict[str, dict] = AVATARS,
    results: str = "nha_compare.json",
    command: str = "bench/nha_bench.py compare CLIP ...",
    figures_only: bool = False,
) -> None:
    """The whole pipeline on `clips` with one avatar per entry of `methods`, each trained COMPARE_MINUTES,
    one after the other; figures accumulate in bench/results/`results`. `figures_only`: nothing runs, the
    figures of what is trained and evaluated so far are gathered (after a run stopped part way)."""
    names = [Path(c).stem for c in clips]
    avatars = {name: {**avatar, "max_minutes": COMPARE_MINUTES} for name, avatar in methods.items()}
    config_path, config = bench_config(clips, avatars)
    if tracking_only:  # the caches an NHA avatar reads, nothing trained
        needs = find("nha").needs
        run_workflow(config_path, [str(Path(config["results_dir"]) / n / stage) for n in names for stage in needs])
        return
    start = time.perf_counter()
    # the evaluations named as targets: with reruns decided by inputs only, Snakemake does not look past an
    # existing report for an avatar whose folder was removed to retrain it
    results_dir = Path(config["results_dir"])
    evaluations = [str(results_dir / n / "avatars" / a / "eval") for n in names for a in methods]
    exit_code = None if figures_only else run_workflow(config_path, [*evaluations, str(results_dir / "index.html")])
    figures = _read(results, {"clips": {}})
    figures.update(
        {
            "command": command,
            "minutes_each": COMPARE_MINUTES,
            "tuned_on": list(TUNED),
            "settings": {k: v for k, v in config.items() if k not in ("subjects", "results_dir", "avatars")},
        }
    )
    figures.setdefault("runs", []).append(
        {
            "clips": clips,
            "avatars": avatars,
            "wall_seconds": round(time.perf_counter() - start, 1),
            "figures_only": figures_only,
            "exit_code": exit_code,
            "cpu": cpu_info(),
            "matmul_gflops_fp32": round(matmul_gflops(torch.float32), 1),
            "commit": head_commit(),
        }
    )
    work = config_path.parent
    for name in names:
        entry = {"tuned": name in TUNED}
        for avatar in methods:
            folder = work / "results" / name / "avatars" / avatar
            try:
                curve = training_curve(folder / "train")
            except (OSError, CacheError) as e:  # not trained (the run failed or was stopped first)
                entry[avatar] = {"error": str(e)}
                continue
            metrics = cache.read_optional_json(folder / "eval" / cache.METRICS_FILE)
            if metrics is None:
                entry[avatar] = {**curve, "test": "not evaluated"}
                continue
            headline = metrics["protocols"][metrics["headline_protocol"]]
            entry[avatar] = {
                **curve,
                "protocol": metrics["headline_protocol"],
                "test_frames": len(metrics["test_frames"]),
                "head": {k: round(headline[f"head_{k}"], 4) for k in KEYS if f"head_{k}" in headline},
                "full_frame": {k: round(headline[k], 4) for k in KEYS if k in headline},
                "background_only_psnr": round(headline["psnr_background_only"], 2),
                "evaluation_minutes": evaluation_minutes(folder.parents[1] / "logs" / f"avatar_eval_{avatar}.log"),
                "all_protocols": {
                    p: {k: round(v[k], 4) for k in ("psnr", "head_psnr", "head_l1") if k in v}
                    for p, v in metrics["protocols"].items()
                },
            }
        figures["clips"][name] = entry
    _write(results, figures)


def evaluation_minutes(log_path: Path) -> float | None:
    """Minutes of an evaluation job from its log: from the first timestamped line (written once the trained
    avatar is loaded, a few seconds in) to the log's last write; None without a timestamped line."""
    stamps = re.findall(r"^(\d\d):(\d\d):(\d\d) ", log_path.read_text(), re.MULTILINE) if log_path.exists() else []
    if not stamps:
        return None
    h, m, s = (int(v) for v in stamps[0])
    end = datetime.datetime.fromtimestamp(log_path.stat().st_mtime)
    start = end.replace(hour=h, minute=m, second=s, microsecond=0)
    if start > end:  # the job ran over midnight
        start -= datetime.timedelta(days=1)
    return round((end - start).total_seconds() / 60, 1)


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else "steps"
    if what == "steps":
        steps_bench()
    else:
        compare_bench(**compare_arguments())

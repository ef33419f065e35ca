"""NeRFace speed and quality on this machine.

    .venv/bin/python bench/nerface_bench.py steps                 # -> bench/results/nerface_steps.json
    .venv/bin/python bench/nerface_bench.py quality [CLIP ...]    # -> bench/results/nerface_quality.json
    .venv/bin/python bench/nerface_bench.py collect CLIP ...      # figures of a stopped run so far
    .venv/bin/python bench/nerface_bench.py paper [CLIP]          # -> bench/results/nerface_paper_curve.json

`steps`: seconds per training step of the `paper` preset (2048 rays, 64 + 64 samples, 8x256 + 4x128
networks: the reference takes 6.5 s here) in fp32 and bf16, and of the `fast` preset; plus this CPU's
measured fp32/bf16 matrix-product throughput, since step times scale with it.

`quality`: the whole pipeline (`avatar-pipeline workflow`) on real clips from ../shared/data/videos at
256 px (last 20% of frames held out), tracked with ICT FaceKit from ../shared/models, one `nerface-fast`
avatar per clip trained for at most 30 minutes (max_minutes), then PSNR / SSIM / L1 on the held-out
frames for both test-latent protocols, and the wall time at which the held-out validation frame first
reached given PSNRs. The first clip's avatar is reenacted by the second clip.

`paper`: the `nerface-paper` preset trained on one clip (dt_M030 unless named) at the same 256 px for
PAPER_MINUTES, training only (its 400k steps would take weeks here): the held-out frame's PSNR over time,
beside the `fast` preset's curve on that clip from nerface_quality.json, so both presets have a
time-to-PSNR measured the same way.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED = REPO.parent / "shared"
ICT_ARCHIVE = SHARED / "models" / "ict-facekit-da5f95a.tar.xz"  # the ICT FaceKit release ../shared holds
RESULTS = REPO / "bench" / "results"

from avatar_pipeline import cache  # noqa: E402
from avatar_pipeline.avatars import find  # noqa: E402
from avatar_pipeline.avatars.nerface.field import NeRFaceRenderer  # noqa: E402
from avatar_pipeline.runtime import cpu_info, matmul_gflops  # noqa: E402

THRESHOLDS = (24.0, 26.0, 27.0, 28.0, 29.0)
PAPER_MINUTES = 60.0


def step_seconds(preset: str, precision: str, repeats: int, expression_dim: int = 53) -> float:
    cfg = find("nerface").config_from({"preset": preset, "precision": precision})
    torch.manual_seed(0)
    renderer = NeRFaceRenderer(  # `auto` resolved as training resolves it (the renderer takes fp32 or bf16)
        cfg.field(expression_dim),
        cfg.coarse_samples,
        cfg.fine_samples,
        cfg.resolved_precision(torch.device("cpu")),
        cfg.chunk_samples,
    )
    optimizer = torch.optim.Adam(renderer.parameters(), lr=cfg.learning_rate)
    rays = cfg.rays
    origins = torch.zeros(rays, 3)
    origins[:, 2] = 1.0
    directions = torch.nn.functional.normalize(torch.randn(rays, 3) * 0.1 + torch.tensor([0.0, 0.0, -1.0]), dim=-1)
    near, far = torch.full((rays,), 0.65), torch.full((rays,), 1.35)
    condition, background, target = (
        torch.randn(expression_dim + cfg.latent_dim),
        torch.rand(rays, 3),
        torch.rand(rays, 3),
    )
    times = []
    for _ in range(repeats + 1):  # the first step warms up
        start = time.perf_counter()
        out = renderer(origins, directions, near, far, condition, background)
        loss = ((out["coarse"] - target) ** 2).mean() + ((out["fine"] - target) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return min(times[1:])


def head_commit() -> str:
    """The short commit the figures were measured with."""
    return subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()


def steps_bench() -> None:
    """Step times of this machine, added to those of machines measured before (keyed by CPU model)."""
    cpu = cpu_info()
    figures = {
        "native_bf16": cpu["native_bf16"],
        "threads": torch.get_num_threads(),
        "commit": head_commit(),
        "matmul_gflops": {"fp32": round(matmul_gflops(torch.float32), 1)},
        "step_seconds": {},
    }
    runs = [("paper", "fp32", 2), ("fast", "fp32", 10)]
    if cpu["native_bf16"]:  # emulated bf16 is slower than fp32: not worth timing
        figures["matmul_gflops"]["bf16"] = round(matmul_gflops(torch.bfloat16), 1)
        runs += [("paper", "bf16", 3), ("fast", "bf16", 10)]
    for preset, precision, repeats in runs:
        figures["step_seconds"][f"{preset}/{precision}"] = round(step_seconds(preset, precision, repeats), 3)
        print(preset, precision, figures["step_seconds"][f"{preset}/{precision}"], flush=True)
    results = _read("nerface_steps.json", {"machines": {}})
    results.update({"command": "bench/nerface_bench.py steps", "reference_paper_step_seconds": 6.5})
    # CPUs of one model name differ in their vector units (an EPYC with and one without AVX512-BF16 here)
    results["machines"][cpu["model"] + (" with native bf16" if cpu["native_bf16"] else "")] = figures
    _write("nerface_steps.json", results)


def bench_config(clips: list[str], avatars: dict) -> tuple[Path, dict]:
    """Path and contents of a benchmark run's pipeline config, written to bench/work (preprocessing and tracking
    are shared by all runs)."""
    work = REPO / "bench" / "work"
    work.mkdir(parents=True, exist_ok=True)
    config = {
        "results_dir": str(work / "results"),
        "subjects": {Path(c).stem: {"video": str(SHARED / "data" / "videos" / c)} for c in clips},
        "crop": {"size": 256},
        "model": {"kind": "ict", "ict_path": str(ICT_ARCHIVE)},
        "avatars": avatars,
    }
    config_path = work / "config.yaml"
    config_path.write_text(json.dumps(config, indent=1))
    return config_path, config


def run_workflow(config_path: Path, targets: list[str]) -> int:
    # reruns are decided by inputs only: an avatar already trained with these settings is not retrained
    # because unrelated code changed (its evaluation reruns if it did not finish); the targets go first, as
    # --rerun-triggers takes every word after it
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "avatar_pipeline",
            "workflow",
            "--config",
            str(config_path),
            "--cores",
            "2",
            "--",
            *targets,
            "--rerun-triggers",
            "mtime",
            "input",
        ],
        cwd=REPO,
    ).returncode


def training_curve(train_dir: Path) -> dict:
    """Steps, time per step and the held-out frame's PSNR over time of a finished training run."""
    done = cache.read_json(train_dir / cache.DONE_FILE, "avatar_train")
    rows = cache.read_training_log(train_dir / "log.csv")
    curves = {}
    for column in ("val_psnr", "val_head_psnr"):  # the head-mask column since log.csv has it
        points = [(float(r["seconds"]), float(r[column])) for r in rows if (r.get(column) or "").strip()]
        curves[column] = (
            [[round(s / 60, 1), p] for s, p in points],
            {f"{t:g}": next((round(s / 60, 1) for s, p in points if p >= t), None) for t in THRESHOLDS},
        )
    return {
        "train_minutes": round(done["seconds"] / 60, 1),
        "steps": done["steps"],
        "seconds_per_step": round(done["seconds"] / max(1, done["steps"]), 2),
        "train_frames": done["frames"],
        "precision": done["precision"],
        "cpu": done.get("cpu", "not recorded"),
        "validation_frame_psnr": curves["val_psnr"][0],
        "validation_frame_minutes_to_psnr": curves["val_psnr"][1],
        "validation_frame_head_psnr": curves["val_head_psnr"][0],
        "validation_frame_minutes_to_head_psnr": curves["val_head_psnr"][1],
    }


def quality_bench(clips: list[str]) -> None:
    names = [Path(c).stem for c in clips]
    avatar = {"method": "nerface", "preset": "fast", "max_minutes": 30.0}
    if len(names) > 1:
        avatar["reenact_from"] = names[1]
    config_path, config = bench_config(clips, {"nerface_fast": avatar})
    start = time.perf_counter()
    exit_code = run_workflow(config_path, [])
    # results of earlier invocations (other clips) are kept: clips can be benchmarked one run at a time
    figures = _read("nerface_quality.json", {"clips": {}})
    figures.update(
        {
            "command": "bench/nerface_bench.py quality CLIP ...",
            "preset": avatar,
            "settings": {k: v for k, v in config.items() if k not in ("subjects", "results_dir")},
        }
    )
    figures.setdefault("runs", []).append(
        {
            "clips": clips,
            "wall_seconds": round(time.perf_counter() - start, 1),
            "exit_code": exit_code,
            "cpu": cpu_info(),
            "commit": head_commit(),
        }
    )
    collect(figures, config_path.parent, names)


def paper_curve_bench(clip: str) -> None:
    name = Path(clip).stem
    avatar = {
        "method": "nerface",
        "preset": "paper",
        "size": 256,
        "max_minutes": PAPER_MINUTES,
        "validate_every": 150,
        "checkpoint_every": 150,
    }
    config_path, _ = bench_config([clip], {"nerface_paper": avatar})
    train_dir = config_path.parent / "results" / name / "avatars" / "nerface_paper" / "train"
    start = time.perf_counter()
    exit_code = run_workflow(config_path, [str(train_dir / "done.json")])
    figures = {
        "command": f"bench/nerface_bench.py paper {clip}",
        "clip": name,
        "preset": avatar,
        "wall_seconds": round(time.perf_counter() - start, 1),
        "exit_code": exit_code,
        "cpu": cpu_info(),
        "commit": head_commit(),
    }
    try:
        figures["paper"] = training_curve(train_dir)
    except OSError as e:
        figures["paper"] = {"error": str(e)}
    fast = _read("nerface_quality.json", {"clips": {}})["clips"].get(name)
    figures["fast_same_clip"] = (
        {k: fast[k] for k in ("train_minutes", "steps", "validation_frame_psnr", "validation_frame_minutes_to_psnr")}
        if fast
        else "not measured"
    )
    _write("nerface_paper_curve.json", figures)


def collect(figures: dict, work: Path, names: list[str]) -> None:
    """Training and test figures of every named clip (training only when its evaluation has not run)."""
    keys = (
        "psnr",
        "ssim",
        "ms_ssim",
        "l1",
        "lpips",
        "cpbd",
        "cpbd_truth",
        "head_psnr",
        "head_ssim",
        "head_l1",
        "psnr_background_only",
    )
    for name in names:
        folder = work / "results" / name / "avatars" / "nerface_fast"
        try:
            entry = training_curve(folder / "train")
        except OSError as e:
            figures["clips"][name] = {"error": str(e)}
            continue
        tracking_meta = work / "results" / name / "tracking" / "meta.json"
        if tracking_meta.exists():  # avatars of the same clip differ with the landmark set tracked
            entry["tracking_fit_points"] = json.loads(tracking_meta.read_text()).get("fit_points")
        metrics = cache.read_optional_json(folder / "eval" / cache.METRICS_FILE)
        if metrics is not None:
            entry.update(
                {
                    "test_frames": len(metrics["test_frames"]),
                    "size": metrics["size"],
                    "test": {p: {k: round(v[k], 4) for k in keys if k in v} for p, v in metrics["protocols"].items()},
                    "lpips": "computed" if metrics["lpips_available"] else metrics["lpips"],
                }
            )
        else:
            entry["test"] = "not evaluated yet"
        figures["clips"][name] = entry
    _write("nerface_quality.json", figures)


def _read(name: str, default: dict) -> dict:
    """Figures written before (by other machines or clips), which a run adds to."""
    path = RESULTS / name
    return json.loads(path.read_text()) if path.exists() else default


def _write(name: str, figures: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / name).write_text(json.dumps(figures, indent=1) + "\n")
    print(json.dumps(figures, indent=1))


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else "steps"
    if what == "steps":
        steps_bench()
    elif what == "paper":
        paper_curve_bench(sys.argv[2] if len(sys.argv) > 2 else "dt_M030_front_neutral_level1_001.mp4")
    elif what == "collect":  # figures of what has run in bench/work (a stopped run, or re-read with new keys)
        figures = _read("nerface_quality.json", {"clips": {}})
        config = json.loads((REPO / "bench" / "work" / "config.yaml").read_text())
        figures.update(
            {
                "command": "bench/nerface_bench.py quality CLIP ..., figures (re-)read by collect CLIP ...",
                "preset": config["avatars"].get("nerface_fast", figures.get("preset")),
                "settings": {k: v for k, v in config.items() if k not in ("subjects", "results_dir")},
            }
        )
        collect(figures, REPO / "bench" / "work", [Path(c).stem for c in sys.argv[2:]])
    else:
        quality_bench(sys.argv[2:] or ["lp_d18.mp4", "dt_W009_front_happy_level3_001.mp4"])

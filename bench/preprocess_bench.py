"""Preprocessing speed and memory on a real clip at 512 px.

    .venv/bin/python bench/preprocess_bench.py [--clip ../shared/data/videos/lp_d18.mp4] [--size 512]

Each stage runs in its own process (so its peak memory is its own) on the clip and on the same clip
looped 3x; frames/s per stage, for crop + landmarks + parsing + normals together, and the peak RSS of
every stage at both lengths are written to bench/results/preprocess.json (memory that does not grow
with clip length shows as equal peaks).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

STAGES = ["crop", "landmarks", "parsing", "background", "normals", "qa"]
CORE = ["crop", "landmarks", "parsing", "normals"]


def run_stage(stage: str, results: Path, subject: str, video: Path, size: int) -> dict:
    settings = json.dumps({"size": size} if stage == "crop" else {})
    cmd = [
        sys.executable,
        "-m",
        "avatar_pipeline",
        stage,
        "--results",
        str(results),
        "--subject",
        subject,
        "--settings",
        settings,
    ]
    if stage == "crop":
        cmd += ["--video", str(video)]
    code = (
        "import resource, subprocess, sys, time; t = time.perf_counter(); "
        "rc = subprocess.call(sys.argv[1:], stderr=subprocess.DEVNULL); "
        "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, rc)"
    )
    out = subprocess.run([sys.executable, "-c", code, *cmd], capture_output=True, text=True, check=True).stdout.split()
    seconds, peak_kib, rc = float(out[0]), int(out[1]), int(out[2])
    if rc != 0:
        raise RuntimeError(f"stage {stage} failed: {' '.join(cmd)}")
    return {"seconds": round(seconds, 3), "peak_rss_mib": round(peak_kib / 1024, 1)}


def bench_clip(video: Path, work: Path, subject: str, size: int) -> dict:
    from avatar_pipeline import cache

    stages = {s: run_stage(s, work, subject, video, size) for s in STAGES}
    n = cache.SubjectCache(work, subject).num_frames()
    for s in stages.values():
        s["frames_per_s"] = round(n / s["seconds"], 2)
    core_seconds = sum(stages[s]["seconds"] for s in CORE)
    return {
        "frames": n,
        "stages": stages,
        "core_stages": CORE,
        "core_frames_per_s": round(n / core_seconds, 2),
        "all_frames_per_s": round(n / sum(s["seconds"] for s in stages.values()), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clip", default=str(REPO.parent / "shared/data/videos/lp_d18.mp4"))
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--work", default="/tmp/avatar-pipeline-bench")
    parser.add_argument("--out", default=str(REPO / "bench/results/preprocess.json"))
    args = parser.parse_args()
    clip = Path(args.clip)
    if not clip.exists():
        sys.exit(f"{clip} not found: pass --clip with a real talking-head clip")
    work = Path(args.work)
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    from avatar_pipeline.video import ffmpeg_tools

    looped = work / "looped3x.mp4"
    subprocess.run(
        [
            ffmpeg_tools().ffmpeg,
            "-loglevel",
            "error",
            "-y",
            "-stream_loop",
            "2",
            "-i",
            str(clip),
            "-c",
            "copy",
            str(looped),
        ],
        check=True,
    )
    report = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": {
            "cpu_count": __import__("os").cpu_count(),
            "platform": platform.platform(),
            "processor": platform.processor(),
        },
        "size": args.size,
        "clip": clip.name,
        "target": "crop + landmarks + parsing + normals >= 15 frames/s at 512 px on 2 cores; "
        "memory flat in clip length",
        "clip_1x": bench_clip(clip, work, "x1", args.size),
        "clip_3x": bench_clip(looped, work, "x3", args.size),
    }
    peaks = {
        s: (report["clip_1x"]["stages"][s]["peak_rss_mib"], report["clip_3x"]["stages"][s]["peak_rss_mib"])
        for s in STAGES
    }
    report["peak_rss_growth_3x_mib"] = {s: round(b - a, 1) for s, (a, b) in peaks.items()}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: report[k] for k in ("size", "peak_rss_growth_3x_mib")}, indent=1))
    for key in ("clip_1x", "clip_3x"):
        r = report[key]
        print(
            f"{key}: {r['frames']} frames; core {r['core_frames_per_s']} frames/s; "
            f"all {r['all_frames_per_s']} frames/s; "
            + ", ".join(f"{s} {v['frames_per_s']}/s {v['peak_rss_mib']} MiB" for s, v in r["stages"].items())
        )


if __name__ == "__main__":
    main()

"""Preprocessing and tracking speed and memory on a real clip at 512 px.

    .venv/bin/python bench/preprocess_bench.py [stages] [--clip ../shared/data/videos/lp_d18.mp4] [--size 512]
    .venv/bin/python bench/preprocess_bench.py pipeline [--clip ...] [--size 512]

`stages` (-> bench/results/preprocess.json): each stage runs in its own process (so its peak memory is its
own) on the clip and on the same clip looped 3x; frames/s per stage, for crop + landmarks + parsing + normals
together, and the peak RSS of every stage at both lengths (memory that does not grow with clip length shows
as equal peaks).

`pipeline` (-> bench/results/preprocess_pipeline.json): the whole workflow as a user runs it (Snakemake on
2 cores, default settings but the size: crop, landmarks, parsing, background, normals, QA and ICT tracking)
on the clip (lp_d18: 216 frames), on it looped 3x (648) and on the first 1500 frames of it looped 7x: wall
time from the command to the last stage, and the peak RSS of the largest process. ICT FaceKit is converted
once beforehand, outside the timing (it is shared by every subject of a results folder).
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
    return measured(cmd, f"stage {stage}")


def measured(cmd: list[str], what: str, log: Path | None = None) -> dict:
    """Wall seconds of `cmd` and the peak RSS of the largest process it started (its own or a descendant's)."""
    code = (
        "import resource, subprocess, sys, time; t = time.perf_counter(); "
        "log = open(sys.argv[1], 'w') if sys.argv[1] else subprocess.DEVNULL; "
        "rc = subprocess.call(sys.argv[2:], stdout=log, stderr=log); "
        "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, rc)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(log or ""), *cmd], capture_output=True, text=True, check=True
    ).stdout.split()
    seconds, peak_kib, rc = float(out[0]), int(out[1]), int(out[2])
    if rc != 0:
        raise RuntimeError(f"{what} failed: {' '.join(cmd)}" + (f" (log: {log})" if log else ""))
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


PIPELINE_FRAMES = (216, 648, 1500)


def loop_clip(clip: Path, times: int, out: Path) -> Path:
    """`clip` played `times` times in a row (stream copy, no re-encoding)."""
    from avatar_pipeline.video import ffmpeg_tools

    loop = [ffmpeg_tools().ffmpeg, "-loglevel", "error", "-y", "-stream_loop", str(times - 1), "-i", str(clip)]
    subprocess.run([*loop, "-c", "copy", str(out)], check=True)
    return out


def stages_report(clip: Path, work: Path, size: int) -> dict:
    report = {
        "target": "crop + landmarks + parsing + normals >= 15 frames/s at 512 px on 2 cores; "
        "memory flat in clip length",
        "clip_1x": bench_clip(clip, work, "x1", size),
        "clip_3x": bench_clip(loop_clip(clip, 3, work / "looped3x.mp4"), work, "x3", size),
    }
    peaks = {
        s: (report["clip_1x"]["stages"][s]["peak_rss_mib"], report["clip_3x"]["stages"][s]["peak_rss_mib"])
        for s in STAGES
    }
    report["peak_rss_growth_3x_mib"] = {s: round(b - a, 1) for s, (a, b) in peaks.items()}
    for key in ("clip_1x", "clip_3x"):
        r = report[key]
        print(
            f"{key}: {r['frames']} frames; core {r['core_frames_per_s']} frames/s; "
            f"all {r['all_frames_per_s']} frames/s; "
            + ", ".join(f"{s} {v['frames_per_s']}/s {v['peak_rss_mib']} MiB" for s, v in r["stages"].items())
        )
    return report


def pipeline_report(clip: Path, work: Path, size: int, lengths: tuple[int, ...] = PIPELINE_FRAMES) -> dict:
    import yaml

    from avatar_pipeline.video import probe
    from bench.nerface_bench import ICT_ARCHIVE

    clip_frames = probe(clip).expected_frames
    config = {"results_dir": str(work / "results"), "model": {"kind": "ict", "ict_path": str(ICT_ARCHIVE)}}
    runs = {}
    for frames in lengths:
        name, loops = f"f{frames}", -(-frames // clip_frames)
        video = clip if loops == 1 else loop_clip(clip, loops, work / f"looped{loops}x.mp4")
        config_path = work / f"{name}.yaml"
        subject = {"subjects": {name: {"video": str(video)}}, "crop": {"size": size, "max_frames": frames}}
        config_path.write_text(yaml.safe_dump({**config, **subject}))

        def workflow(*targets: str, path: Path = config_path) -> list[str]:
            command = [sys.executable, "-m", "avatar_pipeline", "workflow", "--config", str(path), "--cores", "2"]
            return [*command, "--", *targets]

        if not (work / "results" / "_models" / "ict.json").exists():  # once, untimed
            measured(workflow(str(work / "results" / "_models" / "ict.json")), "ICT conversion")
        targets = [str(work / "results" / name / stage) for stage in ("qa", "tracking")]
        runs[name] = {"frames": frames, **measured(workflow(*targets), name, log=work / f"{name}.log")}
        tracking = json.loads((work / "results" / name / "tracking" / "meta.json").read_text())
        runs[name]["tracking_fit_seconds"] = tracking["seconds"]
        runs[name]["frames_per_s"] = round(frames / runs[name]["seconds"], 2)
        print(name, runs[name], flush=True)
    return {
        "target": "1500 frames through every preprocessing stage and tracking in at most "
        "120 s on 2 cores, memory flat in clip length",
        "runs": runs,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", nargs="?", choices=("stages", "pipeline"), default="stages")
    parser.add_argument("--clip", default=str(REPO.parent / "shared/data/videos/lp_d18.mp4"))
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--work", default="/tmp/avatar-pipeline-bench")
    parser.add_argument("--frames", type=int, nargs="+", default=list(PIPELINE_FRAMES), help="pipeline: clip lengths")
    args = parser.parse_args()
    clip = Path(args.clip)
    if not clip.exists():
        sys.exit(f"{clip} not found: pass --clip with a real talking-head clip")
    work = Path(args.work)
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    from avatar_pipeline.runtime import cpu_info, matmul_gflops
    from bench.nerface_bench import head_commit

    report = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": {
            "cpu_count": __import__("os").cpu_count(),
            "platform": platform.platform(),
            "cpu": cpu_info(),
            "matmul_gflops_fp32": round(matmul_gflops(), 1),
        },
        "commit": head_commit(),
        "size": args.size,
        "clip": clip.name,
    }
    if args.mode == "stages":
        report.update(stages_report(clip, work, args.size))
        out = REPO / "bench/results/preprocess.json"
    else:
        report.update(pipeline_report(clip, work, args.size, tuple(args.frames)))
        out = REPO / "bench/results/preprocess_pipeline.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()

"""Rendering speed of trained NeRFace and LDF avatars with and without empty-space skipping and adaptive sampling.

    .venv/bin/python bench/render_bench.py [--results=NAME.json] [CLIP ...]     # -> bench/results/render_speed.json
    .venv/bin/python bench/render_bench.py evaluation [--results=NAME.json] [CLIP ...]     # -> its "evaluation" entry
    .venv/bin/python bench/render_bench.py sparse [--render-only] [CLIP ...]   # -> bench/results/nerface_sparse.json

Reads the `cmp_nerface` avatars that the all-method comparison (`bench/gaussians_bench.py compare CLIP` or
`bench/ldf_bench.py compare CLIP`) trained into bench/work (run that first). Per clip: the occupancy grid's
build time and share of occupied cells; seconds per frame of a held-out frame at 128, 256 and 512 px rendered
as before (every sample computed), with early ray termination alone, with the occupancy grid alone, and with
both (`after`), with adaptive sampling in image space and early termination (`adaptive`), with the pixels
traced inside a block placing their samples from its corners' weights as well (`proposals`, the fast preset's
rendering) and with the grid on top of that (`adaptive_grid`), and the samples per pixel each computes at the
training size; and, over every FRAME_STRIDE-th held-out frame at the training size, the PSNR of the `before`,
`after`, `adaptive` and `proposals` renders against the real frame (the `first_train_frame` protocol, so no
test-time fitting enters) and of the others against `before`; the same for Local Deformation Fields' `cmp_ldf` (every
pixel traced, adaptive sampling, and with proposals; a clip whose `cmp_ldf` is not trained is skipped). Every
avatar is also rendered at each size by the code of ISSUE_COMMIT, the commit before the first change of issue
22 (`issue_commit`; bench/render_at_commit.py in a temporary git worktree), and the adaptive renders' speed-ups
over it are recorded beside the ones over `before` (today's code tracing every pixel, which got faster too).
Each model renders once before any timing (oneDNN builds its bf16 kernels per shape in a process's first
renders). `evaluation`: per clip, the minutes of the evaluation stage of both compare-run avatars with the
compare run's settings and the presets' rendering now, beside the minutes their own evaluation logs show.
This CPU's matrix-product throughput is recorded beside the figures. --results: another file in bench/results
(render_speed.json holds one machine's run: another machine's goes to a file of its own).

`sparse` (lp_d18 and dt_W009 unless clips are named): `cmp_nerface` beside `cmp_nerface_sparse`, the same
avatar trained with the mask term and the training grid, and `cmp_nerface_opaque`, with the mask term and the
distortion loss, each for the compare run's minutes (an existing
`cmp_nerface` is reused), their test metrics and evaluation minutes, and the figures above for both, with a
looser grid (`after_loose`) and the fine field alone marched through the grid (`after_marched_N`, N evenly
spaced samples a ray) beside the default one; --render-only renders the avatars already trained.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from avatar_pipeline import cache  # noqa: E402
from avatar_pipeline.avatars import find  # noqa: E402
from avatar_pipeline.avatars.data import SubjectFrames  # noqa: E402
from avatar_pipeline.avatars.evaluation import evaluate  # noqa: E402
from avatar_pipeline.avatars.trainer import load_trained  # noqa: E402
from avatar_pipeline.metrics import psnr  # noqa: E402
from avatar_pipeline.runtime import cpu_info, matmul_gflops  # noqa: E402
from bench.ldf_bench import AVATARS  # noqa: E402
from bench.nerface_bench import _read, _write, head_commit  # noqa: E402
from bench.nha_bench import CLIPS, COMPARE_MINUTES, TUNED, compare_bench  # noqa: E402

AVATAR = "cmp_nerface"
# the NeRFace avatars this benchmark renders: the compare run's, and (`sparse`) NeRFace fast trained to leave
# empty space empty, so that the grid finds cells to skip: the foreground alpha pulled to the parsing's person
# matte (mask term; RGB alone leaves fog of the background's colour in front of the plate) and the training
# grid skipping empty samples while it trains; it renders with the grid
NERFACE_AVATARS = {
    AVATAR: AVATARS[AVATAR],
    "cmp_nerface_sparse": {**AVATARS[AVATAR], "mask_weight": 0.1, "train_occupancy_cells": 64, "occupancy_cells": 64},
    # the mask term and Mip-NeRF 360's distortion loss (its weight, 0.01), which pulls each ray's weight into one
    # short stretch: opaque surfaces and empty space, which the render grid and early termination skip
    "cmp_nerface_opaque": {**AVATARS[AVATAR], "mask_weight": 0.1, "distortion_weight": 0.01, "occupancy_cells": 64},
}
SPARSE_RESULTS = "nerface_sparse.json"
SPEED_RESULTS = "render_speed.json"
WORK_RESULTS = REPO / "bench" / "work" / "results"
TUNED_CLIPS = [c for c in CLIPS if Path(c).stem in TUNED]

SIZES = (128, 256, 512)
# the code as it was when issue 22 (rendering 10x faster at 256 px) was filed: the commit before its first change
# (9e3bd71). Each avatar is also rendered by that code (bench/render_at_commit.py, from a temporary worktree), so
# the speed-ups of the dense path since then count as well
ISSUE_COMMIT = "f4393d7"
FRAME_STRIDE = 4
# proposal_samples and proposal_empty_below as chosen on the tuning clips (the `lean` rendering below; not the
# fast preset's: the untuned clips lost up to 0.11 dB more to it)
LEAN_SAMPLES, LEAN_EMPTY_BELOW = 16, 1e-3
# every proposed sample computed (the `proposals` rendering, the fast preset's)
ALL_PROPOSED = {"proposal_samples": 0, "proposal_empty_below": 0.0}
# how a frame is rendered: as before this work (every sample computed, only the fine pass of rays the coarse
# pass found empty skipped), with each speed-up alone, and with both
VARIANTS = {
    "before": {"occupancy_cells": 0, "early_termination": False, "adaptive_block": 0},
    "early_termination": {"occupancy_cells": 0, "early_termination": True, "adaptive_block": 0},
    "occupancy_grid": {"occupancy_cells": 64, "early_termination": False, "adaptive_block": 0},
    "after": {"occupancy_cells": 64, "early_termination": True, "adaptive_block": 0},
    # adaptive sampling in image space (the fast preset's 8 px blocks and 8/255), with early termination, without
    # and with the grid
    "adaptive": {"occupancy_cells": 0, "early_termination": True, "adaptive_block": 8, "neighbour_proposals": False},
    # the grid on top of the preset's rendering (proposals included since they are the preset's)
    "adaptive_grid": {
        "occupancy_cells": 64,
        "early_termination": True,
        "adaptive_block": 8,
        "neighbour_proposals": True,
        **ALL_PROPOSED,
    },
    # and the pixels traced inside a block placing their fine samples from its corners' weights, without a coarse
    # pass of their own (the fast preset's rendering since 2026-12-02)
    "proposals": {
        "occupancy_cells": 0,
        "early_termination": True,
        "adaptive_block": 8,
        "neighbour_proposals": True,
        **ALL_PROPOSED,
    },
    # and those pixels drawing fewer importance samples from the proposal and leaving out the coarse samples where
    # it found (nearly) no weight (proposal_samples, proposal_empty_below)
    "lean": {
        "occupancy_cells": 0,
        "early_termination": True,
        "adaptive_block": 8,
        "neighbour_proposals": True,
        "proposal_samples": LEAN_SAMPLES,
        "proposal_empty_below": LEAN_EMPTY_BELOW,
    },
}
# the adaptive renders of both methods, whose speed-ups over the issue's code are recorded, and NeRFace's
ADAPTIVE = ("adaptive", "proposals")
NERFACE_ADAPTIVE = (*ADAPTIVE, "lean")
# the variants whose renders are also compared with the dense one over the held-out frames
COMPARED = ("after", *NERFACE_ADAPTIVE)
# Local Deformation Fields (`cmp_ldf` of the compare run): every pixel traced, and adaptive sampling
LDF_AVATAR = "cmp_ldf"
LDF_VARIANTS = {
    "before": {"adaptive_block": 0},
    "adaptive": {"adaptive_block": 8, "neighbour_proposals": False},
    "proposals": {"adaptive_block": 8, "neighbour_proposals": True},
}
# for the sparse avatars also a looser grid: a cell is empty when its density over the cube's width takes less
# than 1% of a ray's light (1e-3 by default); nearer Instant-NGP's rule, which bounds each cell's share alone
LOOSE_THRESHOLD = 1e-2
# and the fine field alone marched through the grid at evenly spaced samples (Instant-NGP's rendering), without
# the coarse pass: 128 and 256 samples per ray (5.5 and 2.7 mm apart over the scene's 0.7 m)
MARCH_SAMPLES = (128, 256)
SPARSE_VARIANTS = {
    **VARIANTS,
    "after_loose": {**VARIANTS["after"], "occupancy_threshold": LOOSE_THRESHOLD},
    **{f"after_marched_{n}": {**VARIANTS["after"], "march_samples": n} for n in MARCH_SAMPLES},
}


def timed_render(model, view) -> tuple[np.ndarray, float]:
    start = time.perf_counter()
    image, _ = model.render(view)
    return image.clamp(0, 1).numpy(), time.perf_counter() - start


@contextlib.contextmanager
def issue_tree():
    """A temporary checkout of ISSUE_COMMIT (git worktree), removed afterwards."""
    with tempfile.TemporaryDirectory() as folder:
        tree = Path(folder) / "tree"
        subprocess.run(["git", "worktree", "add", "--detach", str(tree), ISSUE_COMMIT], cwd=REPO, check=True)
        try:
            yield tree
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=REPO, check=True)


def seconds_at_issue(tree: Path, name: str, avatar: str) -> dict:
    """Seconds per frame at each of SIZES of `avatar` rendered by ISSUE_COMMIT's code (checked out at `tree`)."""
    command = [sys.executable, str(REPO / "bench" / "render_at_commit.py"), str(tree)]
    command += [str(WORK_RESULTS), name, avatar, *map(str, SIZES)]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def view_at(view, store: cache.SubjectCache, size: int):
    """A held-out view rendered at another size."""
    at_size = SubjectFrames(store, size, "test", with_images=False)
    return dataclasses.replace(view, size=size, focal=at_size.focal, background=at_size.background)


def warm_up(models: dict, view, store: cache.SubjectCache) -> None:
    """One render of each model at the smallest size before any is timed: a process's first renders build the
    oneDNN kernels of their bf16 shapes, which later renders reuse."""
    for model in models.values():
        model.render(view_at(view, store, SIZES[0]))


def since_issue(seconds: dict, at_issue: dict | None, size: int, adaptive: tuple[str, ...] = ADAPTIVE) -> None:
    """Add the seconds of ISSUE_COMMIT's code at `size` and the `adaptive` renders' speed-ups over them."""
    if at_issue is not None:
        seconds["issue_commit"] = at_issue[f"{size}px"]
        for variant in adaptive:
            seconds[f"speedup_{variant}_since_issue"] = round(at_issue[f"{size}px"] / seconds[variant], 1)


def clip_figures(name: str, avatar: str = AVATAR, variants: dict = VARIANTS, tree: Path | None = None) -> dict:
    spec = find("nerface")
    store = cache.SubjectCache(WORK_RESULTS, name)
    train_dir = store.root / "avatars" / avatar / "train"
    settings = {**NERFACE_AVATARS[avatar], "max_minutes": COMPARE_MINUTES}
    configs = {variant: spec.config_from({**settings, **keys}) for variant, keys in variants.items()}
    size = configs["after"].size
    test = SubjectFrames(store, size, "test")
    train = SubjectFrames(store, size, "train", with_images=False)
    device = torch.device("cpu")
    # the same checkpoint under each rendering setting
    models = {variant: load_trained(spec, cfg, train, train_dir, device) for variant, cfg in configs.items()}
    figures: dict = {"grid": {}, "seconds_per_frame": {}, "quality": {}}
    skipping = [v for v in variants if v.startswith(COMPARED)]
    for variant in [v for v in skipping if v.startswith("after")]:
        start = time.perf_counter()
        grid = models[variant].occupancy_grid()
        cfg = configs[variant]
        figures["grid"][variant] = {
            "cells": cfg.occupancy_cells,
            "threshold": cfg.occupancy_threshold,
            "conditions": cfg.occupancy_conditions,
            "build_seconds": round(time.perf_counter() - start, 2),
            "occupied_share": round(grid.share, 4),
        }
    for variant in variants:  # the default grid for the other variants that use one
        if configs[variant].occupancy_cells and models[variant].occupancy is None:
            models[variant].occupancy = models["after"].occupancy_grid()
    views = models["after"].test_views("first_train_frame", test)
    print(name, avatar, figures["grid"], flush=True)
    at_issue = seconds_at_issue(tree, name, avatar) if tree is not None else None
    warm_up(models, views[0], store)
    for render_size in SIZES:
        view = view_at(views[0], store, render_size)
        # and, at the training size, the samples each render sends through the fields per pixel (96 at most for
        # NeRFace fast: 32 coarse, and 64 fine on the rays the coarse pass finds busy), counted during the same render
        seconds, samples = {}, {}
        for variant, model in models.items():
            counted = model.renderer.samples_computed
            seconds[variant] = round(timed_render(model, view)[1], 2)
            samples[variant] = round((model.renderer.samples_computed - counted) / render_size**2, 1)
        for variant in skipping:
            seconds[f"speedup_{variant}"] = round(seconds["before"] / seconds[variant], 1)
        since_issue(seconds, at_issue, render_size, tuple(v for v in NERFACE_ADAPTIVE if v in variants))
        figures["seconds_per_frame"][f"{render_size}px"] = seconds
        if render_size == size:
            figures["samples_per_pixel"] = samples
        print(name, avatar, render_size, seconds, flush=True)
    figures["quality"] = quality_figures(models, skipping, views, test)
    print(name, avatar, figures["quality"], flush=True)
    return figures


def quality_figures(models: dict, compared, views: list, test: SubjectFrames) -> dict:
    """Over every FRAME_STRIDE-th held-out view: the PSNR of the dense render (`before`) against the real frame,
    and of each `compared` variant's against the real frame and against the dense render."""
    rows = []
    for k in range(0, len(views), FRAME_STRIDE):
        truth = test.images[k].numpy()
        before, _ = timed_render(models["before"], views[k])
        row = [psnr(before, truth)]
        for variant in compared:
            fast, _ = timed_render(models[variant], views[k])
            row += [psnr(fast, truth), psnr(fast, before)]
        rows.append(row)
    table = np.array(rows)
    quality = {}
    for j, variant in enumerate(compared):
        against_truth, against_before = table[:, 1 + 2 * j], table[:, 2 + 2 * j]
        quality[variant] = {
            "protocol": "first_train_frame",
            "frames": len(rows),
            "psnr_before": round(float(table[:, 0].mean()), 3),
            "psnr": round(float(against_truth.mean()), 3),
            "largest_frame_difference_db": round(float(np.abs(table[:, 0] - against_truth).max()), 3),
            "psnr_against_before": round(float(against_before.mean()), 2),
            "lowest_psnr_against_before": round(float(against_before.min()), 2),
        }
    return quality


def evaluation_figures(name: str, avatar: str) -> dict:
    """Minutes of the evaluation stage of a compare-run avatar as that run ran it (both protocols, 60 latent steps,
    no orbit or sweep) with today's preset rendering, beside the minutes its own log shows (first to last line)."""
    settings = {**AVATARS[avatar], "max_minutes": COMPARE_MINUTES}
    spec = find(settings["method"])
    cfg = spec.config_from(settings)
    store = cache.SubjectCache(WORK_RESULTS, name)
    with tempfile.TemporaryDirectory() as scratch:
        start = time.perf_counter()
        summary = evaluate(spec, store, cfg, store.root / "avatars" / avatar / "train", Path(scratch))
        minutes = round((time.perf_counter() - start) / 60, 2)
    log_path = store.root / "logs" / f"avatar_eval_{avatar}.log"  # absent where the avatar was trained alone
    stamps = re.findall(r"^(\d\d):(\d\d):(\d\d) ", log_path.read_text(), re.M) if log_path.exists() else []
    seconds = [int(h) * 3600 + int(m) * 60 + int(sec) for h, m, sec in stamps]
    before = ((seconds[-1] - seconds[0]) % 86400) / 60 if seconds else None
    figures = {
        "minutes": minutes,
        "rendering": summary["rendering"],
        "minutes_in_compare_log": round(before, 2) if before is not None else None,
        "test_frames": len(summary["test_frames"]),
    }
    print(name, avatar, "evaluation", figures, flush=True)
    return figures


def ldf_figures(name: str, tree: Path | None = None) -> dict:
    """Local Deformation Fields' `cmp_ldf`: seconds per held-out frame at each size with every pixel traced and
    with adaptive sampling, and the PSNR of both over every FRAME_STRIDE-th held-out frame (first_train_frame
    codes) against the real frame and of the adaptive render against the dense one."""
    spec = find("ldf")
    store = cache.SubjectCache(WORK_RESULTS, name)
    settings = {**AVATARS[LDF_AVATAR], "max_minutes": COMPARE_MINUTES}
    configs = {v: spec.config_from({**settings, **keys}) for v, keys in LDF_VARIANTS.items()}
    size = configs["before"].size
    test = SubjectFrames(store, size, "test")
    train = SubjectFrames(store, size, "train", with_images=False)
    train_dir = store.root / "avatars" / LDF_AVATAR / "train"
    models = {v: load_trained(spec, cfg, train, train_dir, torch.device("cpu")) for v, cfg in configs.items()}
    views = models["before"].test_views("first_train_frame", test)
    figures: dict = {"seconds_per_frame": {}}
    at_issue = seconds_at_issue(tree, name, LDF_AVATAR) if tree is not None else None
    warm_up(models, views[0], store)
    for render_size in SIZES:
        view = view_at(views[0], store, render_size)
        seconds = {v: round(timed_render(model, view)[1], 2) for v, model in models.items()}
        for variant in ADAPTIVE:
            seconds[f"speedup_{variant}"] = round(seconds["before"] / seconds[variant], 1)
        since_issue(seconds, at_issue, render_size)
        figures["seconds_per_frame"][f"{render_size}px"] = seconds
        print(name, LDF_AVATAR, render_size, seconds, flush=True)
    figures["quality"] = quality_figures(models, ADAPTIVE, views, test)
    print(name, LDF_AVATAR, figures["quality"], flush=True)
    return figures


def sparse_bench(clips: list[str], render_only: bool = False) -> None:
    """Both avatars of NERFACE_AVATARS trained and evaluated (the compare run's `cmp_nerface` is reused where it
    exists), then each one's rendering speed and PSNR before and after empty-space skipping. `render_only`: the
    avatars trained before are rendered as they are (rendering code changed since: Snakemake would retrain)."""
    command = "bench/render_bench.py sparse " + "--render-only " * render_only + " ".join(clips)
    if not render_only:
        compare_bench(clips, methods=NERFACE_AVATARS, results=SPARSE_RESULTS, command=command)
    figures = _read(SPARSE_RESULTS, {})
    figures["render_command"], figures["render_commit"] = command, head_commit()
    render = figures.setdefault("render", {})
    for clip in clips:
        name = Path(clip).stem
        render[name] = {avatar: clip_figures(name, avatar, SPARSE_VARIANTS) for avatar in NERFACE_AVATARS}
        render[name]["gflops_fp32_after"] = round(matmul_gflops(torch.float32), 1)
        _write(SPARSE_RESULTS, figures)


def main(clips: list[str], results: str = SPEED_RESULTS) -> None:
    figures = _read(results, {"clips": {}})
    figures.update(
        {
            "command": "bench/render_bench.py " + " ".join(clips),
            "cpu": cpu_info(),
            "matmul_gflops_fp32": round(matmul_gflops(torch.float32), 1),
            "threads": torch.get_num_threads(),
            "commit": head_commit(),
        }
    )
    figures["issue_commit"] = ISSUE_COMMIT
    with issue_tree() as tree:
        for clip in clips:
            figures["clips"][Path(clip).stem] = clip_figures(Path(clip).stem, tree=tree)
            _write(results, figures)
        for clip in clips:
            name = Path(clip).stem
            trained = WORK_RESULTS / name / "avatars" / LDF_AVATAR / "train" / "done.json"
            if not trained.exists():  # its figures from an earlier run stay as they were
                print(name, LDF_AVATAR, "not trained: skipped (bench/ldf_bench.py compare trains it)", flush=True)
                continue
            figures.setdefault("ldf", {})[name] = ldf_figures(name, tree)
            _write(results, figures)
    figures["matmul_gflops_fp32_after"] = round(matmul_gflops(torch.float32), 1)
    _write(results, figures)


def evaluation_bench(clips: list[str], results: str = SPEED_RESULTS) -> None:
    figures = _read(results, {"clips": {}})
    timed = figures.setdefault("evaluation", {})
    timed.update(
        {
            "command": "bench/render_bench.py evaluation " + " ".join(clips),
            "commit": head_commit(),
            "matmul_gflops_fp32": round(matmul_gflops(torch.float32), 1),
        }
    )
    for clip in clips:
        # each clip's own commit: a run of some clips leaves the others' figures as an earlier commit measured them
        name = Path(clip).stem
        trained = [
            a for a in (AVATAR, LDF_AVATAR) if (WORK_RESULTS / name / "avatars" / a / "train" / "done.json").exists()
        ]
        timed[name] = {"commit": head_commit(), **{avatar: evaluation_figures(name, avatar) for avatar in trained}}
        _write(results, figures)
    timed["matmul_gflops_fp32_after"] = round(matmul_gflops(torch.float32), 1)
    _write(results, figures)


if __name__ == "__main__":
    arguments = [a for a in sys.argv[1:] if not a.startswith("--")]
    results = next((a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--results=")), SPEED_RESULTS)
    if arguments[:1] == ["sparse"]:
        sparse_bench(arguments[1:] or list(TUNED_CLIPS), "--render-only" in sys.argv[1:])
    elif arguments[:1] == ["evaluation"]:
        evaluation_bench(arguments[1:] or list(CLIPS), results)
    else:
        main(arguments or list(CLIPS), results)

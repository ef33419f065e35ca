"""Rendering speed of a trained NeRFace avatar with and without the occupancy grid.

    .venv/bin/python bench/render_bench.py [CLIP ...]     # -> bench/results/render_speed.json

Reads the `nerface_fast` avatars that `bench/nha_bench.py compare CLIP` trained into bench/work (run that
first). Per clip: the grid's build time and share of occupied cells; seconds per frame of a held-out frame
rendered densely (occupancy_cells 0, as before the grid) and with the grid, at 128, 256 and 512 px; and,
over every FRAME_STRIDE-th held-out frame at the training size, the PSNR of both renders against the real
frame (the same frames, the `first_train_frame` protocol, so no test-time fitting enters) and of the grid's
render against the dense one. This CPU's matrix-product throughput is recorded beside the figures.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from avatar_pipeline import cache  # noqa: E402
from avatar_pipeline.avatars import find  # noqa: E402
from avatar_pipeline.avatars.data import SubjectFrames  # noqa: E402
from avatar_pipeline.avatars.trainer import load_trained  # noqa: E402
from avatar_pipeline.metrics import psnr  # noqa: E402
from avatar_pipeline.runtime import cpu_info, matmul_gflops  # noqa: E402
from bench.nerface_bench import _read, _write, head_commit  # noqa: E402
from bench.nha_bench import AVATARS, CLIPS, COMPARE_MINUTES  # noqa: E402

SIZES = (128, 256, 512)
GRID_CELLS = 64
FRAME_STRIDE = 4


def timed_render(model, view) -> tuple[np.ndarray, float]:
    start = time.perf_counter()
    image, _ = model.render(view)
    return image.clamp(0, 1).numpy(), time.perf_counter() - start


def clip_figures(name: str) -> dict:
    spec = find("nerface")
    store = cache.SubjectCache(REPO / "bench" / "work" / "results", name)
    train_dir = store.root / "avatars" / "nerface_fast" / "train"
    settings = {**AVATARS["nerface_fast"], "max_minutes": COMPARE_MINUTES}
    dense_cfg = spec.config_from({**settings, "occupancy_cells": 0})
    grid_cfg = spec.config_from({**settings, "occupancy_cells": GRID_CELLS})
    size = grid_cfg.size
    test = SubjectFrames(store, size, "test")
    train = SubjectFrames(store, size, "train", with_images=False)
    device = torch.device("cpu")
    dense = load_trained(spec, dense_cfg, train, train_dir, device)
    fast = load_trained(spec, grid_cfg, train, train_dir, device)  # the same checkpoint, rendered with the grid
    start = time.perf_counter()
    grid = fast.occupancy_grid()
    figures = {
        "grid": {
            "cells": grid_cfg.occupancy_cells,
            "threshold": grid_cfg.occupancy_threshold,
            "conditions": grid_cfg.occupancy_conditions,
            "build_seconds": round(time.perf_counter() - start, 2),
            "occupied_share": round(grid.share, 4),
        },
        "seconds_per_frame": {},
    }
    views = fast.test_views("first_train_frame", test)
    print(name, figures["grid"], flush=True)
    for render_size in SIZES:
        at_size = SubjectFrames(store, render_size, "test", with_images=False)
        view = dataclasses.replace(views[0], size=render_size, focal=at_size.focal, background=at_size.background)
        _, dense_seconds = timed_render(dense, view)
        _, grid_seconds = timed_render(fast, view)
        figures["seconds_per_frame"][f"{render_size}px"] = {
            "dense": round(dense_seconds, 2),
            "grid": round(grid_seconds, 2),
            "speedup": round(dense_seconds / grid_seconds, 1),
        }
        print(name, render_size, figures["seconds_per_frame"][f"{render_size}px"], flush=True)
    rows = []
    for k in range(0, len(views), FRAME_STRIDE):
        truth = test.images[k].numpy()
        dense_image, _ = timed_render(dense, views[k])
        grid_image, _ = timed_render(fast, views[k])
        rows.append((psnr(dense_image, truth), psnr(grid_image, truth), psnr(grid_image, dense_image)))
    table = np.array(rows)
    figures["quality"] = {
        "protocol": "first_train_frame",
        "frames": len(rows),
        "psnr_dense": round(float(table[:, 0].mean()), 3),
        "psnr_grid": round(float(table[:, 1].mean()), 3),
        "largest_frame_difference_db": round(float(np.abs(table[:, 0] - table[:, 1]).max()), 3),
        "psnr_grid_against_dense": round(float(table[:, 2].mean()), 2),
        "lowest_psnr_grid_against_dense": round(float(table[:, 2].min()), 2),
    }
    print(name, figures["quality"], flush=True)
    return figures


def main(clips: list[str]) -> None:
    figures = _read("render_speed.json", {"clips": {}})
    figures.update(
        {
            "command": "bench/render_bench.py " + " ".join(clips),
            "cpu": cpu_info(),
            "matmul_gflops_fp32": round(matmul_gflops(torch.float32), 1),
            "threads": torch.get_num_threads(),
            "commit": head_commit(),
        }
    )
    for clip in clips:
        figures["clips"][Path(clip).stem] = clip_figures(Path(clip).stem)
        _write("render_speed.json", figures)


if __name__ == "__main__":
    main(sys.argv[1:] or list(CLIPS))

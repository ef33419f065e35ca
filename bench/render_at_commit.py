"""Seconds per held-out frame of a compare-run avatar rendered by the code of another commit.

    .venv/bin/python bench/render_at_commit.py TREE RESULTS CLIP AVATAR SIZE ...   # -> one JSON line on stdout

TREE is a checkout of that commit (bench/render_bench.py makes one with `git worktree` and runs this file);
its `avatar_pipeline` and `bench` are imported instead of this checkout's, and only what the avatar core has
offered since before issue 22 is used (method registry, SubjectFrames, load_trained, test_views, render), so
the same checkpoint renders as it rendered then. RESULTS is the results folder holding the avatar's caches and
checkpoint. Each size: one held-out frame (the first, first_train_frame codes) rendered once to warm up, then
timed once, as render_bench times the current code.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path


def main(tree: Path, results: Path, clip: str, avatar: str, sizes: list[int]) -> dict:
    sys.path.insert(0, str(tree))
    import torch

    from avatar_pipeline import cache
    from avatar_pipeline.avatars import find
    from avatar_pipeline.avatars.data import SubjectFrames
    from avatar_pipeline.avatars.trainer import load_trained
    from bench.ldf_bench import AVATARS
    from bench.nha_bench import COMPARE_MINUTES

    settings = {**AVATARS[avatar], "max_minutes": COMPARE_MINUTES}
    spec = find(settings.pop("method"))
    cfg = spec.config_from(settings)
    store = cache.SubjectCache(results, clip)
    test = SubjectFrames(store, cfg.size, "test")
    train = SubjectFrames(store, cfg.size, "train", with_images=False)
    model = load_trained(spec, cfg, train, store.root / "avatars" / avatar / "train", torch.device("cpu"))
    first = model.test_views("first_train_frame", test)[0]
    seconds = {}
    for size in sizes:
        at_size = SubjectFrames(store, size, "test", with_images=False)
        view = dataclasses.replace(first, size=size, focal=at_size.focal, background=at_size.background)
        model.render(view)
        start = time.perf_counter()
        model.render(view)
        seconds[f"{size}px"] = round(time.perf_counter() - start, 2)
    return seconds


if __name__ == "__main__":
    tree, results, clip, avatar, *sizes = sys.argv[1:]
    print(json.dumps(main(Path(tree), Path(results), clip, avatar, [int(s) for s in sizes])))

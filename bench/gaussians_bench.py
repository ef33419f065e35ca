"""The Gaussian-splatting avatar on this machine.

    .venv/bin/python bench/gaussians_bench.py steps                 # -> bench/results/gaussians_steps.json
    .venv/bin/python bench/gaussians_bench.py compare [--figures-only] [CLIP ...]
                                                                    # -> bench/results/gaussians_compare.json
    .venv/bin/python bench/gaussians_bench.py render [CLIP]         # -> bench/results/gaussians_render.json

`steps`: seconds per training step of the `fast` preset at 256 px and the `paper` preset at 512 px on
lp_d18 tracked with ICT FaceKit (at the start of training, where the Gaussians are largest), with this CPU's
matrix-product throughput beside them.

`compare`: the whole pipeline on clips of ../shared/data/videos at 256 px (last 20% held out): one
`gaussians` fast avatar of the head alone (as FlashAvatar), one with body Gaussians for the rest of the
person, and one `nerface` fast avatar per clip, each trained COMPARE_MINUTES, one after the other in this
run. Test metrics full frame and inside the head mask, sharpness (CPBD, gradient energy), the held-out
frame's PSNR over training time. lp_d18 and dt_W009 tuned the preset; dt_M030 and vr_face2 are the
untuned check.

`render`: frames per second of the compare's trained avatar of a clip over its test views at 256 and
512 px (the rasterizer alone and the whole render: network, mesh, splatting), and the pairs it composites.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from avatar_pipeline import cache  # noqa: E402
from avatar_pipeline.avatars import avatar_method, trainer  # noqa: E402
from avatar_pipeline.avatars.data import SubjectFrames  # noqa: E402
from avatar_pipeline.avatars.gaussians.rasterizer import rasterize  # noqa: E402
from avatar_pipeline.runtime import cpu_info, matmul_gflops  # noqa: E402
from bench.nerface_bench import _write, head_commit  # noqa: E402
from bench.nha_bench import COMPARE_MINUTES, SHORT_RENDERS, compare_arguments, compare_bench, steps_bench  # noqa: E402

BODY_GAUSSIANS = 4000
# step counts the time budget cuts short, so both train for the same minutes
AVATARS = {
    # the head alone, as FlashAvatar
    "cmp_gaussians": {"method": "gaussians", "preset": "fast", "steps": 100000, "body_gaussians": 0, **SHORT_RENDERS},
    # the same with Gaussians for the rest of the person (neck, shoulders, clothes), which NeRFace's field holds
    "cmp_gaussians_body": {
        "method": "gaussians",
        "preset": "fast",
        "steps": 100000,
        "body_gaussians": BODY_GAUSSIANS,
        **SHORT_RENDERS,
    },
    "cmp_nerface": {"method": "nerface", "preset": "fast", "steps": 20000, **SHORT_RENDERS},
}
RENDER_SIZES = (256, 512)


def render_bench(clip: str) -> None:
    name = Path(clip).stem
    store = cache.SubjectCache(REPO / "bench" / "work" / "results", name)
    spec, cfg = avatar_method({**AVATARS["cmp_gaussians"], "max_minutes": COMPARE_MINUTES})
    device = torch.device("cpu")
    train = SubjectFrames(store, cfg.size, "train", with_images=False)
    model = trainer.load_trained(spec, cfg, train, store.training_dir("cmp_gaussians"), device)
    figures = {
        "command": f"bench/gaussians_bench.py render {clip}",
        "cpu": cpu_info(),
        "threads": torch.get_num_threads(),
        "matmul_gflops_fp32": round(matmul_gflops(torch.float32), 1),
        "commit": head_commit(),
        "clip": name,
        "gaussians": len(model.bary),
        "rasterizer": model.rasterizer,
        "sizes": {},
    }
    for size in RENDER_SIZES:
        test = SubjectFrames(store, size, "test", with_images=False)
        views = [model.view(test, k) for k in range(len(test.frames))]
        model.render(views[0])  # warm-up
        start = time.perf_counter()
        for view in views:
            model.render(view)
        seconds = (time.perf_counter() - start) / len(views)
        with torch.no_grad():  # the rasterizer alone, on each view's Gaussians
            raster_seconds, pairs = 0.0, 0
            for view in views:
                splats, rotation, translation = model.splats(view)
                start = time.perf_counter()
                _, _, found = rasterize(
                    splats, rotation, translation, view.focal, view.size, view.background, model.rasterizer == "numba"
                )
                raster_seconds += time.perf_counter() - start
                pairs += found
        figures["sizes"][str(size)] = {
            "frames": len(views),
            "seconds_per_frame": round(seconds, 4),
            "frames_per_second": round(1 / seconds, 2),
            "rasterizer_seconds_per_frame": round(raster_seconds / len(views), 4),
            "pairs_per_frame": int(pairs / len(views)),
        }
        print(size, figures["sizes"][str(size)], flush=True)
    _write("gaussians_render.json", figures)


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else "steps"
    if what == "steps":
        steps_bench("gaussians", (("fast", 256, 5), ("paper", 512, 2)), command="bench/gaussians_bench.py steps")
    elif what == "compare":
        compare_bench(
            **compare_arguments(),
            methods=AVATARS,
            results="gaussians_compare.json",
            command="bench/gaussians_bench.py compare CLIP ...",
        )
    elif what == "render":
        render_bench(sys.argv[2] if len(sys.argv) > 2 else "lp_d18.mp4")
    else:
        sys.exit(f"unknown benchmark {what!r}: steps, compare or render")

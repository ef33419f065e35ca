"""Local Deformation Fields on this machine.

    .venv/bin/python bench/ldf_bench.py steps                  # -> bench/results/ldf_steps.json
    .venv/bin/python bench/ldf_bench.py compare [--figures-only] [CLIP ...]
                                                               # -> bench/results/ldf_compare.json
    .venv/bin/python bench/ldf_bench.py locality [CLIP]        # -> bench/results/ldf_locality.json + .png
    .venv/bin/python bench/ldf_bench.py ablation [--locality-only] [CLIP]
                                                               # -> bench/results/ldf_ablation.json + _locality.png

`steps`: seconds per training step of each phase (the canonical pre-training stretches, one per grid
size, and the joint training) of the `fast` preset at 256 px and the `paper` preset at 512 px, on lp_d18
tracked with ICT FaceKit, with this CPU's matrix-product throughput beside them.

`compare`: the whole pipeline on clips of ../shared/data/videos at 256 px (last 20% held out), with one
`ldf`, one `nerface` and one `nha` fast avatar per clip, each trained for the same minutes, one after the
other in this run (their own avatar names, so nothing trained by another benchmark is reused). Test metrics
under every protocol, full frame and inside the head mask. lp_d18 and dt_W009 tuned the presets; dt_M030
and vr_face2 are the untuned check.

`locality`: the paper's central claim as a number. On the compare's trained `ldf` and `nerface` avatars of
a clip: the first training frame re-rendered with only the expression coefficients whose attention masks
reach nothing but the eye and brow fields moved to their training maximum (then only those reaching the
jaw line, nose and mouth fields), everything else as tracked. Reported: the share of the rendered change
(mean absolute colour difference) that lies outside the parsing's eye region (brows, eyes, glasses) or
mouth region (mouth, lips), each grown by REGION_MARGIN of the image so eyelids and lip surroundings count
as inside; lower is more local.

`ablation`: the paper's ablation on one clip at equal time: local fields against one global field of about
the same parameter count, without the attention masks, without the local control loss; test metrics as in
`compare`, then the locality measure above on each of the four (the same coefficients, chosen by the full
model's masks); --locality-only measures the avatars already trained.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import cv2
import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from avatar_pipeline import cache  # noqa: E402
from avatar_pipeline.avatars import avatar_method, trainer  # noqa: E402
from avatar_pipeline.avatars.data import SubjectFrames  # noqa: E402
from avatar_pipeline.avatars.ldf.head import EDIT_REGIONS  # noqa: E402
from avatar_pipeline.runtime import cpu_info, matmul_gflops  # noqa: E402
from bench.nerface_bench import RESULTS, _read, _write, head_commit  # noqa: E402
from bench.nha_bench import COMPARE_MINUTES, SHORT_RENDERS, compare_arguments, compare_bench, steps_bench  # noqa: E402

# this benchmark's own avatar names: the nerface and nha avatars of the NHA benchmark are not reused. LDF keeps
# its preset's steps: the time budget is shared among phases in proportion to their steps, so more steps
# would shrink its pre-training; the budget cuts the schedule where it is too long for the minutes
AVATARS = {
    "cmp_ldf": {"method": "ldf", "preset": "fast", **SHORT_RENDERS},
    "cmp_nerface": {"method": "nerface", "preset": "fast", "steps": 20000, **SHORT_RENDERS},
    "cmp_nha": {"method": "nha", "preset": "fast", "steps": 20000, **SHORT_RENDERS},
}
ABLATIONS = {
    "abl_full": {},
    "abl_global_field": {"local_fields": False},
    "abl_no_attention": {"attention": False},
    "abl_no_local_loss": {"w_local": 0.0},
}
REGION_CLASSES = {"eyes": ("l_brow", "r_brow", "l_eye", "r_eye", "eye_g"), "mouth": ("mouth", "u_lip", "l_lip")}
REGION_MARGIN = 0.05  # of the image side


def locality_figures(clip: str, avatars: dict[str, dict], command: str) -> tuple[dict, np.ndarray]:
    """The locality measure on the trained `avatars` (name -> settings) of a clip, the coefficients of each region
    chosen by the attention masks of the first LDF avatar with masks on (the same edit for every avatar);
    -> figures and the picture of every edit (before, after, change with the region outlined)."""
    name = Path(clip).stem
    store = cache.SubjectCache(REPO / "bench" / "work" / "results", name)
    figures = {
        "command": command,
        "cpu": cpu_info(),
        "matmul_gflops_fp32": round(matmul_gflops(torch.float32), 1),
        "commit": head_commit(),
        "region_margin": REGION_MARGIN,
        "region_classes": REGION_CLASSES,
        "clip": name,
        "methods": {},
    }
    device = torch.device("cpu")
    models = {}
    for avatar, settings in avatars.items():
        spec, cfg = avatar_method({**settings, "max_minutes": COMPARE_MINUTES})
        train = SubjectFrames(store, cfg.size, "train", with_images=False)
        models[avatar] = trainer.load_trained(spec, cfg, train, store.training_dir(avatar), device)
        figures["methods"][avatar] = {"steps": (store.training_summary(avatar) or {}).get("steps")}
    ldf = next(m for a, m in models.items() if avatars[a]["method"] == "ldf" and avatars[a].get("attention", True))
    train = ldf.train_frames
    names = ldf.condition_names()
    high = train.conditions.max(0).values
    labels = store.read_labels(int(train.frames[0]))
    labels = cv2.resize(labels, (train.size, train.size), interpolation=cv2.INTER_NEAREST)
    margin = max(1, int(round(REGION_MARGIN * train.size)))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * margin + 1, 2 * margin + 1))
    panels = []
    for region in EDIT_REGIONS:
        coefficients = ldf.head.region_coefficients(ldf.attention, region)
        ids = [cache.PARSING_CLASS_ID[c] for c in REGION_CLASSES[region]]
        inside = cv2.dilate(np.isin(labels, ids).astype(np.uint8), kernel) > 0
        figures.setdefault("coefficients", {})[region] = [names[c] for c in coefficients]
        for avatar, model in models.items():
            neutral = model.view(train, 0)
            conditions = neutral.conditions.clone()
            conditions[coefficients] = high[coefficients]
            before, _ = model.render(neutral)
            after, _ = model.render(dataclasses.replace(neutral, conditions=conditions))
            change = (after - before).abs().mean(-1).numpy()
            total = float(change.sum())
            figures["methods"][avatar][region] = {
                "share_outside": round(float(change[~inside].sum()) / max(total, 1e-12), 4),
                "mean_change_inside": round(float(change[inside].mean()), 5),
                "mean_change_outside": round(float(change[~inside].mean()), 5),
            }
            heat = cv2.applyColorMap((np.clip(change * 8, 0, 1) * 255).astype(np.uint8), cv2.COLORMAP_INFERNO)
            heat = cv2.cvtColor(heat, cv2.COLOR_BGR2RGB)
            outline = cv2.dilate(inside.astype(np.uint8), np.ones((3, 3), np.uint8)) - inside.astype(np.uint8)
            heat[outline > 0] = (0, 255, 0)
            row = [(t.clamp(0, 1).numpy() * 255).round().astype(np.uint8) for t in (before, after)] + [heat]
            strip = np.concatenate(row, 1)
            cv2.putText(strip, f"{avatar} {region}", (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1)
            panels.append(strip)
    return figures, np.concatenate(panels, 0)


def locality_bench(clip: str) -> None:
    avatars = {a: AVATARS[a] for a in ("cmp_ldf", "cmp_nerface")}
    figures, picture = locality_figures(clip, avatars, f"bench/ldf_bench.py locality {clip}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    cache.write_png(RESULTS / "ldf_locality.png", picture)
    _write("ldf_locality.json", figures)


def ablation_avatars() -> dict[str, dict]:
    return {name: {**AVATARS["cmp_ldf"], **overrides} for name, overrides in ABLATIONS.items()}


def ablation_bench(clip: str, locality_only: bool = False) -> None:
    """The ablation's avatars trained and evaluated, then the locality measure on each of them (the paper's
    claims for the masks and the local control loss are about locality more than PSNR). `locality_only`: the
    measure alone, on the avatars as trained (after a code change Snakemake would retrain them)."""
    command = f"bench/ldf_bench.py ablation {'--locality-only ' * locality_only}{clip}"
    if not locality_only:
        compare_bench([clip], methods=ablation_avatars(), results="ldf_ablation.json", command=command)
    figures = _read("ldf_ablation.json", {})
    figures["locality"], picture = locality_figures(clip, ablation_avatars(), command)
    RESULTS.mkdir(parents=True, exist_ok=True)
    cache.write_png(RESULTS / "ldf_ablation_locality.png", picture)
    _write("ldf_ablation.json", figures)


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else "steps"
    if what == "steps":
        steps_bench("ldf", (("fast", 256, 3), ("paper", 512, 1)))
    elif what == "compare":
        compare_bench(
            **compare_arguments(),
            methods=AVATARS,
            results="ldf_compare.json",
            command="bench/ldf_bench.py compare CLIP ...",
        )
    elif what == "locality":
        locality_bench(sys.argv[2] if len(sys.argv) > 2 else "lp_d18.mp4")
    elif what == "ablation":
        clips = [a for a in sys.argv[2:] if a != "--locality-only"]
        ablation_bench(clips[0] if clips else "lp_d18.mp4", "--locality-only" in sys.argv[2:])
    else:
        sys.exit(f"unknown benchmark {what!r}: steps, compare, locality or ablation")

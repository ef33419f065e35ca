"""NeRFace's `paper` training step beside the reference implementation's, in one process on this machine.

    .venv/bin/python bench/nerface_reference.py PATH/TO/4D-Facial-Avatars   # -> bench/results/nerface_reference.json

PATH is a checkout of gafniguy/4D-Facial-Avatars (the authors' code; it is read from there and never copied
here). Timed: one training iteration of its `train_transformed_rays.py` at the paper config (config/dave/
dave_dvp_lcode_fixed_bg_512_paper_model.yml: 2048 rays, 64 coarse + 64 fine samples, its
ConditionalBlendshapePaperNeRFModel coarse and fine, 76-d expression, 32-d latent code, background as the
last sample), i.e. run_one_iter_of_nerf, the two colour losses, backward and Adam; then this project's
`paper` preset step (bench/nerface_bench.step_seconds, same rays and samples, the same 76-d expression) in
fp32 and at `precision: auto`. The two alternate, each best of REPEATS after a warm-up.

The reference imports modules its training iteration never calls (pytorch3d.transforms for axis-angle
cameras, the torchsearchsorted CUDA extension, imageio for its data loaders); they are replaced by empty
stand-ins that raise if called. The networks differ in shape (the reference: 6 x 256 layers with a skip, a
256 feature layer, a 3 x 128 colour branch; this project's `paper`: 8 x 256, 4 x 128, as the paper's
figure draws it): their parameter counts are recorded beside the times.
"""

from __future__ import annotations

import contextlib
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from avatar_pipeline.runtime import cpu_info, matmul_gflops  # noqa: E402
from bench.nerface_bench import _write, head_commit, step_seconds  # noqa: E402

CONFIG = "config/dave/dave_dvp_lcode_fixed_bg_512_paper_model.yml"
EXPRESSION_DIM = 76  # the reference's expression vector
REPEATS = 3


def _stand_ins() -> None:
    """Empty modules for the reference's imports that its training iteration never calls."""

    for name in ("pytorch3d", "pytorch3d.transforms", "torchsearchsorted", "imageio"):
        if name == "imageio" and _importable(name):
            continue
        module = types.ModuleType(name)
        module.__getattr__ = _refusing  # any function looked up refuses to run
        sys.modules[name] = module
    sys.modules["pytorch3d"].transforms = sys.modules["pytorch3d.transforms"]


def _refusing(attribute: str):
    """A stand-in module's attribute: a function that refuses to run (module dunders stay missing, so that
    inspect and torch's import machinery see an ordinary module)."""
    if attribute.startswith("__"):
        raise AttributeError(attribute)

    def refuse(*args, **kwargs):
        raise RuntimeError(f"the stand-in {attribute} of bench/nerface_reference.py was called: the timed path changed")

    return refuse


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def reference_step(checkout: Path):
    """A function running one reference training iteration, and the reference networks' parameter count."""
    code = checkout / "nerface_code" / "nerf-pytorch"
    if not (code / "nerf" / "train_utils.py").exists():
        sys.exit(f"{checkout}: not a checkout of gafniguy/4D-Facial-Avatars (no nerface_code/nerf-pytorch/nerf)")
    _stand_ins()
    sys.path.insert(0, str(code))
    import nerf  # the reference package

    cfg = nerf.CfgNode(yaml.safe_load((code / CONFIG).read_text()))
    torch.manual_seed(0)
    models = []
    for part in (cfg.models.coarse, cfg.models.fine):
        models.append(
            getattr(nerf, part.type)(
                num_encoding_fn_xyz=part.num_encoding_fn_xyz,
                num_encoding_fn_dir=part.num_encoding_fn_dir,
                include_input_xyz=part.include_input_xyz,
                include_input_dir=part.include_input_dir,
                use_viewdirs=part.use_viewdirs,
                num_layers=cfg.models.coarse.num_layers,
                hidden_size=cfg.models.coarse.hidden_size,
                include_expression=True,
            )
        )
    coarse, fine = models
    encode_position = nerf.get_embedding_function(
        num_encoding_functions=cfg.models.coarse.num_encoding_fn_xyz,
        include_input=cfg.models.coarse.include_input_xyz,
        log_sampling=cfg.models.coarse.log_sampling_xyz,
    )
    encode_direction = nerf.get_embedding_function(
        num_encoding_functions=cfg.models.coarse.num_encoding_fn_dir,
        include_input=cfg.models.coarse.include_input_dir,
        log_sampling=cfg.models.coarse.log_sampling_dir,
    )
    latent_codes = torch.zeros(10, 32, requires_grad=True)
    optimizer = torch.optim.Adam(list(coarse.parameters()) + list(fine.parameters()) + [latent_codes], lr=5e-4)
    rays = cfg.nerf.train.num_random_rays
    generator = np.random.default_rng(0)
    origins = torch.zeros(rays, 3)
    origins[:, 2] = 0.5
    directions = torch.nn.functional.normalize(torch.randn(rays, 3) * 0.1 + torch.tensor([0.0, 0.0, -1.0]), dim=-1)
    expression = torch.randn(EXPRESSION_DIM)
    background, target = torch.rand(rays, 3), torch.rand(rays, 3)

    def step():
        latent = latent_codes[int(generator.integers(10))]
        with _relu_saving_its_input():
            rgb_coarse, _, _, rgb_fine, _, _, _ = nerf.run_one_iter_of_nerf(
                512,
                512,
                1000.0,
                coarse,
                fine,
                origins,
                directions,
                cfg,
                mode="train",
                encode_position_fn=encode_position,
                encode_direction_fn=encode_direction,
                expressions=expression,
                background_prior=background,
                latent_code=latent,
            )
        loss = torch.nn.functional.mse_loss(rgb_coarse, target) + torch.nn.functional.mse_loss(rgb_fine, target)
        loss = loss + 10 * 0.0005 * latent.norm()  # the reference: its latent-code term, weighted 10x
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    parameters = sum(p.numel() for p in coarse.parameters()) + sum(p.numel() for p in fine.parameters())
    return step, parameters, {"rays": rays, "coarse": cfg.nerf.train.num_coarse, "fine": cfg.nerf.train.num_fine}


@contextlib.contextmanager
def _relu_saving_its_input():
    """The reference adds 1e-6 in place to the output of its density ReLU (volume_rendering_utils). The torch
    of its time differentiated relu through its input, so that was allowed; today's relu keeps its output for
    the backward pass and refuses. For the reference's iteration only, relu is clamp_min(0): the same values
    and gradients and about the same cost, differentiated through its input."""
    original = torch.nn.functional.relu
    torch.nn.functional.relu = lambda x, inplace=False: torch.clamp_min(x, 0.0)
    try:
        yield
    finally:
        torch.nn.functional.relu = original


def timed(step, repeats: int) -> float:
    times = []
    for _ in range(repeats + 1):  # the first warms up
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return min(times[1:])


def main(checkout: Path) -> None:
    from avatar_pipeline.avatars import find
    from avatar_pipeline.avatars.nerface.field import ConditionedField

    step, reference_parameters, sampling = reference_step(checkout)
    cfg = find("nerface").config_from({"preset": "paper"})
    ours = ConditionedField(cfg.field(EXPRESSION_DIM))
    figures = {
        "command": "bench/nerface_reference.py PATH/TO/4D-Facial-Avatars",
        "cpu": cpu_info(),
        "threads": torch.get_num_threads(),
        "matmul_gflops_fp32": round(matmul_gflops(torch.float32), 1),
        "commit": head_commit(),
        "reference_config": CONFIG,
        "reference_change": "its density relu is clamp_min(0) during its iteration (see _relu_saving_its_input)",
        "sampling": {**sampling, "ours": {"rays": cfg.rays, "coarse": cfg.coarse_samples, "fine": cfg.fine_samples}},
        "parameters": {"reference": reference_parameters, "ours": 2 * sum(p.numel() for p in ours.parameters())},
        "rounds": [],
    }
    precisions = ["fp32"] + (["auto"] if cpu_info()["native_bf16"] else [])
    for _ in range(2):  # alternated, so a drift of the machine's speed hits both
        entry = {"reference": round(timed(step, REPEATS), 3)}
        for precision in precisions:
            entry[f"ours_{precision}"] = round(step_seconds("paper", precision, REPEATS, EXPRESSION_DIM), 3)
        figures["rounds"].append(entry)
        print(entry, flush=True)
    best = {k: min(r[k] for r in figures["rounds"]) for k in figures["rounds"][0]}
    figures["best_seconds"] = best
    figures["speed_up"] = {k: round(best["reference"] / v, 2) for k, v in best.items() if k != "reference"}
    _write("nerface_reference.json", figures)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(Path(sys.argv[1]).resolve())

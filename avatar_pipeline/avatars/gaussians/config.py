"""The typed config of a Gaussian-splatting head avatar and its presets.

FlashAvatar (Xiang et al., CVPR 2024) is the anchor; its published code (USTC3DV/FlashAvatar-code) gave
the numbers the paper leaves out: a 128 x 128 raster of the UV map, an offset network of 6 layers of 256
ReLU units on the canonical position encoded with 8 frequencies and the expression, spherical harmonics of
degree 3 raised one degree every 500 steps, opacity starting at 0.1, Adam learning rates (colour 2.5e-3 and
a twentieth of it for the higher harmonics, opacity 0.05, scale 5e-3, rotation 1e-3, network 1e-4), a
Huber colour loss (delta 0.1) with 40 x weight inside the mouth, a perceptual term at 0.05 after 15k of
150k steps.

`paper`: those settings at 512 px (150k steps, for a GPU), the head alone. `fast`: 256 px, a smaller offset
network and larger steps, for 2 CPU cores in minutes (bench/gaussians_bench.py measures it), with body
Gaussians for the rest of the person.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from ..base import AvatarConfig


@dataclasses.dataclass(frozen=True)
class GaussianConfig(AvatarConfig):
    size: int = 512
    steps: int = 150_000
    checkpoint_every: int = 5000
    validate_every: int = 5000
    protocols: tuple[str, ...] = ("tracked",)
    head_model: str = "any"  # the tracking stage's model.kind the avatar must be built on: any, ict, flame, builtin
    # the Gaussians: a regular raster of each UV chart's square, about `gaussians` of them over the head
    gaussians: int = 14_000
    sh_degree: int = 3
    sh_every: int = 500  # steps between raising the spherical harmonics' degree by one
    initial_opacity: float = 0.1
    initial_scale: float = 1.0  # times the RMS distance to the three nearest neighbours (FlashAvatar: 1)
    max_scale: float = 0.05  # largest axis (metres of the head model); keeps a stray Gaussian from flooding the image
    # about this many more Gaussians for the person pixels the head mesh leaves uncovered (neck, shoulders,
    # clothes, long hair), held in the still camera's space (body.py); 0: the head alone, as FlashAvatar
    body_gaussians: int = 0
    body_depth: float = 0.05  # metres behind the head's centre where they start, on a plane facing the camera
    body_position_lr: float = 1e-4  # metres
    # the offset network: encoded canonical position and the frame's conditions -> position, rotation, scale
    frequencies: int = 8
    network_width: int = 256
    network_depth: int = 6
    max_offset: float = 0.05  # metres; the position offset is tanh-bounded to it
    # Adam learning rates
    colour_lr: float = 2.5e-3  # the SH's constant term; the higher degrees at a twentieth
    opacity_lr: float = 0.05
    scale_lr: float = 5e-3
    rotation_lr: float = 1e-3
    network_lr: float = 1e-4
    final_lr_ratio: float = 1.0  # every rate decays exponentially to this share of itself by the last step
    # losses
    huber_delta: float = 0.1
    w_mouth: float = 40.0  # extra Huber weight inside the parsing's mouth and lips
    w_perceptual: float = 0.05  # LPIPS (VGG) inside the head mask, when its weights are present
    perceptual_from: float = 0.1  # share of the steps after which the perceptual term is on
    # auto: gsplat on CUDA when installed, else numba on a CPU and torch elsewhere; numba (compiled CPU loops),
    # torch (tensor operations, any device), gsplat
    rasterizer: str = "auto"
    # evaluation
    ply_frames: int = 0  # test frames written as per-frame PLYs (the canonical one is always written)
    slider_expressions: int = 6  # expressions offered in the report's slider page
    slider_steps: int = 9  # renders per slider

    evaluation_keys: ClassVar[tuple[str, ...]] = ("ply_frames", "slider_expressions", "slider_steps")
    resumable_keys: ClassVar[tuple[str, ...]] = ("rasterizer",)
    added_keys: ClassVar[dict[str, object]] = {"body_gaussians": 0, "body_depth": 0.05, "body_position_lr": 1e-4}


PRESETS: dict[str, dict] = {
    "paper": {},
    "fast": {
        "size": 256,
        "steps": 6000,
        "checkpoint_every": 500,
        "validate_every": 1000,
        "network_width": 128,
        "network_depth": 4,
        "sh_every": 300,
        # thousands of steps instead of 150k: larger steps (lp_d18 at 128 px, 300 steps: held-out head PSNR
        # 27.0 dB against 20.4 at FlashAvatar's rates), and Gaussians starting half as wide (27.1 dB, 22% fewer
        # pixel-Gaussian pairs to composite)
        "colour_lr": 0.025,
        "scale_lr": 0.02,
        "network_lr": 1e-3,
        "initial_scale": 0.5,
        "final_lr_ratio": 0.1,
        # the rest of the person too, so the full frame is modelled as NeRFace's field models it (dt_W009,
        # 16 minutes each: full-frame test PSNR 28.3 dB against 24.5 for the head alone, head 27.4 against 27.2)
        "body_gaussians": 4000,
        "video_frames": 60,
        "orbit_frames": 24,
    },
}

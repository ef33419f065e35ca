"""The typed config of a NeRFace avatar and its presets.

An avatar section of config.yaml names a preset and may override any key of it:

    avatars:
      nerface_fast: {method: nerface, preset: fast}
      nerface_big:  {method: nerface, preset: fast, size: 256, steps: 20000}

`paper` is Gafni et al. 2021 as written (512 px, 8x256 backbone, 4x128 colour branch, 64 + 64 samples,
2048 rays, Adam 5e-4, 400k steps); `fast` is what fits in 20 to 40 minutes on two CPU cores.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from ..base import AvatarConfig
from .field import FieldConfig


@dataclasses.dataclass(frozen=True)
class NeRFaceConfig(AvatarConfig):
    size: int = 512
    steps: int = 400_000
    checkpoint_every: int = 1000
    validate_every: int = 5000
    protocols: tuple[str, ...] = ("optimised", "first_train_frame")
    rays: int = 2048
    head_fraction: float = 0.95
    coarse_samples: int = 64
    fine_samples: int = 64
    learning_rate: float = 5e-4
    final_learning_rate: float = 5e-4  # exponential decay to this at the last step (the paper: none)
    latent_weight: float = 0.05
    # weight of the squared difference between the rendered foreground alpha and the parsing stage's person
    # matte (0: NeRFace's RGB loss only, which leaves the head half transparent over the background)
    mask_weight: float = 0.0
    # weight of Mip-NeRF 360's distortion loss on both passes' sample weights (0: the paper, none): it pulls each
    # ray's weight into one short stretch, so the fields become opaque surfaces and empty space instead of fog,
    # which the occupancy grid and early ray termination can then skip
    distortion_weight: float = 0.0
    # share of the head-box rays drawn where the running colour error is largest (0: the paper's uniform draw)
    error_sampling: float = 0.0
    latent_dim: int = 32
    width: int = 256
    depth: int = 8
    colour_width: int = 128
    colour_depth: int = 4
    # resolutions of learned feature planes read beside the positional encoding (none in the paper)
    plane_resolutions: tuple[int, ...] = ()
    plane_channels: int = 8
    # metres around the tracked head centre that the rays sample (head, hair, neck, shoulders); positions
    # are divided by it before the positional encoding, so the sampled region is the unit ball NeRF's
    # frequencies are laid out for (in metres the finest period, 2 pi / 2^9, would be 1.2 cm: a soft face)
    scene_radius: float = 0.35
    density_activation: str = "softplus"  # the paper does not say; NeRF's ReLU can die from the first steps
    chunk_samples: int = 8192
    # rendering (not training): samples in the empty cells of an occupancy grid over the scene's cube are
    # skipped. The grid has occupancy_cells a side (0: off) and is measured from the trained fields under
    # occupancy_conditions training frames; a cell is empty when its density, met along the cube's whole
    # width, would absorb less than occupancy_threshold of a ray's light (so skipping changes a pixel by less).
    # Off by default until bench/render_bench.py has measured it on the four clips
    occupancy_cells: int = 0
    # training: a grid of this many cells a side (0: off) kept up to date from the fields as in Instant-NGP
    # (every 16 steps, after 256 steps of warm-up), whose empty cells' samples are skipped (threshold 1e-3)
    train_occupancy_cells: int = 0
    occupancy_conditions: int = 16
    occupancy_threshold: float = 1e-3
    # rendering: a ray's samples behind the point where it has less than 1e-4 of its light left are not
    # computed (early ray termination; a pixel changes by less than 1e-4)
    early_termination: bool = True
    # rendering: > 0 renders with the fine field alone at this many evenly spaced samples per ray (the occupancy
    # grid's empty cells skipped when it is on, early termination when on), as Instant-NGP renders, instead of the
    # coarse pass and its importance samples; 0: the paper's coarse + fine rendering
    march_samples: int = 0
    # rendering: > 0 traces first only the corners of blocks of this many pixels; a block whose colour its corners
    # predict within adaptive_tolerance (their spread, or else the five midpoints traced next) is filled by bilinear
    # interpolation, any other split in four, down to single pixels (adaptive sampling in image space,
    # volume.adaptive_pixels); 0: every pixel traced (the paper). The alpha is exact only where traced
    adaptive_block: int = 0
    adaptive_tolerance: float = 8 / 255
    # rendering with adaptive sampling: a pixel traced inside a block places its fine samples from the weights of
    # the block's corners (their fine weights gathered onto the coarse samples, bilinearly interpolated) instead
    # of a coarse pass of its own; the pixels of the first lattice take the coarse pass. False: every traced
    # pixel takes both passes (the paper)
    neighbour_proposals: bool = False
    # rendering with neighbour_proposals, for the pixels given a proposal: the importance samples they draw from it
    # (0: fine_samples), and their coarse samples left out (empty) where the proposal's bin and both neighbouring bins
    # weigh less than proposal_empty_below (0: every coarse sample computed); the neighbours found empty space there
    proposal_samples: int = 0
    proposal_empty_below: float = 0.0
    # evaluation: test-frame latent codes (and optionally a pose correction) fitted with the network frozen
    latent_steps: int = 100
    latent_rays: int = 256
    latent_learning_rate: float = 0.01
    pose_correction: bool = False

    evaluation_keys: ClassVar[tuple[str, ...]] = (
        "latent_steps",
        "latent_rays",
        "latent_learning_rate",
        "pose_correction",
        "occupancy_cells",
        "occupancy_conditions",
        "occupancy_threshold",
        "early_termination",
        "march_samples",
        "adaptive_block",
        "adaptive_tolerance",
        "neighbour_proposals",
        "proposal_samples",
        "proposal_empty_below",
    )
    resumable_keys: ClassVar[tuple[str, ...]] = ("final_learning_rate", "chunk_samples")
    added_keys: ClassVar[dict[str, object]] = {"train_occupancy_cells": 0, "distortion_weight": 0.0}

    def field(self, expression_dim: int) -> FieldConfig:
        return FieldConfig(
            expression_dim=expression_dim,
            latent_dim=self.latent_dim,
            width=self.width,
            depth=self.depth,
            colour_width=self.colour_width,
            colour_depth=self.colour_depth,
            position_scale=1.0 / self.scene_radius,
            density_activation=self.density_activation,
            plane_resolutions=tuple(self.plane_resolutions),
            plane_channels=self.plane_channels,
        )


PRESETS: dict[str, dict] = {
    "paper": {},
    # smaller networks, fewer samples and rays, a decaying learning rate, feature planes beside the encoding
    # and half the head rays drawn where the error is: a recognizable avatar of a 5-20 s clip at 256 px in
    # 21 minutes on 2 CPU cores with native bf16, about 40 in fp32 (bench/nerface_bench.py measures it)
    "fast": {
        "size": 256,
        "steps": 5000,
        "rays": 1024,
        "coarse_samples": 32,
        "fine_samples": 32,
        "learning_rate": 2e-3,
        "final_learning_rate": 2e-4,
        "width": 128,
        "depth": 4,
        "colour_width": 64,
        "colour_depth": 1,
        "plane_resolutions": (64, 256),
        "error_sampling": 0.5,
        "checkpoint_every": 250,
        "validate_every": 500,
        # rendering: adaptive sampling in image space (block and tolerance tuned on lp_d18 and dt_W009: held-out
        # PSNR within 0.06 dB of every pixel traced, 4-6x fewer rays at 256 px; bench/render_bench.py)
        "adaptive_block": 8,
        # and the pixels traced inside a block placing their samples from its corners' weights instead of a coarse pass
        # of their own (chosen on dt_W009 and checked on lp_d18,
        # the tuning clips; untuned check in README; bench/render_bench.py, `proposals`)
        "neighbour_proposals": True,
        # (proposal_samples 16 with proposal_empty_below 1e-3, chosen on dt_W009 and lp_d18, takes 1.4-1.5x off
        # the samples for -0.03 and -0.01 dB there, but -0.11 and -0.05 dB more on the untuned clips for little
        # time: not the default; bench/render_bench.py, `lean`, and README)
        "latent_steps": 60,
        "video_frames": 60,
        "orbit_frames": 24,
    },
}

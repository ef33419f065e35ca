"""The typed config of a Local Deformation Fields avatar and its presets.

Chen et al., CVPR 2023 (Sec. 3.5 and the supplement). Lengths the paper gives (R, s) are in its units,
which are those of IM Avatar's FLAME, whose vertices it scales by 4 (zhengyuf/IMavatar, code/flame/FLAME.py,
`factor = 4`); the paper takes its head translation from IM Avatar. So one paper unit is 0.25 m here, and
every length below that is named `*_units` is in paper units: the deformation losses are computed in them
too, so the paper's loss weights keep their balance against the colour loss.

`paper`: the paper's schedule at 512 px for a GPU (400k steps, 14k of them pre-training the canonical
TensoRF while its grid grows from 128^3 to 300^3, 2048 rays). `fast`: 256 px, fewer rays and samples, a
smaller grid and fewer test-time steps, with the same structure, for about 30 minutes on 2 CPU cores.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from ..base import AvatarConfig

METRES_PER_UNIT = 0.25  # the paper's unit (IM Avatar's FLAME scaled by 4) in metres


@dataclasses.dataclass(frozen=True)
class LDFConfig(AvatarConfig):
    size: int = 512
    steps: int = 400_000
    checkpoint_every: int = 1000
    validate_every: int = 5000
    protocols: tuple[str, ...] = ("fitted", "first_train_frame")
    rays: int = 2048
    head_fraction: float = 0.95
    # metres around the head-space origin that the rays sample, and the canonical grid's half extent
    scene_radius: float = 0.35
    samples: int = 256  # stratified per ray
    importance_samples: int = 128  # drawn from the stratified samples' weights (0: none)
    # --- canonical field (TensoRF, vector-matrix decomposition) ---
    grid_start: int = 128  # voxels per side at the start of pre-training
    grid_final: int = 300
    # pre-training steps at which the grid grows (log-spaced voxel counts; TensoRF's own schedule)
    grid_growth: tuple[int, ...] = (2000, 3000, 4000, 5500, 7000)
    density_components: int = 16  # per plane-line pair (TensoRF: 16, 16, 16)
    appearance_components: int = 48  # (TensoRF: 48, 48, 48)
    appearance_features: int = 27
    decoder_width: int = 128
    appearance_code: int = 16  # per-frame code in the colour decoder (omega^a)
    prune_threshold: float = 1e-4  # canonical voxels whose density is below this are skipped after growth
    # --- deformation ---
    pretrain_steps: int = 14_000  # canonical field only, deformation networks frozen
    landmarks: str = "34"  # "34": every other of the 68 iBUG landmarks; "5": the supplement's five
    local_fields: bool = True  # False: one global field of about the same parameter count (the ablation)
    attention: bool = True  # False: every field sees the whole expression (the ablation)
    support_units: float = 0.03  # R
    cutoff: float = 1e-4  # tau
    scale_units: float = 0.02  # s
    field_width: int = 40
    field_depth: int = 3
    frequencies: int = 10
    window_steps: int = 40_000  # the encoding's frequencies are windowed in over these steps (Nerfies)
    deformation_code: int = 32  # omega^p
    # --- optimisation ---
    grid_lr: float = 0.02  # TensoRF's rate for the grids
    network_lr: float = 1e-3  # the paper's Adam rate (decoder, deformation, codes)
    final_lr_ratio: float = 0.1  # both decay to this share by the last step (the paper: 1e-3 -> 1e-4)
    # --- loss weights ---
    w_local: float = 0.01
    w_mesh: float = 0.01
    w_deformation: float = 0.5  # the paper's lambda_field (its lambda_def)
    background_deformation: float = 100.0  # lut(x) for points on rays of background pixels
    w_density: tuple[float, float] = (2e-4, 6e-4)  # before and after the first growth of the grid
    w_code: float = 0.01
    surface_weight: float = 1e-4  # F_surf: a sample's rendering weight above this makes it a surface point
    # --- evaluation ---
    fit_steps: int = 10_000  # per-frame codes fitted to the test frames, everything else frozen
    fit_rays: int = 2048
    fit_every: int = 10  # the paper fits every 10th test frame; 1: all of them
    fit_learning_rate: float = 1e-3
    # rendering: a ray's samples behind the point where it has less than 1e-4 of its light left are not
    # computed (early ray termination; a pixel changes by less than 1e-4)
    early_termination: bool = True
    # rendering: > 0 traces first only the corners of blocks of this many pixels; a block whose colour its corners
    # predict within adaptive_tolerance (their spread, or else the five midpoints traced next) is filled by bilinear
    # interpolation, any other split in four, down to single pixels (adaptive sampling in image space,
    # volume.adaptive_pixels); 0: every pixel traced (the paper). The alpha is exact only where traced
    adaptive_block: int = 0
    adaptive_tolerance: float = 8 / 255
    # rendering with adaptive sampling: a pixel traced inside a block places its importance samples from the
    # weights of the block's corners (their full pass's weights gathered onto the stratified samples, bilinearly
    # interpolated) instead of a first pass of its own. False: every traced pixel takes both passes
    neighbour_proposals: bool = False

    evaluation_keys: ClassVar[tuple[str, ...]] = (
        "fit_steps",
        "fit_rays",
        "fit_every",
        "fit_learning_rate",
        "early_termination",
        "adaptive_block",
        "adaptive_tolerance",
        "neighbour_proposals",
    )
    resumable_keys: ClassVar[tuple[str, ...]] = ()

    @property
    def support(self) -> float:
        """R in metres."""
        return self.support_units * METRES_PER_UNIT

    @property
    def scale(self) -> float:
        """s in metres."""
        return self.scale_units * METRES_PER_UNIT

    def phase_steps(self) -> list[int]:
        """Steps of each pre-training stretch between growths of the grid, then of the joint training."""
        bounds = [0] + [g for g in self.grid_growth if g < self.pretrain_steps] + [min(self.pretrain_steps, self.steps)]
        stretches = [b - a for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
        return stretches + [max(0, self.steps - self.pretrain_steps)]

    def grid_sizes(self) -> list[int]:
        """Voxels per side of each pre-training stretch, log-spaced in voxel count from start to final."""
        growths = len([g for g in self.grid_growth if g < self.pretrain_steps])
        if growths == 0:
            return [self.grid_start]
        ratio = (self.grid_final / self.grid_start) ** (1 / growths)
        return [int(round(self.grid_start * ratio**k)) for k in range(growths + 1)]


PRESETS: dict[str, dict] = {
    "paper": {},
    "fast": {
        "size": 256,
        "steps": 2000,
        "rays": 1024,
        "samples": 48,
        "importance_samples": 32,
        "grid_start": 64,
        "grid_final": 160,
        "grid_growth": (200, 400),
        "density_components": 8,
        "appearance_components": 24,
        "decoder_width": 64,
        "pretrain_steps": 600,
        "window_steps": 800,
        "checkpoint_every": 250,
        "validate_every": 500,
        # rendering: adaptive sampling in image space (block and tolerance tuned on lp_d18 and dt_W009: held-out
        # PSNR within 0.06 dB of every pixel traced, 4-6x fewer rays at 256 px; bench/render_bench.py)
        "adaptive_block": 8,
        # and the pixels traced inside a block placing their samples from its corners' weights instead of a first pass
        # of their own (chosen on dt_W009 and checked on lp_d18,
        # the tuning clips; untuned check in README; bench/render_bench.py, `proposals`)
        "neighbour_proposals": True,
        "fit_steps": 60,
        "fit_rays": 256,
        "fit_every": 1,
        "fit_learning_rate": 0.01,
        "video_frames": 60,
        "orbit_frames": 24,
    },
}

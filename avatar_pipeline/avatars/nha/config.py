"""The typed config of a Neural Head Avatar and its presets.

Three phases (paper Sec. 3.2, A.3): `geometry` fits the offset network and the per-frame pose and
expression corrections to the colour-free terms; `texture` fits the texture network to the photometric
(and perceptual) terms with the geometry fixed; `joint` fits everything to all terms. Values given per
phase are lists [geometry, texture, joint]; the ones given as [start, end] change linearly over the middle
third of the geometry phase (the authors' schedule: epochs 50 to 100 of 150) and keep the end value after.

`paper`: the paper's networks and the authors' published settings (configs/optimize_avatar.ini of
philgras/neural-head-avatars: learning rates, loss weights, batch sizes 16 / 2 / 2 and the iteration
counts of 750 frames at 150 / 50 / 50 epochs), at 512 px, for a GPU. `fast`: 256 px and smaller networks,
a textured head within 30 minutes on 2 CPU cores (bench/nha_bench.py measures it).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from ..base import AvatarConfig


@dataclasses.dataclass(frozen=True)
class NHAConfig(AvatarConfig):
    size: int = 512
    steps: int = 44_531  # all phases
    phase_fractions: tuple[float, ...] = (0.158, 0.421, 0.421)
    batch: tuple[int, ...] = (16, 2, 2)
    checkpoint_every: int = 500
    validate_every: int = 1000
    protocols: tuple[str, ...] = ("fitted", "tracked")
    # learning rates per phase (Adam): tracked-parameter corrections (translation at a tenth), networks
    flame_lr: tuple[float, ...] = (1e-3, 1e-2, 2e-4)
    offset_lr: tuple[float, ...] = (1e-5, 1e-5, 2e-6)
    texture_lr: tuple[float, ...] = (1e-4, 5e-5, 2e-5)
    texture_weight_decay: tuple[float, ...] = (1e-4, 1e-4, 5e-6)
    # loss weights
    w_rgb: tuple[float, ...] = (0.0, 1.0, 0.05)
    w_perceptual: tuple[float, ...] = (0.0, 10.0, 0.5)
    w_landmarks: tuple[float, ...] = (1e-2, 1e-1, 0.0)
    w_eye_closed: float = 1e5
    w_normal: float = 2e-2
    w_silhouette: tuple[float, ...] = (1e-2, 1e-1)
    w_semantic_hair: tuple[float, ...] = (1e-1, 1e-2)
    w_semantic_ear: float = 1e-1
    w_semantic_eye: float = 1e-1
    w_semantic_mouth: float = 1e-1
    w_laplacian: float = 5e-2
    w_surface: float = 1e-4
    w_edge: float = 10.0
    w_shape: float = 1e-3
    w_expression: float = 1e-3
    w_pose: float = 1e-3
    # the head model the avatar must be built on (the tracking stage's model.kind): any, ict, flame, builtin
    head_model: str = "any"
    # networks (Appendix A.2)
    subdivisions: int | None = None  # None: the model's own (ICT 0, FLAME 1, built-in 2)
    vertex_features: int = 32
    offset_width: int = 128
    offset_depth: int = 6
    mapping_width: int = 256
    texture_features: int = 64
    face_texels: int = 256
    mouth_texels: int = 64
    texture_width: int = 256
    texture_depth: int = 8
    texture_last_width: int = 128
    dynamic_width: int = 128
    normal_width: int = 128
    normal_layers: int = 2
    normal_features: int = 32
    condition_noise: float = 0.1  # the authors' flame_noise: conditioning jitter while fitting the texture
    perceptual_weights: str | None = None  # InsightFace arcface_torch r18 backbone.pth
    rasterizer: str = "auto"
    # evaluation
    fit_steps: int = 50  # test frames: expression and pose corrections fitted to E_joint ("fitted")
    fit_learning_rate: float = 2e-3
    mesh_frames: int = 10  # per-frame meshes exported (test frames)
    texture_size: int = 1024  # baked texture image of the canonical mesh, per chart

    evaluation_keys: ClassVar[tuple[str, ...]] = ("fit_steps", "fit_learning_rate", "mesh_frames", "texture_size")
    resumable_keys: ClassVar[tuple[str, ...]] = ("rasterizer",)

    def phase_steps(self) -> list[int]:
        """Steps of geometry, texture and joint: the total split by phase_fractions."""
        total = sum(self.phase_fractions)
        counts = [int(round(self.steps * f / total)) for f in self.phase_fractions]
        counts[-1] = self.steps - sum(counts[:-1])
        return counts


PRESETS: dict[str, dict] = {
    "paper": {},
    "fast": {
        "size": 256,
        "steps": 1500,
        "phase_fractions": (0.3, 0.3, 0.4),
        "batch": (2, 1, 1),
        "checkpoint_every": 100,
        "validate_every": 250,
        "offset_width": 64,
        "offset_depth": 4,
        "mapping_width": 64,
        "texture_features": 16,
        "face_texels": 256,
        "mouth_texels": 64,
        "texture_width": 96,
        "texture_depth": 4,
        "texture_last_width": 64,
        "dynamic_width": 32,
        "normal_width": 16,
        "normal_layers": 2,
        "normal_features": 8,
        # a few thousand steps instead of the paper's 44 thousand: the networks take larger steps; the
        # per-frame corrections smaller ones, as each step averages over 2 frames, not 16. The offsets at
        # [3e-5, 1e-5, 2e-6] give a smoother, truer surface (bench/nha_geometry.py) but 0.85 dB less head
        # PSNR on lp_d18 (README, "Measured")
        "flame_lr": (1.25e-4, 1.25e-3, 2.5e-5),
        "offset_lr": (1e-4, 1e-5, 2e-5),
        "texture_lr": (1e-3, 1e-3, 2e-4),
        "fit_steps": 20,
        "video_frames": 60,
        "orbit_frames": 24,
        "texture_size": 512,
    },
}

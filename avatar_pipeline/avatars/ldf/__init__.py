"""Local Deformation Fields (Chen et al., CVPR 2023): a TensoRF canonical head deformed by small local
fields centred on tracked landmarks, each seeing only the expression coefficients that move its centre."""

from .. import register
from ..base import MethodSpec
from .config import PRESETS, LDFConfig

SPEC = register(
    MethodSpec(
        name="ldf",
        description="Local Deformation Fields (Chen et al. 2023): landmark-centred deformations of a TensoRF head",
        config=LDFConfig,
        presets=PRESETS,
        default_preset="fast",
        # frames and plate; cameras, expressions and the tracked model (centres, mesh prior, attention masks);
        # the person matte (the deformation term's background weight, the mesh prior's surface samples)
        needs=("crop", "background", "tracking", "parsing"),
        schema="ldf_avatar",
        model=f"{__name__}.model:LDFModel",
        smoke_settings={
            "size": 32,
            "steps": 40,
            "rays": 96,
            "samples": 8,
            "importance_samples": 8,
            "grid_start": 16,
            "grid_final": 24,
            "grid_growth": [8],
            "density_components": 2,
            "appearance_components": 4,
            "appearance_features": 8,
            "decoder_width": 16,
            "field_width": 8,
            "pretrain_steps": 16,
            "window_steps": 10,
            "checkpoint_every": 10,
            "validate_every": 20,
            "fit_steps": 3,
            "fit_rays": 32,
            "fit_every": 2,
            "orbit_frames": 2,
            "sweep_frames": 2,
            "video_frames": 4,
        },
    )
)

"""Neural Head Avatars (Grassal et al., CVPR 2022): the tracked morphable mesh refined by a geometry network
and coloured by a texture network, fitted in three phases (geometry, texture, joint)."""

from .. import register
from ..base import MethodSpec
from .config import PRESETS, NHAConfig

SPEC = register(
    MethodSpec(
        name="nha",
        description="Neural Head Avatars (Grassal et al. 2022): morphable mesh + offset and texture networks",
        config=NHAConfig,
        presets=PRESETS,
        default_preset="fast",
        # frames and plate; the tracked model and parameters; parsing (silhouette, semantic and photometric
        # masks); normals (the normal term); landmarks (landmark and eyelid terms)
        needs=("crop", "background", "tracking", "parsing", "normals", "landmarks"),
        schema="nha_avatar",
        model=f"{__name__}.model:NHAModel",
        smoke_settings={
            "size": 64,
            "steps": 24,
            "phase_fractions": [1, 1, 1],
            "batch": [2, 1, 1],
            "offset_width": 16,
            "offset_depth": 2,
            "mapping_width": 16,
            "texture_features": 4,
            "face_texels": 32,
            "mouth_texels": 8,
            "texture_width": 16,
            "texture_depth": 2,
            "texture_last_width": 16,
            "dynamic_width": 8,
            "normal_width": 4,
            "normal_layers": 1,
            "normal_features": 4,
            "checkpoint_every": 5,
            "validate_every": 12,
            "fit_steps": 2,
            "orbit_frames": 2,
            "sweep_frames": 2,
            "video_frames": 4,
            "mesh_frames": 2,
            "texture_size": 32,
        },
    )
)

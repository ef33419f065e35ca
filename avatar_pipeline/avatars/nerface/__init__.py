"""NeRFace (Gafni et al., CVPR 2021): a dynamic radiance field conditioned on the tracked expression and a
learned per-frame latent code, with the static background as the last sample of every ray."""

from .. import register
from ..base import MethodSpec
from .config import PRESETS, NeRFaceConfig

SPEC = register(
    MethodSpec(
        name="nerface",
        description="NeRFace (Gafni et al. 2021): expression- and latent-conditioned NeRF over a static background",
        config=NeRFaceConfig,
        presets=PRESETS,
        default_preset="fast",
        # the frames, the plate behind the head, cameras and expressions, and the person matte of the mask loss
        needs=("crop", "background", "tracking", "parsing"),
        schema="nerface_avatar",
        model=f"{__name__}.model:NeRFaceModel",
        smoke_settings={
            "size": 32,
            "steps": 40,
            "rays": 128,
            "coarse_samples": 8,
            "fine_samples": 8,
            "width": 32,
            "depth": 2,
            "colour_width": 16,
            "learning_rate": 0.005,
            "checkpoint_every": 10,
            "validate_every": 20,
            "latent_steps": 5,
            "latent_rays": 32,
            "orbit_frames": 4,
            "sweep_frames": 4,
            "video_frames": 6,
        },
    )
)

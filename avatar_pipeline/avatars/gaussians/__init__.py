"""A FlashAvatar-style Gaussian-splatting head avatar (Xiang et al., CVPR 2024) that trains and renders on a
CPU: Gaussians bound to the tracked mesh through its UV map, moved by one offset network, splatted by the
PyTorch rasterizer (rasterizer.py) or by gsplat where CUDA is present."""

from .. import register
from ..base import MethodSpec
from .config import PRESETS, GaussianConfig

SPEC = register(
    MethodSpec(
        name="gaussians",
        description="Gaussian-splatting head avatar after FlashAvatar (Xiang et al. 2024), trained on a CPU",
        config=GaussianConfig,
        presets=PRESETS,
        default_preset="fast",
        # frames and plate; the tracked model and parameters; parsing (head mask, mouth weight)
        needs=("crop", "background", "tracking", "parsing"),
        schema="gaussians_avatar",
        model=f"{__name__}.model:GaussianAvatarModel",
        smoke_settings={
            "size": 64,
            "steps": 24,
            "gaussians": 1500,
            "network_width": 16,
            "network_depth": 2,
            "sh_every": 6,
            "checkpoint_every": 5,
            "validate_every": 12,
            "orbit_frames": 2,
            "sweep_frames": 2,
            "video_frames": 4,
            "slider_expressions": 2,
            "slider_steps": 3,
            "ply_frames": 1,
        },
    )
)

"""68-point landmarks from face-alignment's 2D-FAN (Bulat & Tzimiropoulos), run from its TorchScript
checkpoint without the face-alignment package (whose detectors would download more weights).

The weights need a one-time download by the user (see README); they are looked up in
`landmarks.fan_weights_dir`, then in the torch hub cache where face-alignment stores them.
"""

from __future__ import annotations

import glob
import os
import warnings
from pathlib import Path

import cv2
import numpy as np

from .config import LandmarksConfig
from .errors import InputError

WEIGHT_PATTERNS = ("2DFAN4*.zip", "2DFAN-4*.zip", "2DFAN4*.pt", "2DFAN4*.pth")
INPUT = 256  # network input side
HEATMAP = 64  # heatmap side
REFERENCE_SCALE = 195.0  # face-alignment's box-size normalisation: crop side = 200 * box size / 195


def find_weights(weights_dir: str | None) -> Path:
    searched = []
    if weights_dir:
        searched.append(Path(weights_dir))
    try:
        import torch

        searched.append(Path(torch.hub.get_dir()) / "checkpoints")
    except Exception:  # torch missing: the error below says where we looked
        pass
    for folder in searched:
        for pattern in WEIGHT_PATTERNS:
            hits = sorted(glob.glob(os.path.join(glob.escape(str(folder)), pattern)))
            if hits:
                return Path(hits[-1])
    raise InputError(
        "landmarks.backend: fan",
        f"2D-FAN weights (2DFAN4-*.zip) not found in {', '.join(map(str, searched)) or '(nowhere)'}",
        "on a machine with internet run once: pip install 'avatar-pipeline[fan]' && python -c \"import face_alignment;"
        " face_alignment.FaceAlignment(face_alignment.LandmarksType.TWO_D, device='cpu')\" (this stores them in the "
        "torch hub cache), or copy 2DFAN4-*.zip into landmarks.fan_weights_dir; or use landmarks.backend: mediapipe",
    )


class FanLandmarker:
    def __init__(self, weights: Path):
        import torch

        from .runtime import torch_device

        self.torch, self.device = torch, torch_device()
        try:
            with (
                warnings.catch_warnings()
            ):  # TorchScript is deprecated in torch 2.13, but it is the format these weights ship in
                warnings.simplefilter("ignore", DeprecationWarning)
                self.model = torch.jit.load(str(weights), map_location=self.device).eval()
        except Exception as e:
            raise InputError(
                str(weights),
                f"not a loadable TorchScript 2D-FAN checkpoint ({e})",
                "re-download the file, or point landmarks.fan_weights_dir elsewhere",
            ) from None

    @classmethod
    def from_config(cls, cfg: LandmarksConfig) -> "FanLandmarker":
        return cls(find_weights(cfg.fan_weights_dir))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def predict(self, rgb: np.ndarray, box: tuple[float, float, float, float]) -> np.ndarray:
        """(68, 2) landmarks in pixels for the face in `box` (x0, y0, x1, y1)."""
        x0, y0, x1, y1 = box
        centre = np.array([(x0 + x1) / 2, (y0 + y1) / 2 - 0.12 * (y1 - y0)])
        side = 200.0 * ((x1 - x0) + (y1 - y0)) / REFERENCE_SCALE
        # similarity transform taking the square of `side` around `centre` to the network input
        s = INPUT / side
        to_input = np.array([[s, 0, INPUT / 2 - s * centre[0]], [0, s, INPUT / 2 - s * centre[1]]])
        crop = cv2.warpAffine(rgb, to_input, (INPUT, INPUT), flags=cv2.INTER_LINEAR, borderValue=0)
        x = self.torch.from_numpy(crop).permute(2, 0, 1)[None].float().div(255).to(self.device)
        with self.torch.no_grad():
            out = self.model(x)
        heat = (out[-1] if isinstance(out, (list, tuple)) else out)[0].float().cpu().numpy()
        return self._decode(heat, to_input)

    @staticmethod
    def _decode(heat: np.ndarray, to_input: np.ndarray) -> np.ndarray:
        """Heatmap maxima with a quarter-pixel shift toward the larger neighbour, mapped back to the image."""
        k, h, w = heat.shape
        flat = heat.reshape(k, -1).argmax(1)
        ys, xs = np.divmod(flat, w)
        pts = np.stack([xs, ys], 1).astype(np.float64)
        for i in range(k):
            x, y = xs[i], ys[i]
            if 0 < x < w - 1:
                pts[i, 0] += 0.25 * np.sign(heat[i, y, x + 1] - heat[i, y, x - 1])
            if 0 < y < h - 1:
                pts[i, 1] += 0.25 * np.sign(heat[i, y + 1, x] - heat[i, y - 1, x])
        in_input = (pts + 0.5) * (INPUT / HEATMAP) - 0.5  # heatmap cell centres -> input pixels
        s, tx, ty = to_input[0, 0], to_input[0, 2], to_input[1, 2]
        return np.stack([(in_input[:, 0] - tx) / s, (in_input[:, 1] - ty) / s], 1).astype(np.float32)

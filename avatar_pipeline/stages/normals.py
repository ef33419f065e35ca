"""Stage `normals`: per-frame camera-space normal maps of the face and their validity masks.

Backends:
  mesh     (default) the dense mediapipe mesh (x, y in pixels, relative depth z) triangulated and
           rasterized with smooth, area-weighted vertex normals
  network  a user-given TorchScript network mapping an RGB image (1, 3, H, W in [0, 1]) to normals
           (1, 3, H, W) in the documented camera frame; masked to the face region of the mesh
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np

from .. import cache, facemesh, raster
from ..config import NormalsConfig
from ..errors import InputError
from ..runtime import progress

log = logging.getLogger(__name__)


def mesh_normal_pixels(mp478: np.ndarray, height: int, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The face's covered pixels (rows, columns) and their unit normals (N, 3): x right, y up, z toward
    the camera."""
    tris = facemesh.triangles()
    pts = mp478.astype(np.float64)
    # to a right-handed y-up frame with z toward the camera (mediapipe's z grows away from it)
    vertices = np.stack([pts[:, 0], -pts[:, 1], -pts[:, 2]], 1)
    tri_id = raster.rasterize(pts[:, :2], -pts[:, 2], tris, height, width)
    ys, xs, values = raster.interpolate(raster.vertex_normals(vertices, tris), pts[:, :2], tris, tri_id)
    return ys, xs, values / np.maximum(np.linalg.norm(values, axis=1, keepdims=True), 1e-6)


def mesh_normals(mp478: np.ndarray, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Normal map (H, W, 3) and its mask."""
    ys, xs, values = mesh_normal_pixels(mp478, height, width)
    normal_map = np.zeros((height, width, 3), np.float32)
    normal_map[ys, xs] = values
    mask = np.zeros((height, width), bool)
    mask[ys, xs] = True
    return normal_map, mask


class NetworkNormals:
    def __init__(self, weights: str | None):
        if not weights:
            raise InputError(
                "normals.network_weights",
                "the network backend needs a TorchScript file",
                "set normals.network_weights to your exported model, or use normals.backend: mesh",
            )
        if not Path(weights).exists():
            raise InputError(weights, "normal network weights not found", "fix normals.network_weights")
        import torch

        from ..runtime import torch_device

        self.torch, self.device = torch, torch_device()
        with (
            warnings.catch_warnings()
        ):  # TorchScript is deprecated in torch 2.13, but it is the format these weights ship in
            warnings.simplefilter("ignore", DeprecationWarning)
            self.model = torch.jit.load(weights, map_location=self.device).eval()

    def predict(self, rgb: np.ndarray) -> np.ndarray:
        x = self.torch.from_numpy(rgb).permute(2, 0, 1)[None].float().div(255).to(self.device)
        with self.torch.no_grad():
            n = self.model(x)[0].permute(1, 2, 0).cpu().numpy()
        return n / np.maximum(np.linalg.norm(n, axis=-1, keepdims=True), 1e-6)


def run(store: cache.SubjectCache, cfg: NormalsConfig) -> dict:
    n = store.num_frames()
    size = store.crop_meta()["size"]
    lms = store.landmarks()
    network = NetworkNormals(cfg.network_weights) if cfg.backend == "network" else None
    facing = []
    with cache.staged_dir(store.stage_dir("normals")) as stage, cache.PngWriter() as writer:
        (stage / "normals").mkdir()
        (stage / "mask").mkdir()
        frames = store.iter_frames() if network else ((i, None) for i in range(n))
        for i, frame in progress(frames, n, "normals"):
            rgb, mask = np.zeros((size, size, 3), np.uint8), np.zeros((size, size), np.uint8)
            if lms["valid"][i]:
                ys, xs, values = mesh_normal_pixels(lms["mp478"][i], size, size)
                if network is not None:
                    values = network.predict(frame)[ys, xs]
                rgb[ys, xs] = cache.encode_normals(values)
                mask[ys, xs] = 255
                facing.append(float(np.mean(values[:, 2] > 0)) if len(values) else 0.0)
            writer.write(stage / "normals" / cache.frame_name(i), rgb)
            writer.write(stage / "mask" / cache.frame_name(i), mask)
        info = {
            "version": cache.CACHE_VERSION,
            "backend": cfg.backend,
            "convention": "camera space, x right, y up, z toward the camera; RGB = (n + 1) / 2 * 255",
            "mean_fraction_facing_camera": round(float(np.mean(facing)), 4) if facing else None,
            "frames_without_normals": [int(i) for i in np.flatnonzero(~lms["valid"])],
        }
        cache.write_json(stage / "meta.json", info)
    log.info(
        "normals: %d frames (%s backend), %.1f%% of face pixels face the camera",
        n,
        cfg.backend,
        100 * (info["mean_fraction_facing_camera"] or 0),
    )
    return info

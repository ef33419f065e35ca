"""Stage `landmarks`: per-frame 478-point face mesh with iris (mediapipe), the iBUG-68 subset, validity.

Backends:
  mediapipe  the dense mesh and the 68 points derived from it (default, weights ship with the wheel)
  fan        the dense mesh from mediapipe, the 68 points from face-alignment's 2D-FAN (user weights)
"""

from __future__ import annotations

import logging

import numpy as np

from .. import cache, facemesh
from ..config import LandmarksConfig
from ..mediapipe_models import FaceMeshTracker
from ..runtime import progress

log = logging.getLogger(__name__)


def _box_of(points: np.ndarray) -> tuple[float, float, float, float]:
    return float(points[:, 0].min()), float(points[:, 1].min()), float(points[:, 0].max()), float(points[:, 1].max())


def _box_iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def choose_face(faces: list[np.ndarray], crop_box, previous_center) -> np.ndarray | None:
    """The mesh of the tracked subject: best overlap with the crop stage's face box, else closest to
    the previous frame's face. Meshes that overlap neither are rejected (another person)."""
    if not faces:
        return None
    if crop_box is not None:
        scored = [(_box_iou(_box_of(f[:468]), crop_box), f) for f in faces]
        best_iou, best = max(scored, key=lambda s: s[0])
        return best if best_iou > 0.2 else None
    if previous_center is not None:
        return min(faces, key=lambda f: np.linalg.norm(f[:468, :2].mean(0) - previous_center))
    return max(faces, key=lambda f: (lambda b: (b[2] - b[0]) * (b[3] - b[1]))(_box_of(f[:468])))


def smooth_valid_runs(points: np.ndarray, valid: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian temporal smoothing within each run of consecutive valid frames."""
    from scipy.ndimage import gaussian_filter1d

    out = points.copy()
    if sigma <= 0:
        return out
    idx = np.flatnonzero(valid)
    if len(idx) == 0:
        return out
    breaks = np.flatnonzero(np.diff(idx) > 1) + 1
    for run in np.split(idx, breaks):
        if len(run) > 1:
            out[run] = gaussian_filter1d(points[run], sigma, axis=0, mode="nearest")
    return out


def run(store: cache.SubjectCache, cfg: LandmarksConfig) -> dict:
    meta = store.crop_meta()
    n = len(meta["frames"])
    mp478 = np.full((n, facemesh.NUM_POINTS, 3), np.nan, np.float32)
    valid = np.zeros(n, bool)
    reasons: dict[int, str] = {}
    previous_center = None
    with FaceMeshTracker(cfg.min_confidence) as tracker:
        for i, frame in progress(store.iter_frames(), n, "landmarks: face mesh"):
            faces = tracker.detect(frame)
            face = choose_face(faces, meta["frames"][i]["face_box"], previous_center)
            if face is None:
                reasons[i] = "no face mesh" if not faces else "face mesh does not match the tracked face"
                continue
            mp478[i], valid[i] = face, True
            previous_center = face[:468, :2].mean(0)
    if not valid.any():
        raise RuntimeError(f"{store.root}: the face mesh found no face in any of {n} frames")
    mp478 = smooth_valid_runs(mp478, valid, cfg.smoothing_sigma)
    ibug68 = mp478[:, facemesh.IBUG68_FROM_MP478].copy()
    if cfg.backend == "fan":
        from ..landmarks_fan import FanLandmarker

        with FanLandmarker.from_config(cfg) as fan:
            for i, frame in progress(store.iter_frames(), n, "landmarks: FAN 68"):
                if valid[i]:  # FAN expects a detector-like box: brows to chin, i.e. the 68 points' extent
                    ibug68[i, :, :2] = fan.predict(frame, _box_of(ibug68[i]))
        ibug68 = smooth_valid_runs(ibug68, valid, cfg.smoothing_sigma)
    if len(reasons):
        log.warning("landmarks: no usable face mesh in %d of %d frames: %s", len(reasons), n, _summarise(reasons))
    with cache.staged_dir(store.stage_dir("landmarks")) as stage:
        cache.write_npz(stage / "landmarks.npz", mp478=mp478, ibug68=ibug68, valid=valid)
        info = {
            "version": cache.CACHE_VERSION,
            "backend": cfg.backend,
            "smoothing_sigma": cfg.smoothing_sigma,
            "frames": n,
            "valid_frames": int(valid.sum()),
            "invalid": {str(k): v for k, v in sorted(reasons.items())},
        }
        cache.write_json(stage / "meta.json", info)
    log.info("landmarks: %d/%d frames valid (%s backend)", valid.sum(), n, cfg.backend)
    return info


def _summarise(reasons: dict[int, str], limit: int = 12) -> str:
    keys = sorted(reasons)
    shown = ", ".join(str(k) for k in keys[:limit])
    return shown + (f" ... (+{len(keys) - limit})" if len(keys) > limit else "")

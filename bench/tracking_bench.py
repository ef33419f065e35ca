"""Tracking speed and accuracy.

    .venv/bin/python bench/tracking_bench.py

- speed: landmark fitting of a 500-frame sequence at 512 px (ICT FaceKit, 68 points), wall time and
  peak memory (target: at most 60 s on this 2-core machine);
- synthetic ground truth: ICT sequences (random identity, yaw within +-30 degrees, varied expressions,
  known camera): rotation error, translation error relative to the head width, 2D error at 256 px;
- real clips (../shared/data/videos, 512 px): mean reprojection error of the 68 landmarks, and the
  temporal jitter of the fitted landmarks against the raw ones.
Figures go to bench/results/tracking.json.
"""
from __future__ import annotations

import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED = REPO.parent / "shared"

from avatar_pipeline import cache  # noqa: E402
from avatar_pipeline.config import CropConfig, LandmarksConfig, ModelConfig, TrackingConfig  # noqa: E402
from avatar_pipeline.models import load_model, prepare_ict  # noqa: E402
from avatar_pipeline.models.flame import axis_angle_to_matrix  # noqa: E402
from avatar_pipeline.stages import crop, landmarks, tracking as tracking_stage  # noqa: E402
from avatar_pipeline.tracking import fit  # noqa: E402
from tests.test_tracking import synthetic_sequence  # noqa: E402


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="tracking-bench-"))
    prepare_ict(ModelConfig(kind="ict", ict_path=str(SHARED / "models/ict-facekit-da5f95a.tar.xz")), work / "_models")
    status = work / "_models" / "ict.json"
    model, _ = load_model(ModelConfig(kind="ict"), status)
    report = {"command": "python bench/tracking_bench.py", "date": time.strftime("%Y-%m-%d %H:%M")}

    uv, _, _ = synthetic_sequence(model, n=500, size=512, seed=7)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    result = fit(model, uv, np.ones(uv.shape[:2]), 512, TrackingConfig())
    report["speed_500_frames_512px"] = {
        "seconds": round(time.perf_counter() - t, 2), "target_seconds": 60,
        "iterations": TrackingConfig().rigid_iterations + TrackingConfig().iterations,
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "peak_rss_growth_mib": round((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024, 1),
        "mean_error_px": round(float(result.error_px.mean()), 3)}
    print(report["speed_500_frames_512px"], flush=True)

    synthetic = []
    head_width = float(np.ptp(model.template[:, 0]))
    for seed in range(3):
        uv, rot, trans = synthetic_sequence(model, n=60, size=256, seed=seed)
        res = fit(model, uv, np.ones(uv.shape[:2]), 256, TrackingConfig(focal=2.2))
        r_gt = axis_angle_to_matrix(torch.as_tensor(rot)).numpy()
        r_fit = axis_angle_to_matrix(torch.as_tensor(res.rotation)).numpy()
        angle = np.degrees(np.arccos(np.clip((np.einsum("nij,nij->n", r_gt, r_fit) - 1) / 2, -1, 1)))
        synthetic.append({"seed": seed, "rotation_error_deg_mean": round(float(angle.mean()), 3),
                          "rotation_error_deg_max": round(float(angle.max()), 3),
                          "translation_error_pct_head_width": round(float(
                              (np.linalg.norm(res.translation - trans, axis=1) / head_width).mean() * 100), 3),
                          "lateral_xy_error_pct_head_width": round(float(
                              (np.linalg.norm(res.translation[:, :2] - trans[:, :2], axis=1) / head_width).mean() * 100), 3),
                          "depth_error_pct_head_width": round(float(
                              (np.abs(res.translation[:, 2] - trans[:, 2]) / head_width).mean() * 100), 3),
                          "landmark_error_px_256": round(float(res.error_px.mean()), 3)})
        print(synthetic[-1], flush=True)
    report["synthetic_ict"] = {"frames": 60, "size": 256, "known_focal": True, "head_width_m": round(head_width, 4),
                               "targets": "rotation < 1.5 deg, translation < 2% of head size, 2D < 1 px", "runs": synthetic}

    real = []
    for clip in sorted((SHARED / "data/videos").glob("*.mp4")):
        store = cache.SubjectCache(work, clip.stem)
        crop.run(store, clip, CropConfig(size=512, max_frames=150))
        landmarks.run(store, LandmarksConfig())
        info = tracking_stage.run(store, TrackingConfig(overlay_frames=0), ModelConfig(kind="ict"), status)
        real.append({"clip": clip.name, "frames": info["frames"], "reprojection_error_px_512": info["reprojection_error_px"],
                     "jitter_px": info["landmark_jitter_px"], "fit_seconds": info["seconds"], "focal_px": info["focal_px"]})
        print(real[-1], flush=True)
    report["real_clips_512px"] = real
    out = REPO / "bench/results/tracking.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()

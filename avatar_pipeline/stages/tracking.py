"""Stage `tracking`: fit the morphable model to every frame's landmarks (all frames at once), then
export what the avatar methods read: tracking.npz, NeRFace's transforms_{train,val,test}.json, a
nerfstudio-style transforms.json, an overlay video of the fitted mesh, and optionally one mesh per frame.

By default every model is fitted to mediapipe's face-mesh points: the built-in model has mediapipe's
topology; for ICT FaceKit and FLAME the points are placed on the model's surface per subject
(models/correspondence.py). `tracking.fit_points: ibug68` fits the models' 68 landmarks instead.
Frames without landmarks get no data term; their parameters are interpolated from their neighbours
(marked `interpolated`) and they stay out of training.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import cv2
import numpy as np
import torch

from .. import cache, raster, video
from ..config import ModelConfig, TrackingConfig
from ..geometry import camera_to_head_gl, head_to_camera, project
from ..models import load_model
from ..models.base import MorphableModel
from ..models.correspondence import CorrespondenceError, mediapipe_embedding
from ..render import pick_rasterizer
from ..runtime import progress
from ..tracking import (
    TrackingError,
    fit,
    ibug68_points,
    interpolate_invalid,
    joint_pose,
    mediapipe_points,
)

log = logging.getLogger(__name__)


def model_vertices(model: MorphableModel, data: dict, frames: np.ndarray, subset=None) -> np.ndarray:
    """Camera-space vertices (len(frames), V, 3) of the fitted model."""
    ident = torch.as_tensor(data["identity"])[None].expand(len(frames), -1) if data["identity"].size else None
    expr = torch.as_tensor(data["expression"][frames]) if data["expression"].size else None
    joints = joint_pose(torch.as_tensor(data["joint_rotations"][frames])) if "joint_rotations" in data else None
    with torch.no_grad():
        verts = model.vertices(ident, expr, joints, subset=subset).numpy()
    h2c = data["head_to_camera"][frames]
    return np.einsum("nij,nvj->nvi", h2c[:, :3, :3], verts) + h2c[:, None, :3, 3]


def run(store: cache.SubjectCache, cfg: TrackingConfig, model_cfg: ModelConfig, ict_status: Path | None = None) -> dict:
    crop_meta, split = store.crop_meta(), store.split()
    size, n = crop_meta["size"], len(crop_meta["frames"])
    lms = store.landmarks()
    excluded = {int(k) for k in split["excluded"]}
    usable = lms["valid"] & np.array([i not in excluded for i in range(n)])
    if usable.mean() < 0.5:
        raise TrackingError(
            f"{store.root}: only {usable.sum()} of {n} frames have usable landmarks; "
            "tracking needs most frames (check the QA report of the preprocessing)"
        )
    model, warnings = load_model(model_cfg, ict_status, lms)
    for w in warnings:
        log.warning("tracking: %s", w)
    points, embedding = _fit_points(model, cfg, lms, usable, warnings)
    targets = (lms["mp478"] if points.name == "mediapipe" else lms["ibug68"])[..., :2]
    weights = np.repeat(usable[:, None], targets.shape[1], 1).astype(np.float32)

    iterations = cfg.rigid_iterations + cfg.iterations
    bar = progress(range(iterations), iterations, "tracking: fit", unit="it")

    def report(done, total, loss):
        bar.update(done - bar.n)
        bar.set_postfix(loss=f"{loss:.4f}", refresh=False)

    images = masks = None
    rasterizer = "own"
    if cfg.refine == "photometric":
        rasterizer, why = pick_rasterizer(cfg.rasterizer)
        if rasterizer == "own" and cfg.rasterizer == "auto":
            warnings.append(f"FALLBACK: {why} for the photometric refinement")
            log.warning("tracking: %s", warnings[-1])
        else:
            log.info("tracking: photometric refinement rasterized by %s", why)
        images, masks = _refinement_inputs(store, n, cfg.refine_size)
    result = fit(
        model,
        targets,
        weights,
        size,
        cfg,
        points=points,
        progress=report,
        images=images,
        masks=masks,
        rasterizer=rasterizer,
    )
    bar.close()
    face_px = np.linalg.norm(
        np.nanmax(lms["ibug68"][usable, :, :2], 1) - np.nanmin(lms["ibug68"][usable, :, :2], 1), axis=1
    )
    face_px = float(np.median(face_px))
    bad = usable & (result.error_px > cfg.max_error * face_px)
    if bad.sum() > 0.5 * usable.sum():
        raise TrackingError(
            f"{store.root}: the fit failed on {bad.sum()} of {usable.sum()} frames "
            f"(mean reprojection error {result.error_px[usable].mean():.1f} px); nothing was written"
        )
    fitted = usable & ~bad
    data = {
        "rotation": interpolate_invalid(result.rotation, fitted),
        "translation": interpolate_invalid(result.translation, fitted),
        "expression": interpolate_invalid(result.expression, fitted),
        "identity": result.identity,
        "focal": np.float32(result.focal),
        "image_size": np.int32(size),
        "fitted": fitted,
        "interpolated": ~fitted,
        "error_px": np.where(fitted, result.error_px, np.nan).astype(np.float32),
        "model": np.array(model.name),
        "expression_names": np.array(model.expression_names),
    }
    if result.joint_rotations is not None:
        data["joint_rotations"] = interpolate_invalid(result.joint_rotations, fitted)
    data["head_to_camera"] = head_to_camera(data["rotation"], data["translation"])
    all_frames = np.arange(n)
    tri, bary = model.landmark_vertices()
    uniq, inverse = np.unique(tri, return_inverse=True)
    lmk_cam = (
        model_vertices(model, data, all_frames, uniq)[:, inverse.reshape(tri.shape)] * bary[None, ..., None]
    ).sum(2)
    data["landmarks3d"] = lmk_cam.astype(np.float32)
    data["landmarks2d"] = project(lmk_cam, result.focal, size).astype(np.float32)
    data["landmark_ids"] = model.landmark_ids
    data["fit_point_ids"] = points.columns
    if embedding is not None:
        data["mediapipe_faces"], data["mediapipe_bary"] = embedding.faces, embedding.bary
    ibug68_error = np.linalg.norm(data["landmarks2d"] - lms["ibug68"][:, model.landmark_ids, :2], axis=-1)[fitted]
    jitter_fit, jitter_raw = (
        _jitter(data["landmarks2d"], fitted),
        _jitter(lms["ibug68"][:, model.landmark_ids, :2], fitted),
    )

    with cache.staged_dir(store.stage_dir("tracking")) as stage:
        cache.write_tracking(stage, data)
        cache.write_tracked_model(stage, model)
        _export_nerface(stage, store, data, model, split, size)
        _export_nerfstudio(stage, data, split, size)
        if cfg.overlay_frames:
            _overlay(stage / "overlay.mp4", store, model, data, lms, cfg.overlay_frames, crop_meta)
        if cfg.export_meshes:
            _export_meshes(stage / "meshes", model, data)
        info = {
            "version": cache.CACHE_VERSION,
            "model": model.name,
            "warnings": warnings,
            "fit_landmarks": points.name,
            "fit_points": len(points.columns),
            "correspondence": _embedding_summary(embedding),
            "focal_px": round(result.focal, 2),
            "image_size": size,
            "frames": n,
            "fitted_frames": int(fitted.sum()),
            "interpolated_frames": [int(i) for i in np.flatnonzero(~fitted)],
            "reprojection_error_px": {
                "mean": _r(np.nanmean(data["error_px"])),
                "median": _r(np.nanmedian(data["error_px"])),
                "p95": _r(np.nanpercentile(data["error_px"], 95)),
            },
            "reprojection_error_px_at_512": _r(np.nanmean(data["error_px"]) * 512 / size),
            "ibug68_error_px": _r(np.nanmean(ibug68_error)) if ibug68_error.size else None,
            "landmark_jitter_px": {"fitted": _r(jitter_fit), "raw": _r(jitter_raw)},
            "seconds": round(result.seconds, 2),
            "iterations": cfg.rigid_iterations + cfg.iterations,
            "refinement": result.photometric or "none",
        }
        cache.write_json(stage / "meta.json", info)
    log.info(
        "tracking: %s model, %d/%d frames fitted, reprojection error %.2f px (mean), focal %.0f px, %.1f s",
        model.name,
        fitted.sum(),
        n,
        info["reprojection_error_px"]["mean"],
        result.focal,
        result.seconds,
    )
    return info


def _fit_points(model: MorphableModel, cfg: TrackingConfig, lms: dict, usable: np.ndarray, warnings: list[str]):
    """The model points to fit, and the per-subject mediapipe embedding when one was made (ICT / FLAME);
    a failed embedding falls back to the 68 landmarks with a warning added to `warnings`."""
    if cfg.fit_points == "ibug68":
        return ibug68_points(model, cfg), None
    if model.name == "builtin":
        return mediapipe_points(model, cfg), None
    try:
        embedding = mediapipe_embedding(model, lms["mp478"], usable)
    except CorrespondenceError as error:
        warning = (
            f"FALLBACK: mediapipe's points could not be placed on {model.name} ({error}); fitting its 68 landmarks"
        )
        log.warning("tracking: %s", warning)
        warnings.append(warning)
        return ibug68_points(model, cfg), None
    log.info(
        "tracking: %d of mediapipe's points placed on %s (median distance to the surface %.2f mm; %d left out)",
        len(embedding.point_ids),
        model.name,
        np.median(embedding.distance_m) * 1e3,
        embedding.left_out,
    )
    return mediapipe_points(model, cfg, embedding.faces, embedding.bary, embedding.point_ids), embedding


def _embedding_summary(embedding) -> dict | None:
    if embedding is None:
        return None
    mm = embedding.distance_m * 1e3
    return {
        "points": len(embedding.point_ids),
        "left_out": embedding.left_out,
        "distance_mm": {"median": _r(np.median(mm)), "p95": _r(np.percentile(mm, 95)), "max": _r(mm.max())},
    }


FACE_CLASSES = ("skin", "l_brow", "r_brow", "l_eye", "r_eye", "nose", "u_lip", "l_lip")


def _refinement_inputs(store: cache.SubjectCache, n: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Frames (N, size, size, 3) in [0, 1] and parsed face masks (skin and facial features, not hair,
    mouth interior or background) for the photometric refinement."""
    face_ids = [cache.PARSING_CLASS_ID[c] for c in FACE_CLASSES]
    images = np.empty((n, size, size, 3), np.float32)
    masks = np.empty((n, size, size), bool)
    for i, frame in progress(store.iter_frames(), n, "tracking: load frames"):
        images[i] = cv2.resize(frame, (size, size), interpolation=cv2.INTER_AREA) / 255.0
        labels = cv2.resize(store.read_labels(i), (size, size), interpolation=cv2.INTER_NEAREST)
        masks[i] = np.isin(labels, face_ids)
    return images, masks


def _r(x) -> float:
    return round(float(x), 4)


def _jitter(points: np.ndarray, valid: np.ndarray) -> float:
    """Mean magnitude of the second temporal difference over runs of valid frames (pixels)."""
    ok = valid[2:] & valid[1:-1] & valid[:-2]
    if not ok.any():
        return float("nan")
    acc = points[2:] - 2 * points[1:-1] + points[:-2]
    return float(np.linalg.norm(acc[ok], axis=-1).mean())


def _head_bboxes(model: MorphableModel, data: dict, size: int, chunk: int = 64) -> np.ndarray:
    """NeRFace's bbox of every frame: (N, 4) [y0, y1, x0, x1] as fractions of the image, around the projected
    head (frames in chunks: memory stays flat in clip length). A spread subset of at most 2000 of the head's
    vertices spans the box within a fraction of its 10% margin, at a fraction of the cost."""
    regions = np.concatenate([model.regions[k] for k in ("face", "scalp", "eyes") if len(model.regions[k])])
    regions = regions[np.linspace(0, len(regions) - 1, min(len(regions), 2000)).round().astype(int)]
    frames = np.arange(len(data["rotation"]))
    boxes = []
    for start in range(0, len(frames), chunk):
        uv = project(model_vertices(model, data, frames[start : start + chunk], regions), float(data["focal"]), size)
        (x0, y0), (x1, y1) = uv.min(1).T, uv.max(1).T
        pad_x, pad_y = 0.1 * (x1 - x0), 0.1 * (y1 - y0)
        boxes.append(np.stack([y0 - pad_y, y1 + pad_y, x0 - pad_x, x1 + pad_x], 1))
    return np.clip(np.concatenate(boxes) / size, 0, 1)


def _export_nerface(stage: Path, store: cache.SubjectCache, data: dict, model: MorphableModel, split: dict, size: int):
    """transforms_{train,val,test}.json as NeRFace's loader reads them (file_path without extension,
    relative to the json's folder; camera-to-head transform_matrix; expression; bbox [y0, y1, x0, x1])."""
    folder = stage / "nerface"
    folder.mkdir()
    focal = float(data["focal"])
    c2h = camera_to_head_gl(data["head_to_camera"])
    bboxes = _head_bboxes(model, data, size)
    for name in ("train", "val", "test"):
        frames = [
            {
                "file_path": f"../../crop/frames/{cache.frame_name(i)[:-4]}",
                "transform_matrix": c2h[i].tolist(),
                "expression": data["expression"][i].tolist(),
                "bbox": bboxes[i].tolist(),
                "frame_index": i,
            }
            for i in split[name]
        ]
        cache.write_json(
            folder / f"transforms_{name}.json",
            {
                "camera_angle_x": 2 * math.atan(size / (2 * focal)),
                "intrinsics": [focal, focal, 0.5, 0.5],  # fx, fy in pixels; cx, cy as fractions (NeRFace's convention)
                "frames": frames,
            },
        )


def _export_nerfstudio(stage: Path, data: dict, split: dict, size: int):
    focal = float(data["focal"])
    c2h = camera_to_head_gl(data["head_to_camera"])
    which = {i: name for name in ("train", "val", "test") for i in split[name]}
    frames = [
        {
            "file_path": f"../crop/frames/{cache.frame_name(i)}",
            "transform_matrix": c2h[i].tolist(),
            "expression": data["expression"][i].tolist(),
            "split": which[i],
        }
        for i in sorted(which)
    ]
    cache.write_json(
        stage / "transforms.json",
        {
            "camera_model": "OPENCV",
            "fl_x": focal,
            "fl_y": focal,
            "cx": size / 2,
            "cy": size / 2,
            "w": size,
            "h": size,
            "k1": 0.0,
            "k2": 0.0,
            "p1": 0.0,
            "p2": 0.0,
            "frames": frames,
        },
    )


def _overlay(
    path: Path, store: cache.SubjectCache, model: MorphableModel, data: dict, lms: dict, count: int, crop_meta: dict
):
    """Shaded fitted mesh (face region) over the frames, with detected (green) and fitted (red) landmarks."""
    n = len(data["rotation"])
    frames = np.linspace(0, n - 1, min(n, count)).round().astype(int)
    face = model.regions["face"] if len(model.regions["face"]) else np.arange(model.num_vertices)
    keep = np.isin(model.faces, face).all(1)
    tris = model.faces[keep]
    used, local = np.unique(tris, return_inverse=True)
    tris_local = local.reshape(tris.shape)
    size = int(data["image_size"])
    fps = min(25.0, float(crop_meta["source"]["fps"] or 25.0))
    with video.VideoWriter(path, size, size, fps=fps) as writer:
        cams = {}
        for i in progress(frames, len(frames), "tracking: overlay"):
            if i not in cams:  # the vertices of the next 25 frames in one product
                batch = frames[frames >= i][:25]
                cams = dict(zip(batch.tolist(), model_vertices(model, data, batch, used)))
            cam = cams[i]
            uv = project(cam, float(data["focal"]), size)
            tri_id = raster.rasterize(uv, -cam[:, 2], tris_local, size, size)
            gl = cam * np.array([1, -1, -1])  # to y up, z toward the camera, for shading
            normals = raster.vertex_normals(gl, tris_local[:, [0, 2, 1]])  # image-space winding flips with y
            ys, xs, n_pix = raster.interpolate(normals, uv, tris_local, tri_id)
            shade = np.clip(np.abs(n_pix[:, 2]) / np.maximum(np.linalg.norm(n_pix, axis=1), 1e-6), 0, 1)
            img = store.read_frame(int(i)).astype(np.float32)
            img[ys, xs] = 0.35 * img[ys, xs] + 0.65 * (60 + 180 * shade)[:, None]
            img = img.astype(np.uint8)
            for x, y in lms["ibug68"][i, :, :2]:
                if np.isfinite(x):
                    cv2.circle(img, (int(x), int(y)), 2, (0, 255, 0), -1)
            for x, y in data["landmarks2d"][i]:
                cv2.circle(img, (int(x), int(y)), 1, (255, 0, 0), -1)
            if data["interpolated"][i]:
                cv2.putText(img, "interpolated", (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 0), 1)
            writer.write(img)


def _export_meshes(folder: Path, model: MorphableModel, data: dict):
    import trimesh

    folder.mkdir()
    for i in progress(range(len(data["rotation"])), len(data["rotation"]), "tracking: meshes"):
        verts = model_vertices(model, data, np.array([i]))[0]
        trimesh.Trimesh(verts, model.faces, process=False).export(folder / f"{i:06d}.obj")

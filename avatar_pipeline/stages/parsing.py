"""Stage `parsing`: per-frame face-parsing label maps (CelebAMask-HQ's 19 classes) and a soft person matte.

Backends:
  mediapipe  (default, offline) the person matte from selfie segmentation; skin, brows, eyes, nose,
             lips and mouth from polygons of the face mesh; hair, ears, neck and cloth from the matte
             split by the face's own geometry (chin -> forehead axis), so they follow head roll.
             Eyeglasses, hat, earrings and necklace are never produced by this backend.
  bisenet    the face-parsing BiSeNet for user-given CelebAMask-HQ weights; matte from selfie segmentation.

The classes and their ids are defined with the cache format (cache.PARSING_CLASSES).
"""

from __future__ import annotations

import logging

import cv2
import numpy as np

from .. import cache, facemesh
from ..cache import PARSING_CLASS_ID as CLASS_ID
from ..cache import PARSING_CLASSES as CLASSES
from ..config import ParsingConfig
from ..mediapipe_models import SelfieSegmenter
from ..runtime import progress

log = logging.getLogger(__name__)

# display colours (RGB) for overlays
PALETTE = np.array(
    [
        (0, 0, 0),
        (230, 180, 150),
        (120, 60, 20),
        (150, 80, 30),
        (0, 120, 255),
        (0, 200, 255),
        (200, 200, 200),
        (255, 120, 0),
        (255, 170, 0),
        (255, 255, 0),
        (255, 80, 80),
        (120, 0, 60),
        (220, 0, 80),
        (170, 0, 120),
        (0, 170, 90),
        (0, 255, 200),
        (60, 60, 200),
        (140, 90, 40),
        (90, 90, 90),
    ],
    np.uint8,
)


def _poly(mask: np.ndarray, points: np.ndarray, value: int) -> None:
    cv2.fillPoly(mask, [np.round(points[:, :2]).astype(np.int32)], int(value))


def labels_from_mesh(mp478: np.ndarray, matte: np.ndarray) -> np.ndarray:
    """Label map from one frame's 478 landmarks (crop pixels) and person matte."""
    h, w = matte.shape
    labels = np.zeros((h, w), np.uint8)
    person = matte > cache.PERSON_MATTE
    pts = mp478

    # the face's own frame: `up` from chin to forehead top, `side` towards the subject's left
    chin, top = pts[facemesh.CHIN, :2], pts[facemesh.FOREHEAD_TOP, :2]
    face_h = float(np.linalg.norm(top - chin)) or 1.0
    up = (top - chin) / face_h
    side = np.array([-up[1], up[0]])
    if np.dot(pts[facemesh.LEFT_CHEEK_EDGE, :2] - pts[facemesh.RIGHT_CHEEK_EDGE, :2], side) < 0:
        side = -side
    # a column and a row broadcast to the image: the coordinates are affine in x and y
    rel_x = (np.arange(w, dtype=np.float32) - np.float32(chin[0]))[None]
    rel_y = (np.arange(h, dtype=np.float32) - np.float32(chin[1]))[:, None]
    height = rel_x * np.float32(up[0] / face_h) + rel_y * np.float32(up[1] / face_h)  # 0 at the chin, 1 at the top
    centre_across = float(np.dot(pts[facemesh.FACE_OVAL, :2].mean(0) - chin, side))
    across = rel_x * np.float32(side[0] / face_h) + (rel_y * np.float32(side[1] / face_h) - centre_across / face_h)
    half_width = (
        float(np.linalg.norm(pts[facemesh.LEFT_CHEEK_EDGE, :2] - pts[facemesh.RIGHT_CHEEK_EDGE, :2])) / face_h / 2
    )

    oval = np.zeros((h, w), np.uint8)
    _poly(oval, pts[facemesh.FACE_OVAL], 1)
    outside = person & (oval == 0)
    mouth_level = float(np.dot(pts[13, :2] - chin, up)) / face_h
    brow_level = float(np.dot(pts[105, :2] - chin, up)) / face_h
    nose_level = float(np.dot(pts[2, :2] - chin, up)) / face_h

    labels[outside & (height < mouth_level)] = CLASS_ID["cloth"]
    neck = outside & (height < mouth_level) & (height > -0.55) & (np.abs(across) < half_width * 0.8)
    labels[neck] = CLASS_ID["neck"]
    labels[outside & (height >= mouth_level)] = CLASS_ID["hair"]
    ear_band = (
        outside
        & (height > nose_level - 0.05)
        & (height < brow_level)
        & (np.abs(across) > half_width * 0.85)
        & (np.abs(across) < half_width * 1.25)
    )
    labels[ear_band & (across > 0)] = CLASS_ID["l_ear"]
    labels[ear_band & (across < 0)] = CLASS_ID["r_ear"]

    labels[oval > 0] = CLASS_ID["skin"]
    _poly(labels, pts[facemesh.NOSE][_hull(pts[facemesh.NOSE, :2])], CLASS_ID["nose"])
    _poly(labels, pts[facemesh.LEFT_BROW], CLASS_ID["l_brow"])
    _poly(labels, pts[facemesh.RIGHT_BROW], CLASS_ID["r_brow"])
    _poly(labels, pts[facemesh.LEFT_EYE], CLASS_ID["l_eye"])
    _poly(labels, pts[facemesh.RIGHT_EYE], CLASS_ID["r_eye"])
    _poly(labels, pts[facemesh.UPPER_LIP], CLASS_ID["u_lip"])
    _poly(labels, pts[facemesh.LOWER_LIP], CLASS_ID["l_lip"])
    _poly(labels, pts[facemesh.LIPS_INNER], CLASS_ID["mouth"])
    return labels


def _hull(points: np.ndarray) -> np.ndarray:
    return cv2.convexHull(points.astype(np.float32), returnPoints=False)[:, 0]


def run(store: cache.SubjectCache, cfg: ParsingConfig) -> dict:
    meta = store.crop_meta()
    n = len(meta["frames"])
    lms = store.landmarks()
    counts = np.zeros(len(CLASSES), np.int64)
    bisenet = None
    if cfg.backend == "bisenet":
        from ..parsing_bisenet import BiSeNetParser

        bisenet = BiSeNetParser.from_config(cfg)
    with (
        SelfieSegmenter(landscape=cfg.matte_model == "landscape") as segmenter,
        cache.staged_dir(store.stage_dir("parsing")) as stage,
        cache.PngWriter() as writer,
    ):
        (stage / "labels").mkdir()
        (stage / "matte").mkdir()
        for i, frame in progress(store.iter_frames(), n, "parsing"):
            matte = segmenter.matte(frame)
            if bisenet is not None:
                labels = bisenet.parse(frame)
            elif lms["valid"][i]:
                labels = labels_from_mesh(lms["mp478"][i], matte)
            else:  # no face geometry: person pixels only, without face classes
                labels = np.where(matte > cache.PERSON_MATTE, CLASS_ID["cloth"], 0).astype(np.uint8)
            counts += np.bincount(labels.ravel(), minlength=len(CLASSES))
            writer.write(stage / "labels" / cache.frame_name(i), labels)
            writer.write(stage / "matte" / cache.frame_name(i), np.round(matte * 255).astype(np.uint8))
        info = {
            "version": cache.CACHE_VERSION,
            "backend": cfg.backend,
            "classes": list(CLASSES),
            "class_fraction": {c: round(float(v) / max(1, counts.sum()), 5) for c, v in zip(CLASSES, counts)},
            "frames_without_face_classes": [int(i) for i in np.flatnonzero(~lms["valid"])],
        }
        cache.write_json(stage / "meta.json", info)
    log.info("parsing: %d frames (%s backend)", n, cfg.backend)
    return info

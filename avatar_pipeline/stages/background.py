"""Stage `background`: the static background image NeRFace composites behind the head.

From a plate (the scene without the person) when the subject has one, cropped with the clip's
window; otherwise estimated from the clip: the per-pixel temporal median over the frames in which
that pixel is outside the dilated person matte. Pixels never seen are inpainted and marked in the
coverage mask. Memory is bounded by `background.max_frames`, whatever the clip length.
"""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np

from .. import cache
from ..config import BackgroundConfig
from ..errors import InputError
from ..runtime import progress

log = logging.getLogger(__name__)


def crop_plate(plate_path: str | Path, crop_meta: dict) -> np.ndarray:
    """Apply the clip's crop window (with the same black padding) to a full-size plate."""
    img = cv2.imread(str(plate_path), cv2.IMREAD_COLOR)
    if img is None:
        raise InputError(
            str(plate_path),
            "background plate is missing or not a readable image",
            "give a PNG/JPEG of the empty scene, or remove the subject's background entry",
        )
    src = crop_meta["source"]
    if img.shape[:2] != (src["height"], src["width"]):
        raise InputError(
            str(plate_path),
            f"plate is {img.shape[1]}x{img.shape[0]} but the video is {src['width']}x{src['height']}",
            "use a plate taken with the same camera framing at the video's resolution",
        )
    rgb = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    w = crop_meta["window"]
    left, top, right, bottom = crop_meta["padding_ltrb"]
    padded = cv2.copyMakeBorder(rgb, top, bottom, left, right, cv2.BORDER_CONSTANT, value=(0, 0, 0))
    window = padded[w["y0"] + top : w["y0"] + top + w["side"], w["x0"] + left : w["x0"] + left + w["side"]]
    size = crop_meta["size"]
    interp = cv2.INTER_AREA if size < w["side"] else cv2.INTER_CUBIC
    return cv2.resize(window, (size, size), interpolation=interp)


def masked_median(stack: np.ndarray, usable: np.ndarray, rows_per_chunk: int = 32) -> np.ndarray:
    """Per-pixel median over the frames where `usable` (the mean of the two middle values for an even count,
    as numpy's); NaN where never usable. stack: (K, H, W, 3) uint8.

    Sorted as uint16 with the unusable samples set to 256, past every usable value (8x faster than nanmedian)."""
    k, h, w, _ = stack.shape
    out = np.empty((h, w, 3), np.float32)
    for r in range(0, h, rows_per_chunk):
        rows = slice(r, r + rows_per_chunk)
        values = np.where(usable[:, rows, :, None], stack[:, rows], np.uint16(256)).astype(np.uint16, copy=False)
        values.sort(axis=0)
        count = np.broadcast_to(usable[:, rows].sum(0)[..., None], values.shape[1:])
        lower = np.take_along_axis(values, (np.maximum(count, 1)[None] - 1) // 2, 0)[0]
        upper = np.take_along_axis(values, count[None] // 2, 0)[0]
        out[rows] = np.where(count > 0, (lower.astype(np.float32) + upper) / 2, np.nan)
    return out


def estimate(
    store: cache.SubjectCache, cfg: BackgroundConfig, frame_ids: list[int] | None = None
) -> tuple[np.ndarray, np.ndarray, int]:
    """Median background over `frame_ids` (default: up to max_frames evenly spaced frames).

    Returns the RGB background (uint8, inpainted where never seen), the coverage mask and the number
    of frames used."""
    n = store.num_frames()
    if frame_ids is None:
        frame_ids = sorted(set(np.linspace(0, n - 1, min(n, cfg.max_frames)).round().astype(int).tolist()))
    size = store.crop_meta()["size"]
    radius = max(1, int(round(cfg.dilate * size)))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    stack = np.empty((len(frame_ids), size, size, 3), np.uint8)
    usable = np.empty((len(frame_ids), size, size), bool)
    for k, i in enumerate(progress(frame_ids, len(frame_ids), "background: gather")):
        stack[k] = store.read_frame(i)
        person = (store.read_matte(i) > cfg.matte_threshold).astype(np.uint8)
        usable[k] = cv2.dilate(person, kernel) == 0
    median = masked_median(stack, usable)
    covered = usable.sum(0) >= cfg.min_samples
    median[~covered] = 0
    background = np.clip(np.nan_to_num(median) + 0.5, 0, 255).astype(np.uint8)
    if (~covered).any():
        background = cv2.inpaint(background, (~covered).astype(np.uint8), 5, cv2.INPAINT_TELEA)
    return background, covered, len(frame_ids)


def run(store: cache.SubjectCache, cfg: BackgroundConfig, plate: str | None = None) -> dict:
    meta = store.crop_meta()
    if plate:
        background = crop_plate(plate, meta)
        covered = np.ones(background.shape[:2], bool)
        frames_used, source = 0, "plate"
    else:
        background, covered, frames_used = estimate(store, cfg)
        source = "estimated"
    fraction = float(covered.mean())
    if fraction < 0.5:
        log.warning(
            "background: only %.0f%% of pixels were ever seen without the person; the rest is "
            "inpainted. A background plate (subjects.<name>.background) gives a better result.",
            100 * fraction,
        )
    with cache.staged_dir(store.stage_dir("background")) as stage:
        cache.write_png(stage / "background.png", background)
        cache.write_png(stage / "coverage.png", covered.astype(np.uint8) * 255)
        info = {
            "version": cache.CACHE_VERSION,
            "source": source,
            "plate": plate,
            "covered_fraction": round(fraction, 5),
            "frames_used": frames_used,
        }
        cache.write_json(stage / "background.json", info)
    log.info("background: %s, %.1f%% of pixels observed, %d frames", source, 100 * fraction, frames_used)
    return info

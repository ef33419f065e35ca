"""Stage `crop`: raw video -> fixed square crop of the head, lossless frames, meta.json, split.json.

NeRFace assumes a static camera and background, so ONE window is used for the whole clip: it is
sized from the median face and placed to contain every detected face box (padding with black where
it must extend past the frame). Two decoding passes: a small one to detect faces on every kept
frame, and one at full resolution in which ffmpeg pads, crops and resizes.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path

import numpy as np

from .. import cache, video
from ..config import CropConfig, Subject
from ..errors import InputError
from ..mediapipe_models import FaceBox, FaceDetector
from ..runtime import progress

log = logging.getLogger(__name__)

# below this many training frames a loud warning: the papers train on thousands (1-3 minutes of video)
FEW_TRAIN_FRAMES = 100
# frames kept in memory (at detection size) to find which way up the face is
ORIENTATION_SAMPLES = 12
# how much higher the mean face confidence of a turned orientation must be before the frames are turned
UPRIGHT_MARGIN = 0.05


@dataclasses.dataclass(frozen=True)
class CropWindow:
    """Square window in displayed source pixels; may extend past the frame (padded)."""

    x0: int
    y0: int
    side: int

    def pads(self, width: int, height: int) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) padding needed to keep the window inside the frame."""
        return (
            max(0, -self.x0),
            max(0, -self.y0),
            max(0, self.x0 + self.side - width),
            max(0, self.y0 + self.side - height),
        )

    def to_crop(self, box: FaceBox, size: int) -> FaceBox:
        s = size / self.side
        offset = np.array([self.x0, self.y0], np.float32)
        keypoints = (box.keypoints - offset) * s if box.keypoints is not None else None
        return FaceBox(
            (box.x0 - self.x0) * s,
            (box.y0 - self.y0) * s,
            (box.x1 - self.x0) * s,
            (box.y1 - self.y0) * s,
            box.score,
            keypoints,
        )


def select_frames(index: int, kept: int, cfg: CropConfig) -> bool:
    """Causal frame selection (decided while decoding): range, every n-th, target fps, max count."""
    if index < cfg.start or (cfg.end is not None and index >= cfg.end):
        return False
    if cfg.max_frames is not None and kept >= cfg.max_frames:
        return False
    if (index - cfg.start) % cfg.every_nth:
        return False
    return True


class _FpsSelector:
    """Keep the first frame at or after each tick of the target rate (works for variable frame rate)."""

    def __init__(self, fps: float | None):
        self.period = 1.0 / fps if fps else None
        self.next_time: float | None = None

    def keep(self, t: float) -> bool:
        if self.period is None:
            return True
        if self.next_time is None:
            self.next_time = t
        if t + 1e-6 < self.next_time:
            return False
        self.next_time += self.period * max(1, math.floor((t - self.next_time) / self.period + 1e-6) + 1)
        return True


def iou(a: FaceBox, b: FaceBox) -> float:
    ix = max(0.0, min(a.x1, b.x1) - max(a.x0, b.x0))
    iy = max(0.0, min(a.y1, b.y1) - max(a.y0, b.y0))
    inter = ix * iy
    union = (a.x1 - a.x0) * (a.y1 - a.y0) + (b.x1 - b.x0) * (b.y1 - b.y0) - inter
    return inter / union if union > 0 else 0.0


def track_main_face(detections: list[list[FaceBox]]) -> list[FaceBox | None]:
    """Link boxes over frames (IoU with the last linked box) starting from each face of the first frame
    with faces; keep the track that is largest and most consistent (frames linked x median size)."""
    first = next((i for i, d in enumerate(detections) if d), None)
    if first is None:
        return [None] * len(detections)
    best, best_score = None, -1.0
    for seed in detections[first]:
        track: list[FaceBox | None] = [None] * len(detections)
        last = seed
        for i in range(first, len(detections)):
            match = max(detections[i], key=lambda b: iou(b, last), default=None)
            if match is not None and iou(match, last) > 0.3:
                track[i] = last = match
        linked = [b.size for b in track if b is not None]
        score = len(linked) * float(np.median(linked))
        if score > best_score:
            best, best_score = track, score
    return best


def compute_window(boxes: list[FaceBox], width: int, height: int, cfg: CropConfig) -> CropWindow:
    sizes = np.array([b.size for b in boxes])
    centers = np.array([b.center for b in boxes])
    face = float(np.median(sizes))
    cx, cy = np.median(centers, axis=0)
    cy += cfg.vertical_shift * face
    margin = cfg.margin * face
    bx0, by0 = min(b.x0 for b in boxes), min(b.y0 for b in boxes)
    bx1, by1 = max(b.x1 for b in boxes), max(b.y1 for b in boxes)
    side_min = max(bx1 - bx0, by1 - by0) + 2 * margin
    side = int(math.ceil(max(side_min, min(cfg.scale * face, min(width, height))) - 1e-6))

    def place(center: float, lo_box: float, hi_box: float, extent: int) -> int:
        """Start of the window on one axis: contain every face box (with margin if possible),
        stay inside the frame if possible, else centre on the face."""
        inside = (0, extent - side) if side <= extent else None
        options = [(hi_box + margin - side, lo_box - margin), (hi_box - side, lo_box)]
        for lo, hi in options:
            if inside is not None:
                lo, hi = max(lo, inside[0]), min(hi, inside[1])
            if lo <= hi:
                return int(round(min(max(center - side / 2, lo), hi)))
        lo, hi = options[1]  # the faces alone do not fit inside the frame: pad
        return int(round(min(max(center - side / 2, lo), hi)))

    return CropWindow(place(cx, bx0, bx1, width), place(cy, by0, by1, height), side)


def _detect_pass(info: video.VideoInfo, cfg: CropConfig, detector: FaceDetector):
    """Decode small frames, select the frames to keep, detect faces on each kept frame. Also returns a
    few of the kept small frames, spread over the clip, for the orientation check, as (position among
    the kept frames, frame)."""
    scale = min(1.0, cfg.detect_max_side / max(info.width, info.height))
    dw, dh = max(2, int(round(info.width * scale / 2)) * 2), max(2, int(round(info.height * scale / 2)) * 2)
    report = video.DecodeReport()
    kept_index, kept_time, detections, samples = [], [], [], []
    expected = min((n for n in (info.expected_frames, cfg.max_frames) if n), default=0)
    sample_every = max(1, expected // ORIENTATION_SAMPLES)
    fps_selector = _FpsSelector(cfg.fps)
    decoded = 0
    frames = video.iter_frames(info, [("scale", (dw, dh))], (dw, dh), report)
    for i, frame in enumerate(progress(frames, info.expected_frames, "crop: detect faces")):
        decoded += 1
        t = report.timestamps[i] if i < len(report.timestamps) else i / (info.fps or 25.0)
        if not select_frames(i, len(kept_index), cfg) or not fps_selector.keep(t):
            continue
        if len(kept_index) % sample_every == 0 and len(samples) < ORIENTATION_SAMPLES:
            samples.append((len(kept_index), frame.copy()))
        kept_index.append(i)
        kept_time.append(t)
        sx, sy = info.width / dw, info.height / dh
        to_source = np.array([sx, sy], np.float32)
        detections.append(
            [
                FaceBox(b.x0 * sx, b.y0 * sy, b.x1 * sx, b.y1 * sy, b.score, b.keypoints * to_source)
                for b in detector.detect(frame)
            ]
        )
    video.check_decode(info, report, decoded)
    # showinfo timestamps arrive asynchronously; re-read them now that decoding is over
    if len(report.timestamps) >= decoded:
        kept_time = [report.timestamps[i] for i in kept_index]
    return kept_index, kept_time, detections, decoded, samples


def _turn_from_upright(roll: float) -> float:
    """Degrees (0..180) between a face roll and upright."""
    return min(roll % 360, 360 - roll % 360)


def upright_turn(
    samples: list[tuple[int, np.ndarray]], detections: list[list[FaceBox]], detector: FaceDetector
) -> tuple[int, str]:
    """Clockwise turn (0, 90, 180 or 270) that makes the face upright, and the evidence.

    The sampled frames are tried in all four orientations. BlazeFace's keypoints tell a face on its
    side (rolled by about 90 degrees) from an upright one, but it places them as if upright on an
    upside-down face too; its confidence is what tells those two apart (0.89-0.96 upright against
    0.65-0.81 upside down on the shared clips and the demo clip, either way up). So each orientation
    scores the mean confidence of its upright-looking detections, and a turn must beat the frames as
    they are by a clear margin. The frames as they are were detected already, in the detection pass
    (`detections`, by position among the kept frames)."""
    scores = {}
    for turn in (0, 90, 180, 270):
        total = 0.0
        for position, frame in samples:
            boxes = (
                detections[position]
                if turn == 0
                else detector.detect(np.ascontiguousarray(np.rot90(frame, -turn // 90)))
            )
            if boxes and boxes[0].roll is not None and _turn_from_upright(boxes[0].roll) <= 30:
                total += boxes[0].score
        scores[turn] = total / max(1, len(samples))
    best = max(scores, key=scores.get)
    evidence = f"mean face confidence over {len(samples)} sampled frames per clockwise turn: " + ", ".join(
        f"{turn}: {score:.2f}" for turn, score in scores.items()
    )
    return (best if scores[best] > scores[0] + UPRIGHT_MARGIN else 0), evidence


def default_split(
    n: int, valid: list[bool], test_fraction: float, val_fraction: float, subject: Subject | None
) -> dict:
    """Last `test_fraction` of frames as test (the papers' protocol), `val_fraction` before it as val;
    explicit ranges of the subject override. Invalid frames are left out of every split."""
    n_test = int(round(n * test_fraction))
    n_val = int(round(n * val_fraction))
    ranges = {"train": (0, n - n_test - n_val), "val": (n - n_test - n_val, n - n_test), "test": (n - n_test, n)}
    if subject is not None:
        for name in ("train", "val", "test"):
            explicit = getattr(subject, name)
            if explicit is not None:
                ranges[name] = explicit
    for name, (a, b) in ranges.items():
        if a > b or b > n:
            raise InputError(
                f"subject {subject.name if subject else '?'} {name} range {a}-{b}",
                f"outside the {n} cropped frames",
                "give ranges within 0-%d (end exclusive)" % n,
            )
    return {name: [i for i in range(a, b) if valid[i]] for name, (a, b) in ranges.items()}


def check_split_sizes(split: dict, valid: list[bool], cfg: CropConfig, video_path: str) -> list[str]:
    """Refuse a clip with too few usable training or test frames before any later stage spends time on it;
    a warning (returned and logged) when the training frames are few for an avatar."""
    n_train, n_test = len(split["train"]), len(split["test"])
    if n_train < cfg.min_train_frames or n_test < cfg.min_test_frames:
        raise InputError(
            video_path,
            f"too few usable frames: {n_train} for training and {n_test} for testing ({len(valid)} kept, "
            f"{sum(valid)} with a usable face); an avatar needs at least {cfg.min_train_frames} and "
            f"{cfg.min_test_frames}",
            "use a longer clip with the face in view (the papers use 1-3 minutes), keep more of its frames "
            "(crop.fps, crop.every_nth, crop.max_frames), or lower crop.min_train_frames / crop.min_test_frames",
        )
    if n_train < FEW_TRAIN_FRAMES:
        msg = (
            f"only {n_train} training frames: an avatar trained on so few will not generalise to new "
            "expressions and poses (the papers train on thousands)"
        )
        log.warning("%s: %s", video_path, msg)
        return [msg]
    return []


def run(store: cache.SubjectCache, video_path: str | Path, cfg: CropConfig, subject: Subject | None = None) -> dict:
    info = video.probe(video_path)
    warnings = []
    if info.rotation:
        log.info(
            "%s: rotation metadata %d deg, frames are rotated to %dx%d",
            video_path,
            info.rotation,
            info.width,
            info.height,
        )
    if cfg.rotate != "auto" and int(cfg.rotate):
        info = video.turned(info, int(cfg.rotate))
        log.info("%s: frames turned %s degrees clockwise (crop.rotate)", video_path, cfg.rotate)
    with FaceDetector(cfg.min_face_confidence) as detector:  # one detector for every pass of the stage
        kept_index, kept_time, detections, decoded, samples = _detect_pass(info, cfg, detector)
        if decoded == 1:
            raise video.single_image_error(video_path, "a single frame")
        if cfg.rotate == "auto":
            turn, found = upright_turn(samples, detections, detector)
            log.info("%s: orientation check: %s", video_path, found)
            if turn:
                info = video.turned(info, turn)
                msg = (
                    f"the face is {'upside down' if turn == 180 else 'on its side'} in the video (rotation "
                    f"metadata missing or wrong?): frames turned {turn} degrees clockwise to make it upright "
                    f"({found}); set crop.rotate to a fixed value (0 keeps the frames as they are) to override"
                )
                log.warning("%s: %s", video_path, msg)
                warnings.append(msg)
                kept_index, kept_time, detections, decoded, _ = _detect_pass(info, cfg, detector)
    if not kept_index:
        raise InputError(
            str(video_path),
            f"frame selection kept no frames out of {decoded}",
            "check crop.start / crop.end / crop.every_nth / crop.fps / crop.max_frames",
        )
    track = track_main_face(detections)
    boxes = [b for b in track if b is not None]
    if not boxes:
        raise InputError(
            str(video_path),
            f"no face detected in any of {len(kept_index)} frames",
            "use a clip showing one face, frontal-ish and not too small; or lower crop.min_face_confidence",
        )
    most = max(len(d) for d in detections)
    if most > 1:
        msg = (
            f"several faces detected (up to {most} in one frame): tracking the largest consistent one "
            f"(median face size {np.median([b.size for b in boxes]):.0f} px)"
        )
        log.warning("%s: %s", video_path, msg)
        warnings.append(msg)
    window = compute_window(boxes, info.width, info.height, cfg)
    pads = window.pads(info.width, info.height)
    if any(pads):
        msg = f"crop window extends past the video frame; padded with black (left, top, right, bottom = {pads} px)"
        log.warning("%s: %s", video_path, msg)
        warnings.append(msg)

    frames_meta, valid = [], []
    for out_i, (src_i, t, box) in enumerate(zip(kept_index, kept_time, track)):
        reason = None
        if box is None:
            reason = "no face detected"
        elif (
            box.x0 < -0.1 * box.size
            or box.y0 < -0.1 * box.size
            or box.x1 > info.width + 0.1 * box.size
            or box.y1 > info.height + 0.1 * box.size
        ):
            reason = "face partly outside the video frame"
        valid.append(reason is None)
        crop_box = window.to_crop(box, cfg.size) if box is not None else None
        frames_meta.append(
            {
                "index": out_i,
                "source_frame": src_i,
                "time": round(t, 6),
                "face_box": crop_box.as_list() if crop_box else None,
                "face_score": round(box.score, 4) if box else None,
                "face_keypoints": crop_box.keypoints.round(2).tolist() if crop_box else None,
                "excluded": reason,
            }
        )
    n_bad = len(valid) - sum(valid)
    if n_bad:
        msg = f"{n_bad} of {len(valid)} frames have no usable face; they are excluded from the splits"
        log.warning("%s: %s", video_path, msg)
        warnings.append(msg)
    split = default_split(len(valid), valid, cfg.test_fraction, cfg.val_fraction, subject)
    warnings += check_split_sizes(split, valid, cfg, str(video_path))

    with cache.staged_dir(store.stage_dir("crop")) as stage:
        (stage / "frames").mkdir()
        _write_crops(info, window, kept_index, cfg, stage / "frames")
        split["excluded"] = {m["index"]: m["excluded"] for m in frames_meta if m["excluded"]}
        split["minimums"] = {"train": cfg.min_train_frames, "test": cfg.min_test_frames}
        meta = {
            "version": cache.CACHE_VERSION,
            "source": dataclasses.asdict(info),
            "ffmpeg": video.ffmpeg_tools().source,
            "decoded_frames": decoded,
            "window": dataclasses.asdict(window),
            "padding_ltrb": pads,
            "size": cfg.size,
            "frames": frames_meta,
            "warnings": warnings,
        }
        cache.write_json(stage / "split.json", split)
        cache.write_json(stage / "meta.json", meta)
    log.info(
        "crop: %d frames at %d px from %s (window x=%d y=%d side=%d); train/val/test = %d/%d/%d",
        len(kept_index),
        cfg.size,
        video_path,
        window.x0,
        window.y0,
        window.side,
        len(split["train"]),
        len(split["val"]),
        len(split["test"]),
    )
    return meta


def _write_crops(
    info: video.VideoInfo, window: CropWindow, kept_index: list[int], cfg: CropConfig, frames_dir: Path
) -> None:
    left, top, right, bottom = window.pads(info.width, info.height)
    filters = [("format", {"pix_fmts": "rgb24"})]
    if left or top or right or bottom:
        filters.append(
            (
                "pad",
                {
                    "width": info.width + left + right,
                    "height": info.height + top + bottom,
                    "x": left,
                    "y": top,
                    "color": "black",
                },
            )
        )
    filters.append(("crop", (window.side, window.side, window.x0 + left, window.y0 + top)))
    flags = "area" if cfg.size < window.side else "bicubic"
    filters.append(("scale", {"width": cfg.size, "height": cfg.size, "flags": flags}))
    keep = set(kept_index)
    report = video.DecodeReport()
    out_i = 0
    with cache.PngWriter(cfg.png_compression) as writer:
        frames = video.iter_frames(info, filters, (cfg.size, cfg.size), report)
        for src_i, frame in enumerate(progress(frames, info.expected_frames, "crop: write frames")):
            if src_i in keep:
                writer.write(frames_dir / cache.frame_name(out_i), frame.copy())
                out_i += 1
    if out_i != len(kept_index):
        raise InputError(
            info.path,
            f"second decoding pass gave {out_i} of {len(kept_index)} frames "
            "(file changed while reading, or non-deterministic decoding)",
            "rerun; re-export the clip if it repeats",
        )

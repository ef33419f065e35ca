"""The per-subject cache: its layout and every file format, read and written only through this module.

    results/{subject}/
      crop/                      stage `crop`
        frames/000000.png        RGB frames, crop.size x crop.size, lossless
        meta.json                source video (size, fps, rotation metadata, upright turn, ffmpeg
                                 build), crop window in source pixels (x, y, side; may extend past
                                 the border = padded black),
                                 per frame: source frame number, source timestamp (s), face box in
                                 crop pixels [x0, y0, x1, y1] or null, detector score, the detector's
                                 6 keypoints (eyes, nose tip, mouth, ears), why it is excluded or null
        split.json               {"train": [...], "val": [...], "test": [...], "excluded": {frame: reason},
                                  "minimums": {"train": n, "test": n}} (fewest usable frames an avatar accepts)
      landmarks/                 stage `landmarks`
        landmarks.npz            mp478 float32 (N, 478, 3): x, y in crop pixels, z relative depth in pixels
                                 (mediapipe's, larger = farther); ibug68 float32 (N, 68, 3) derived from it;
                                 valid bool (N,); NaN where not valid
        meta.json                backend, smoothing, invalid frames
      parsing/                   stage `parsing`
        labels/000000.png        uint8 label map, CelebAMask-HQ classes (see parsing.CLASSES)
        matte/000000.png         uint8 soft person matte, 255 = person (the person from PERSON_MATTE on)
        meta.json                backend, class names, per-class pixel fractions
      background/                stage `background`
        background.png           RGB background without the person, crop.size square
        coverage.png             255 where the background was observed, 0 where inpainted
        background.json          source (plate|estimated), covered fraction, frames used
      normals/                   stage `normals`
        normals/000000.png       camera-space normals, RGB = (n + 1) / 2 * 255; axes x right, y up,
                                 z toward the camera (a face seen frontally is (0, 0, 1))
        mask/000000.png          255 where the normal is valid
        meta.json                backend
      qa/                        stage `qa`
        contact_sheet.png, overlay.mp4, summary.json, report.html
      tracking/                  stage `tracking` (conventions in avatar_pipeline/tracking.py)
        tracking.npz             model name; identity (Ki,); per frame: rotation (axis-angle) and
                                 translation (metres), head_to_camera (N, 4, 4; model space -> OpenCV
                                 camera), expression (N, Ke), joint_rotations (N, J, 3) for FLAME; focal (px),
                                 image_size; landmarks2d / landmarks3d (the model's 68 points); error_px
                                 (over the fitted points); fit_point_ids (mediapipe or iBUG indices fitted);
                                 mediapipe_faces / mediapipe_bary (their place on ICT / FLAME); fitted /
                                 interpolated flags
        model.npz                the morphable model as fitted (models.base.MorphableModel.save: template,
                                 bases, faces, UVs when the model has them, region vertex sets), so an
                                 avatar needs nothing but this folder
        meta.json                model, fallback warnings, fitted points, reprojection error, jitter, time
        nerface/transforms_{train,val,test}.json   NeRFace's format (camera-to-head, OpenGL camera)
        transforms.json          nerfstudio-style (OPENCV intrinsics, camera-to-head transforms)
        overlay.mp4              fitted mesh over the frames
        meshes/000000.obj        with tracking.export_meshes
      avatars/{name}/            one folder per configured avatar (config `avatars`), all reading the caches above
        train/checkpoint.pt      model, optimiser and RNG states, phase and step (written atomically; not a
                                 Snakemake output, so a killed job resumes from it)
        train/log.csv            step, phase, loss, psnr, learning_rate, seconds, val_psnr, val_head_psnr (inside the
                                 held-out frame's head mask), loss_<term>...
        train/validation/        ground truth | render of a held-out frame at intervals
        train/done.json          written when training finished: method, steps, seconds, device, precision,
                                 matrix-product throughput, settings
        eval/                    rule `avatar_eval` (see avatars/evaluation.py): metrics_<protocol>.csv,
                                 metrics.json, test/*.png, test.mp4, orbit.mp4, sweep.mp4, reenact.mp4
      report/index.html          rule `report`: everything above a person wants to look at
    results/index.html, metrics.csv      rule `index`: all subjects and avatars
    results/_models/ict.npz, ict.json    ICT FaceKit converted once (shared by all subjects)
      logs/{rule}.log            one log per Snakemake rule

Every stage writes into `<stage>.partial-<pid>/` and renames it into place when complete, so an
interrupted run never leaves a folder that looks finished.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import csv
import io
import json
import os
import shutil
import struct
import tempfile
import zlib
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, TypeVar

import cv2
import numpy as np

from .errors import CacheError

STAGES = ("crop", "landmarks", "parsing", "background", "normals", "qa", "tracking")
# part of every rule's code version: raising it reruns every stage (do so when a format below changes)
CACHE_VERSION = 2

# parsing label ids: CelebAMask-HQ's 19 classes in the order of the widely used BiSeNet face-parsing
# weights (so that backend needs no remapping); l_* / r_* are the subject's own left / right
PARSING_CLASSES = (
    "background",
    "skin",
    "l_brow",
    "r_brow",
    "l_eye",
    "r_eye",
    "eye_g",
    "l_ear",
    "r_ear",
    "ear_r",
    "nose",
    "mouth",
    "u_lip",
    "l_lip",
    "neck",
    "neck_l",
    "cloth",
    "hair",
    "hat",
)
PARSING_CLASS_ID = {name: i for i, name in enumerate(PARSING_CLASSES)}
# the head mask of the metric protocol: every parsed class but these (face, hair, ears, neck, hat stay)
NOT_HEAD_CLASSES = ("background", "cloth")

# tracking.npz: the arrays every reader may rely on (the format is in the module docstring)
TRACKING_ARRAYS = (
    "rotation",
    "translation",
    "head_to_camera",
    "expression",
    "identity",
    "focal",
    "image_size",
    "fitted",
    "model",
    "expression_names",
)
# the parsing's soft person matte (read_matte, in [0, 1]) counts as the person from this value on: the parsing's
# labels, the avatars' person masks and the Gaussian avatar's training target all cut it here
PERSON_MATTE = 0.5
# the avatars' training log: these columns, then one `loss_<term>` column per loss term of the method
TRAINING_LOG_FIELDS = ("step", "phase", "loss", "psnr", "learning_rate", "seconds", "val_psnr", "val_head_psnr")


def frame_name(index: int) -> str:
    return f"{index:06d}.png"


class SubjectCache:
    """Paths and readers of one subject's cache."""

    def __init__(self, results_dir: str | os.PathLike, subject: str):
        self.root = Path(results_dir) / subject
        self.subject = subject

    def stage_dir(self, stage: str) -> Path:
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}")
        return self.root / stage

    def avatar_dir(self, avatar: str) -> Path:
        return self.root / "avatars" / avatar

    def log_path(self, rule: str) -> Path:
        return self.root / "logs" / f"{rule}.log"

    # --- crop -----------------------------------------------------------------------------
    def frame_path(self, index: int) -> Path:
        return self.stage_dir("crop") / "frames" / frame_name(index)

    def crop_meta(self) -> dict:
        return read_json(self.stage_dir("crop") / "meta.json", "crop")

    def split(self) -> dict:
        return read_json(self.stage_dir("crop") / "split.json", "crop")

    def num_frames(self) -> int:
        return len(self.crop_meta()["frames"])

    def read_frame(self, index: int) -> np.ndarray:
        return read_png(self.frame_path(index), "crop", color=True)

    def iter_frames(self) -> Iterator[tuple[int, np.ndarray]]:
        """(index, RGB frame) in order; decoding runs ahead in threads (PNG decoding releases the GIL)."""
        yield from prefetch(range(self.num_frames()), self.read_frame)

    # --- landmarks ------------------------------------------------------------------------
    def landmarks(self) -> dict[str, np.ndarray]:
        path = self.stage_dir("landmarks") / "landmarks.npz"
        data = read_npz(path, "landmarks", required=("mp478", "ibug68", "valid"))
        n = self.num_frames()
        if len(data["valid"]) != n:
            raise CacheError(path, f"has {len(data['valid'])} frames but crop/ has {n}", "landmarks")
        return data

    # --- parsing --------------------------------------------------------------------------
    def labels_path(self, index: int) -> Path:
        return self.stage_dir("parsing") / "labels" / frame_name(index)

    def matte_path(self, index: int) -> Path:
        return self.stage_dir("parsing") / "matte" / frame_name(index)

    def read_labels(self, index: int) -> np.ndarray:
        return read_png(self.labels_path(index), "parsing", color=False)

    def read_matte(self, index: int) -> np.ndarray:
        """Soft matte in [0, 1], float32."""
        return read_png(self.matte_path(index), "parsing", color=False).astype(np.float32) / 255.0

    def read_head_mask(self, index: int) -> np.ndarray:
        """Where the parsing found the head (face, hair, ears, neck): the metric protocol's mask, bool."""
        not_head = [PARSING_CLASS_ID[c] for c in NOT_HEAD_CLASSES]
        return ~np.isin(self.read_labels(index), not_head)

    # --- background -----------------------------------------------------------------------
    def read_background(self) -> np.ndarray:
        return read_png(self.stage_dir("background") / "background.png", "background", color=True)

    def read_coverage(self) -> np.ndarray:
        return read_png(self.stage_dir("background") / "coverage.png", "background", color=False) > 127

    # --- normals --------------------------------------------------------------------------
    def normal_path(self, index: int) -> Path:
        return self.stage_dir("normals") / "normals" / frame_name(index)

    def normal_mask_path(self, index: int) -> Path:
        return self.stage_dir("normals") / "mask" / frame_name(index)

    def read_normals(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Unit normals (H, W, 3) float32 in the documented camera frame, and the validity mask."""
        return decode_normals(self.read_normal_rgb(index)), self.read_normal_mask(index)

    def read_normal_rgb(self, index: int) -> np.ndarray:
        """The normal map as stored (uint8 RGB), for pictures of it."""
        return read_png(self.normal_path(index), "normals", color=True)

    def read_normal_mask(self, index: int) -> np.ndarray:
        return read_png(self.normal_mask_path(index), "normals", color=False) > 127

    # --- tracking -------------------------------------------------------------------------
    def tracking(self) -> dict[str, np.ndarray]:
        return read_npz(self.stage_dir("tracking") / "tracking.npz", "tracking", TRACKING_ARRAYS)

    def tracked_model(self):
        """The morphable model the subject was tracked with (a MorphableModel), as tracking saved it."""
        from .models.base import MorphableModel

        path = self.stage_dir("tracking") / "model.npz"
        if not path.exists():
            raise CacheError(path, "missing (the tracking stage writes it since cache version 2)", "tracking")
        return MorphableModel.load(path)

    # --- avatars --------------------------------------------------------------------------
    def training_dir(self, avatar: str) -> Path:
        return self.avatar_dir(avatar) / "train"

    def evaluation_dir(self, avatar: str) -> Path:
        return self.avatar_dir(avatar) / "eval"

    def training_summary(self, avatar: str) -> dict | None:
        """done.json of a finished training, or None."""
        return read_optional_json(self.training_dir(avatar) / DONE_FILE)

    def evaluation_summary(self, avatar: str) -> dict | None:
        """metrics.json of an evaluation, or None."""
        return read_optional_json(self.evaluation_dir(avatar) / METRICS_FILE)


def write_tracking(folder: Path, data: dict[str, np.ndarray]) -> None:
    missing = [k for k in TRACKING_ARRAYS if k not in data]
    if missing:
        raise ValueError(f"tracking data lacks {missing}")
    write_npz(folder / "tracking.npz", **data)


def write_tracked_model(folder: Path, model) -> None:
    """The fitted morphable model (template, bases, faces, UVs when it has them, regions) beside tracking.npz."""
    with atomic_file(folder / "model.npz", ".tmp.npz") as tmp:
        model.save(tmp)


# --- avatar outputs: done.json, metrics.json, log.csv, per-frame metrics ------------------------
DONE_FILE = "done.json"  # a finished training's summary; its presence is what Snakemake waits for
METRICS_FILE = "metrics.json"  # an evaluation's summary


def write_training_summary(train_dir: Path, summary: dict) -> None:
    write_json(train_dir / DONE_FILE, summary)


def write_evaluation_summary(eval_dir: Path, summary: dict) -> None:
    write_json(eval_dir / METRICS_FILE, summary)


def read_optional_json(path: Path) -> Any:
    """A JSON file's content, or None when it is missing or unreadable (for reports of partial runs)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def training_log_fields(loss_terms: Iterable[str]) -> list[str]:
    return list(TRAINING_LOG_FIELDS) + [f"loss_{term}" for term in loss_terms]


def read_training_log(path: Path) -> list[dict]:
    """Rows of log.csv as dicts of strings ([] when there is none)."""
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def open_training_log(path: Path, fields: list[str], resume_step: int):
    """log.csv opened for appending rows after `resume_step`: rows past it (a killed run logs steps after
    its last checkpoint, or half a row, since rows reach the disk in buffer-sized pieces) are dropped, and
    a fresh run starts a new file with the header. Returns (file, csv writer)."""
    kept = []
    if resume_step > 0:
        for row in read_training_log(path):
            try:
                complete = int(row["step"]) == len(kept) + 1 and row.get(fields[-1]) is not None
            except (TypeError, ValueError, KeyError):
                complete = False
            if not complete or int(row["step"]) > resume_step:
                break
            kept.append(row)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, lineterminator="\n", extrasaction="ignore")
        writer.writeheader()
        writer.writerows(kept)
    f = open(path, "a", newline="")
    return f, csv.writer(f, lineterminator="\n")


def write_frame_metrics(path: Path, rows: list[dict]) -> None:
    """Per-frame metrics (one row per test frame) as CSV, atomically."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, text.getvalue())


# --- formats -----------------------------------------------------------------------------------
def encode_normals(normals: np.ndarray) -> np.ndarray:
    """Unit normals (..., 3) to the stored 8-bit RGB."""
    return np.clip((normals + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)


def decode_normals(rgb: np.ndarray) -> np.ndarray:
    n = rgb.astype(np.float32) / 127.5 - 1.0
    return n / np.maximum(np.linalg.norm(n, axis=-1, keepdims=True), 1e-6)


def read_png(path: Path, rule: str, color: bool) -> np.ndarray:
    if not path.exists():
        raise CacheError(path, "missing", rule)
    img = cv2.imread(str(path), cv2.IMREAD_COLOR if color else cv2.IMREAD_GRAYSCALE)
    if img is None:
        raise CacheError(path, "cannot be decoded (truncated or corrupted PNG)", rule)
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB) if color else img


def write_png(path: Path, image: np.ndarray, compression: int = 1) -> None:
    """Write RGB (H, W, 3) or single-channel uint8 as PNG. Callers write inside a staged folder."""
    Path(path).write_bytes(encode_png(image, compression))


def encode_png(image: np.ndarray, compression: int = 1) -> bytes:
    """A standard 8-bit PNG (greyscale or RGB) of uint8 (H, W) or (H, W, 3), every row with the "Up" filter.

    libpng (through OpenCV) tries all five filters on every row, which made PNG encoding the largest cost of
    preprocessing: one fixed filter computed in numpy and zlib's run-length strategy (at compression <= 1)
    encode a 512 px frame 2x faster (and its PNG decodes 2x faster), at about the same size."""
    image = np.ascontiguousarray(image, np.uint8)
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] != 3):
        raise ValueError(f"PNG of (H, W) or (H, W, 3) uint8 only, not {image.shape}")
    height, width = image.shape[:2]
    rows = image.reshape(height, -1)
    filtered = np.empty((height, rows.shape[1] + 1), np.uint8)
    filtered[:, 0] = 2  # "Up": each byte minus the one above it (modulo 256)
    filtered[0, 1:] = rows[0]
    np.subtract(rows[1:], rows[:-1], out=filtered[1:, 1:])
    strategy = zlib.Z_RLE if compression <= 1 else zlib.Z_DEFAULT_STRATEGY
    deflate = zlib.compressobj(max(compression, 1), zlib.DEFLATED, 15, 9, strategy)
    data = deflate.compress(filtered.data) + deflate.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 2 if image.ndim == 3 else 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", data) + _png_chunk(b"IEND", b"")


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


T = TypeVar("T")


def prefetch(keys: Iterable[int], load: Callable[[int], T], ahead: int = 4) -> Iterator[tuple[int, T]]:
    """Yield (key, load(key)) in order while up to `ahead` loads run in background threads."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        pending: collections.deque = collections.deque()
        for key in keys:
            pending.append((key, pool.submit(load, key)))
            if len(pending) > ahead:
                k, fut = pending.popleft()
                yield k, fut.result()
        while pending:
            k, fut = pending.popleft()
            yield k, fut.result()


class PngWriter:
    """Writes PNGs in background threads (compression releases the GIL), at most `pending` in flight.

    Use as a context manager: leaving it waits for every write and re-raises the first error."""

    def __init__(self, compression: int = 1, pending: int = 8):
        self.compression, self.limit = compression, pending
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=2)
        self._pending: collections.deque = collections.deque()

    def write(self, path: Path, image: np.ndarray) -> None:
        self._pending.append(self._pool.submit(write_png, path, image, self.compression))
        while len(self._pending) > self.limit:
            self._pending.popleft().result()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        try:
            while self._pending:
                self._pending.popleft().result()
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)


def read_json(path: Path, rule: str) -> Any:
    if not path.exists():
        raise CacheError(path, "missing", rule)
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CacheError(path, f"is not valid JSON ({e})", rule) from None


@contextlib.contextmanager
def atomic_file(path: Path, suffix: str = ".tmp") -> Iterator[Path]:
    """A temporary path beside `path` to write; renamed onto `path` when the block succeeds, removed if it
    fails, so a reader never sees half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    try:
        yield Path(tmp)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def write_text(path: Path, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text)


def write_json(path: Path, data: Any) -> None:
    """Atomic JSON write (temp file + rename in the same folder)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, json.dumps(data, indent=1, default=_json_default) + "\n")


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value)}")


def read_npz(path: Path, rule: str, required: tuple[str, ...]) -> dict[str, np.ndarray]:
    if not path.exists():
        raise CacheError(path, "missing", rule)
    try:
        with np.load(path, allow_pickle=False) as data:
            out = {k: data[k] for k in data.files}
    except Exception as e:  # zipfile/ValueError/EOFError on truncation
        raise CacheError(path, f"cannot be read ({type(e).__name__}: {e})", rule) from None
    missing = [k for k in required if k not in out]
    if missing:
        raise CacheError(path, f"lacks arrays {missing}", rule)
    return out


def write_npz(path: Path, **arrays: np.ndarray) -> None:
    with atomic_file(path, ".tmp.npz") as tmp:
        np.savez_compressed(tmp, **arrays)


@contextlib.contextmanager
def staged_dir(final: Path) -> Iterator[Path]:
    """Yield a fresh partial folder; on success replace `final` with it, on failure remove it."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    partial = final.parent / f"{final.name}.partial-{os.getpid()}"
    if partial.exists():
        shutil.rmtree(partial)
    for stale in final.parent.glob(f"{final.name}.partial-*"):
        shutil.rmtree(stale, ignore_errors=True)  # left by a killed run
    partial.mkdir()
    try:
        yield partial
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(final)
    os.replace(partial, final)

"""The subject's frames and caches as every avatar method reads them for training and evaluation: one split
at one resolution, with its images, the background plate, the tracked cameras and conditions, head boxes,
and on request the person mattes, the metric protocol's head masks and the normal maps."""

from __future__ import annotations

import math

import cv2
import numpy as np
import torch

from .. import cache
from ..errors import CacheError, InputError
from ..geometry import camera_rays, camera_to_head_gl


def frame_conditions(data: dict, frames: np.ndarray) -> torch.Tensor:
    """What a frame's avatar is conditioned on from tracking: the expression coefficients, plus the jaw
    rotation for models whose jaw is a joint (FLAME)."""
    parts = [data["expression"][frames]]
    if "joint_rotations" in data:
        parts.append(data["joint_rotations"][frames].reshape(len(frames), -1))
    return torch.as_tensor(np.concatenate(parts, 1), dtype=torch.float32)


class SubjectFrames:
    """One split of a subject at a given resolution: images, background, cameras, conditions, head boxes.
    Only successfully tracked frames; `frames` holds their indices in the subject's cache."""

    def __init__(
        self,
        store: cache.SubjectCache,
        size: int,
        split: str = "train",
        with_masks: bool = False,
        with_images: bool = True,
        with_mattes: bool = False,
        with_labels: bool = False,
        with_normals: bool = False,
        with_landmarks: bool = False,
    ):
        data = store.tracking()
        self.store, self.tracking = store, data
        crop_size = int(data["image_size"])
        splits = store.split()
        frames = [i for i in splits[split] if data["fitted"][i]]
        if not frames:
            raise CacheError(
                store.stage_dir("tracking") / "tracking.npz",
                f"no successfully tracked frame in the {split} split",
                "tracking",
            )
        minimum = splits.get("minimums", {}).get(split, 1)
        if len(frames) < minimum:
            raise InputError(
                f"subject {store.subject}",
                f"only {len(frames)} of the {len(splits[split])} {split} "
                f"frames were tracked; an avatar needs at least {minimum}",
                "see the tracking log and overlay for the frames that failed; use a longer clip or "
                f"lower crop.min_{split}_frames",
            )
        self.frames = np.array(frames)
        self.size, self.focal = size, float(data["focal"]) * size / crop_size
        self.images = torch.stack([_load_rgb(store.read_frame(i), size) for i in frames]) if with_images else None
        background = store.read_background()
        if background.shape[:2] != (crop_size, crop_size):
            raise InputError(
                str(store.stage_dir("background") / "background.png"),
                f"is {background.shape[1]}x{background.shape[0]} but the frames are {crop_size}x{crop_size}",
                "rerun the background rule (or give a background plate of the video's size)",
            )
        self.background = _load_rgb(background, size)
        self.camera_to_head = torch.as_tensor(
            camera_to_head_gl(data["head_to_camera"][self.frames]), dtype=torch.float32
        )
        self.conditions = frame_conditions(data, self.frames)
        meta = cache.read_json(store.stage_dir("tracking") / "nerface" / f"transforms_{split}.json", "tracking")
        boxes = {f["frame_index"]: f["bbox"] for f in meta["frames"]}
        self.boxes = np.array([boxes[i] for i in frames]) * size  # y0, y1, x0, x1 in pixels
        # the parsing stage's soft person mattes, what the rendered foreground alpha is compared with
        self.mattes = torch.stack([_resized(store.read_matte(i), size) for i in frames]) if with_mattes else None
        self.head_masks = None
        if with_masks:  # the metric protocol's head mask, the same for every method
            masks = [store.read_head_mask(i) for i in frames]
            self.head_masks = np.stack(
                [cv2.resize(m.astype(np.uint8), (size, size), interpolation=cv2.INTER_NEAREST) > 0 for m in masks]
            )

        # parsing labels (cache.PARSING_CLASSES) at this size, for methods with semantic losses
        self.labels = (
            np.stack([cv2.resize(store.read_labels(i), (size, size), interpolation=cv2.INTER_NEAREST) for i in frames])
            if with_labels
            else None
        )
        # the normal stage's camera-space normals (y up, z toward the camera) and where they are valid
        self.normals = self.normal_masks = None
        if with_normals:
            pairs = [store.read_normals(i) for i in frames]
            self.normals = torch.stack([_resized(n, size) for n, _ in pairs])
            self.normal_masks = np.stack(
                [cv2.resize(m.astype(np.uint8), (size, size), interpolation=cv2.INTER_NEAREST) > 0 for _, m in pairs]
            )
        # detected iBUG-68 landmarks at this size (x, y in pixels; NaN where the frame has none)
        self.landmarks = (
            torch.as_tensor(store.landmarks()["ibug68"][self.frames, :, :2] * size / crop_size, dtype=torch.float32)
            if with_landmarks
            else None
        )

    def read_person(self, k: int) -> tuple[torch.Tensor, np.ndarray]:
        """Frame k's image (size, size, 3) and where the person is (size, size) (the parsing's matte from
        cache.PERSON_MATTE on, or its head mask), read from the caches whatever this split loaded."""
        index = int(self.frames[k])
        person = _resized(self.store.read_matte(index), self.size).numpy() >= cache.PERSON_MATTE
        head = self.store.read_head_mask(index).astype(np.uint8)
        person |= cv2.resize(head, (self.size, self.size), interpolation=cv2.INTER_NEAREST) > 0
        return _load_rgb(self.store.read_frame(index), self.size), person

    def sample_pixels(self, k: int, count: int, head_fraction: float, rng: np.random.Generator) -> torch.Tensor:
        """`count` pixels (x, y) of frame k, `head_fraction` of them inside the head box."""
        n_head = int(round(count * head_fraction))
        y0, y1, x0, x1 = self.boxes[k]
        head = np.stack([rng.uniform(x0, max(x0 + 1, x1), n_head), rng.uniform(y0, max(y0 + 1, y1), n_head)], 1)
        anywhere = rng.uniform(0, self.size, (count - n_head, 2))
        return torch.as_tensor(np.floor(np.concatenate([head, anywhere])).clip(0, self.size - 1), dtype=torch.float32)

    def colours(self, k: int, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Frame k's and the background's colours at the pixels."""
        return _at_pixels(self.images[k], pixels), _at_pixels(self.background, pixels)

    def sample(
        self, k: int, count: int, head_fraction: float, rng: np.random.Generator, errors: "ErrorMap | None" = None
    ):
        """Rays through sampled pixels of frame k, their pixels, colours, the background behind them and the
        person matte there (None without mattes). With an error map, its share of the head rays follows it."""
        pixels = self.sample_pixels(k, count, head_fraction, rng)
        if errors is not None:
            guided = int(round(count * head_fraction * errors.share))
            pixels[:guided] = errors.sample(k, self.boxes[k], guided, rng)
        origins, dirs = camera_rays(self.camera_to_head[k], self.focal, self.size, pixels)
        matte = None if self.mattes is None else _at_pixels(self.mattes[k], pixels)
        return (pixels, origins, dirs) + self.colours(k, pixels) + (matte,)


def textured_head_model(train: SubjectFrames, head_model: str, model_help: str):
    """The morphable model `train`'s subject was tracked with, for the methods built on its textured mesh:
    it must be the configured `head_model` (or any, when that is "any") and carry texture coordinates."""
    model = train.store.tracked_model()
    if head_model not in ("any", model.name):
        raise InputError(
            f"head_model: {head_model}",
            f"the subject {train.store.subject} was tracked with the {model.name} model, not {head_model}",
            f"set model.kind: {head_model} in config.yaml (tracking and this avatar then rerun), or head_model: any",
        )
    if not model.has_uvs:
        raise InputError(
            str(train.store.stage_dir("tracking") / "model.npz"),
            f"the subject was tracked with the {model.name} model, which has no texture coordinates",
            model_help,
        )
    return model


class ErrorMap:
    """A running estimate of every training frame's squared colour error on a grid of cells, from which a
    share of each step's head rays is drawn (cells in proportion to their error, uniformly within a cell):
    the rays go where the avatar is still wrong (eyes, teeth, hair edges) instead of evenly over the box.

    Cells start at an error of 1 (above any real one), so every cell is visited before the map is trusted."""

    CELL = 8  # pixels
    RATE = 0.3  # weight of a new measurement in a cell's running error

    def __init__(self, frames: int, size: int, share: float):
        self.cells, self.share = -(-size // self.CELL), share
        self.size = size
        self.error = np.ones((frames, self.cells, self.cells))

    def sample(self, k: int, box: np.ndarray, count: int, rng: np.random.Generator) -> torch.Tensor:
        """`count` pixels (x, y) of frame k inside the cells that overlap its head box (y0, y1, x0, x1)."""
        y0, y1, x0, x1 = np.clip((np.asarray(box) // self.CELL).astype(int), 0, self.cells - 1)
        errors = self.error[k, y0 : y1 + 1, x0 : x1 + 1]
        chosen = rng.choice(errors.size, count, p=(errors / errors.sum()).ravel())
        cy, cx = np.unravel_index(chosen, errors.shape)
        corner = np.stack([cx + x0, cy + y0], 1) * self.CELL
        pixels = np.floor(corner + rng.uniform(0, self.CELL, (count, 2))).clip(0, self.size - 1)
        return torch.as_tensor(pixels, dtype=torch.float32)

    def update(self, k: int, pixels: torch.Tensor, squared_error: torch.Tensor) -> None:
        """Blend the mean squared error of the rays that fell in each cell into that cell's estimate."""
        index = pixels.numpy().astype(int) // self.CELL
        flat = index[:, 1] * self.cells + index[:, 0]
        sums = np.bincount(flat, squared_error.numpy().astype(np.float64), self.cells**2)
        counts = np.bincount(flat, minlength=self.cells**2)
        seen = counts > 0
        grid = self.error[k].reshape(-1)
        grid[seen] += self.RATE * (sums[seen] / counts[seen] - grid[seen])


def _at_pixels(image: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
    """The image's values at the pixels (N, 2) (x, y)."""
    return image[pixels[:, 1].long(), pixels[:, 0].long()]


def _resized(image: np.ndarray, size: int) -> torch.Tensor:
    if image.shape[:2] != (size, size):
        image = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)
    return torch.as_tensor(image, dtype=torch.float32)


def _load_rgb(image: np.ndarray, size: int) -> torch.Tensor:
    return _resized(image, size) / 255


def psnr(mse: float) -> float:
    return -10.0 * math.log10(max(mse, 1e-10))

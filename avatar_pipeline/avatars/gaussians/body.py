"""Gaussians for what the head mesh does not cover: neck, shoulders, clothes and hair beyond the scalp.

FlashAvatar models the head alone, so over the full frame its renders show the background plate where the
subject's shoulders are (bench/results/gaussians_compare.json: 30.6 dB inside the head mask, 21.1 over the
frame, where NeRFace's field, which holds the torso, reached 27.0). These Gaussians fill that part of the
person matte. The clips are shot by a still camera (the crop stage keeps one window per clip), so the body is
placed in the camera's space, not the head's: one Gaussian per cell of a regular pixel grid over the person
pixels that the projected head Gaussians leave uncovered in a spread of training frames, back-projected to
a plane just behind the head. A small network moves them with the head pose (the shoulders and the neck
follow the head a little); colour (constant, no view dependence), opacity, scale, rotation and position are
learned per Gaussian. Every view sees them where the video's camera saw them, so a turned-head orbit turns
the head over a still body.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch

from ..data import SubjectFrames
from .rasterizer import Splats, quaternion_product

SPREAD_FRAMES = 24  # training frames whose uncovered person pixels place the Gaussians
# a start above the head's 0.1: they begin with the frame's colours, so the body shows from the first steps
OPACITY = 0.5
HEAD_MARGIN = 5  # pixels (at 256 px) the projected head Gaussians are grown by before a pixel counts as free


def matrix_to_quaternion(matrix: torch.Tensor) -> torch.Tensor:
    """(3, 3) rotation matrix -> its unit quaternion (4,) w, x, y, z. The largest component is taken from
    the diagonal and the others from sums and differences of opposite entries divided by it (Shepperd's
    method), which stays exact near half turns, where w is near 0 (the head-to-camera rotation is one)."""
    m = matrix
    squares = torch.stack(
        [
            1 + m[0, 0] + m[1, 1] + m[2, 2],
            1 + m[0, 0] - m[1, 1] - m[2, 2],
            1 - m[0, 0] + m[1, 1] - m[2, 2],
            1 - m[0, 0] - m[1, 1] + m[2, 2],
        ]
    )  # 4 w², 4 x², 4 y², 4 z²
    largest = int(squares.argmax())
    big = 0.5 * squares[largest].clamp_min(1e-12).sqrt()
    # 4 w x, 4 w y, 4 w z, 4 x y, 4 x z, 4 y z
    wx, wy, wz = m[2, 1] - m[1, 2], m[0, 2] - m[2, 0], m[1, 0] - m[0, 1]
    xy, xz, yz = m[0, 1] + m[1, 0], m[0, 2] + m[2, 0], m[1, 2] + m[2, 1]
    products = {0: (wx, wy, wz), 1: (wx, xy, xz), 2: (wy, xy, yz), 3: (wz, xz, yz)}[largest]
    others = torch.stack(products) / (4 * big)
    quat = torch.cat([others[:largest], big[None], others[largest:]])
    return torch.nn.functional.normalize(quat, dim=0)


def free_person_pixels(
    train: SubjectFrames, head_pixels, frames: np.ndarray, margin: int
) -> tuple[np.ndarray, np.ndarray]:
    """Pixels inside the person in any of `frames` (training frame numbers) that the head Gaussians, projected
    by `head_pixels(k) -> (N, 2)` pixel positions, do not cover there (grown by `margin` pixels): (size, size)
    bool; and the frames' mean image (size, size, 3) where they show the person (grey where none does)."""
    size = train.size
    kernel = np.ones((2 * margin + 1, 2 * margin + 1), np.uint8)
    free = np.zeros((size, size), bool)
    colour_sum, seen = np.zeros((size, size, 3)), np.zeros((size, size, 1))
    for k in frames:
        image, person = train.read_person(int(k))
        covered = np.zeros((size, size), np.uint8)
        xy = np.floor(head_pixels(int(k))).astype(np.int64)
        inside = ((xy >= 0) & (xy < size)).all(1)
        covered[xy[inside, 1], xy[inside, 0]] = 1
        free |= person & ~(cv2.dilate(covered, kernel) > 0)
        colour_sum += image.numpy() * person[..., None]
        seen += person[..., None]
    return free, np.where(seen > 0, colour_sum / np.maximum(seen, 1), 0.5)


def grid_over(region: np.ndarray, count: int) -> tuple[np.ndarray, int]:
    """(M, 2) pixel centres (x, y) of a regular grid over the True pixels of `region`, about `count` of them,
    and the grid's stride in pixels."""
    stride = max(1, int(round(np.sqrt(int(region.sum()) / max(count, 1)))))
    ys, xs = np.mgrid[stride // 2 : region.shape[0] : stride, stride // 2 : region.shape[1] : stride]
    keep = region[ys, xs]
    return np.stack([xs[keep], ys[keep]], 1).astype(np.float32) + 0.5, stride


class BodyGaussians(torch.nn.Module):
    """Gaussians held in the video camera's space (OpenCV: x right, y down, z forward), moved by the head pose."""

    def __init__(
        self,
        pixels: np.ndarray,
        stride: int,
        depth: float,
        focal: float,
        size: int,
        colours: np.ndarray,
        pose_mean: torch.Tensor,
        encode,
        max_offset: float,
        width: int = 64,
        depth_layers: int = 2,
    ):
        super().__init__()
        centre = size / 2
        spacing = depth / focal  # metres per pixel on the plane
        xy = (torch.as_tensor(pixels) - centre) * spacing
        positions = torch.cat([xy, torch.full((len(xy), 1), depth)], 1)
        self.position = torch.nn.Parameter(positions)
        self.log_scale = torch.nn.Parameter(torch.full((len(xy), 3), float(np.log(0.6 * stride * spacing))))
        self.rotation = torch.nn.Parameter(torch.tensor([1.0, 0.0, 0.0, 0.0]).repeat(len(xy), 1))
        start = torch.as_tensor(colours, dtype=torch.float32).clamp(0.02, 0.98)
        self.colour_logit = torch.nn.Parameter(torch.logit(start))
        self.opacity_logit = torch.nn.Parameter(torch.full((len(xy),), float(np.log(OPACITY / (1 - OPACITY)))))
        low, high = positions.min(0).values, positions.max(0).values
        normalised = (positions - (low + high) / 2) / ((high - low).max().clamp_min(1e-6) / 2)
        self.register_buffer("encoded", encode(normalised), persistent=False)
        self.register_buffer("pose_mean", pose_mean, persistent=False)
        self.max_offset = max_offset
        layers, inputs = [], self.encoded.shape[1] + 9
        for _ in range(depth_layers):
            layers += [torch.nn.Linear(inputs, width), torch.nn.ReLU()]
            inputs = width
        last = torch.nn.Linear(inputs, 3)
        torch.nn.init.zeros_(last.weight)
        torch.nn.init.zeros_(last.bias)
        self.network = torch.nn.Sequential(*layers, last)

    @staticmethod
    def pose(head_to_camera: torch.Tensor) -> torch.Tensor:
        """(9,) what the network reads of a head pose: the rotation's first two columns and the translation."""
        return torch.cat([head_to_camera[:3, :2].T.reshape(-1), head_to_camera[:3, 3]])

    def splats(self, head_to_camera: torch.Tensor, max_scale: float) -> Splats:
        """The Gaussians in the head space of a view whose OpenCV head-to-camera transform is `head_to_camera`."""
        pose = (self.pose(head_to_camera) - self.pose_mean) * 10.0  # 0.1 m or ~6 degrees -> 1
        inputs = torch.cat([self.encoded, pose.expand(len(self.encoded), -1)], 1)
        camera = self.position + self.max_offset * torch.tanh(self.network(inputs))
        rotation, translation = head_to_camera[:3, :3], head_to_camera[:3, 3]
        means = (camera - translation) @ rotation  # rotation.T applied to each row
        quats = quaternion_product(matrix_to_quaternion(rotation.T).expand(len(camera), -1), self.rotation)
        scales = torch.exp(self.log_scale.clamp(max=float(np.log(max_scale))))
        return Splats(means, quats, scales, torch.sigmoid(self.opacity_logit), torch.sigmoid(self.colour_logit))

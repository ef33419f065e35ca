"""Camera and rotation conventions, in one place for the stages and the avatars.

Model (head) space: metres, y up, the face looking along +z. Camera space is OpenCV's (x right, y down,
z forward); a model point X maps to R(r) F X + t with F = diag(1, -1, -1), so rotation r = 0 is a face
looking straight into the camera. Pinhole projection with the principal point at the image centre and
one focal length in pixels. The avatars take camera-to-head transforms in the OpenGL convention (camera
looking along -z, y up), as NeRF loaders do; `camera_to_head_gl` converts.
"""

from __future__ import annotations

import numpy as np
import torch

FLIP = torch.diag(torch.tensor([1.0, -1.0, -1.0]))  # F above: model axes to the camera axes at r = 0
GL_FROM_CV = np.diag([1.0, -1.0, -1.0, 1.0]).astype(np.float32)


def axis_angle_to_matrix(aa: torch.Tensor) -> torch.Tensor:
    """Rodrigues: (..., 3) axis-angle -> (..., 3, 3), stable at zero."""
    angle = aa.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    axis = aa / angle
    x, y, z = axis.unbind(-1)
    zero = torch.zeros_like(x)
    k = torch.stack([zero, -z, y, z, zero, -x, -y, x, zero], -1).reshape(aa.shape[:-1] + (3, 3))
    s, c = angle.sin()[..., None], angle.cos()[..., None]
    eye = torch.eye(3, dtype=aa.dtype, device=aa.device).expand(k.shape)
    return eye + s * k + (1 - c) * (k @ k)


def matrix_to_axis_angle(matrix: torch.Tensor) -> torch.Tensor:
    """(3, 3) rotation -> (3,) axis-angle (angles below pi); the inverse of axis_angle_to_matrix."""
    angle = torch.arccos(((torch.trace(matrix) - 1) / 2).clamp(-1, 1))
    axis = torch.stack([matrix[2, 1] - matrix[1, 2], matrix[0, 2] - matrix[2, 0], matrix[1, 0] - matrix[0, 1]])
    if float(angle) < 1e-6:
        return axis / 2
    return axis / (2 * torch.sin(angle)) * angle


def head_to_camera(rotation: np.ndarray, translation: np.ndarray) -> np.ndarray:
    """(N, 4, 4) transforms from model space to OpenCV camera space for axis-angle `rotation` (N, 3)."""
    rot = axis_angle_to_matrix(torch.as_tensor(rotation, dtype=torch.float32)) @ FLIP
    out = np.tile(np.eye(4, dtype=np.float32), (len(rotation), 1, 1))
    out[:, :3, :3] = rot.numpy()
    out[:, :3, 3] = translation
    return out


def camera_to_head_gl(head_to_camera: np.ndarray) -> np.ndarray:
    """(N, 4, 4) camera-to-head transforms in the OpenGL/Blender camera convention (what NeRF loaders read)."""
    return np.linalg.inv(GL_FROM_CV @ head_to_camera).astype(np.float32)


def head_to_camera_cv(camera_to_head: torch.Tensor) -> torch.Tensor:
    """(..., 4, 4) OpenCV head-to-camera transforms of OpenGL camera-to-head ones (camera_to_head_gl inverted)."""
    return torch.as_tensor(GL_FROM_CV) @ torch.linalg.inv(camera_to_head)


def project(points, focal: float, size: int):
    """OpenCV camera-space points (..., 3) to pixel positions (..., 2) of a size x size image (numpy arrays
    or torch tensors; pixel i spans [i, i + 1), its centre at i + 0.5)."""
    return focal * points[..., :2] / points[..., 2:].clip(min=1e-6) + size / 2


def camera_rays(camera_to_head: torch.Tensor, focal: float, size: int, pixels: torch.Tensor):
    """Rays in head space through pixel centres (N, 2) (x, y) of a size x size image.

    camera_to_head (4, 4) in the OpenGL convention. Returns origins (N, 3) and unit directions (N, 3)."""
    centre = size / 2.0
    x = (pixels[:, 0] + 0.5 - centre) / focal
    y = -(pixels[:, 1] + 0.5 - centre) / focal
    d_cam = torch.stack([x, y, -torch.ones_like(x)], -1)
    directions = torch.nn.functional.normalize(d_cam @ camera_to_head[:3, :3].T, dim=-1)
    return camera_to_head[:3, 3].expand_as(directions), directions


def rigidly_moved(camera_to_head: torch.Tensor, correction: torch.Tensor) -> torch.Tensor:
    """camera_to_head (T, 4, 4) moved by per-frame head-space corrections (T, 6): axis-angle, translation."""
    rotation = axis_angle_to_matrix(correction[:, :3])
    out = camera_to_head.clone()
    out[:, :3, :3] = rotation @ camera_to_head[:, :3, :3]
    out[:, :3, 3] = (rotation @ camera_to_head[:, :3, 3:])[..., 0] + correction[:, 3:]
    return out


def turned_about_head(camera_to_head: torch.Tensor, yaw: float) -> torch.Tensor:
    """The camera (4, 4) moved around the head's vertical axis by `yaw` radians (the head seen turned)."""
    turn = torch.eye(4)
    turn[:3, :3] = axis_angle_to_matrix(torch.tensor([[0.0, yaw, 0.0]]))[0]
    return turn @ camera_to_head

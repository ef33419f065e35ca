"""The project's own differentiable mesh renderer (PyTorch3D cannot be installed here).

Visibility comes from a hard rasterization (raster.rasterize: no gradient, like a z-buffer); for every
covered pixel the barycentric weights are then recomputed in torch from the projected vertices of its
triangle, so rendered attributes are differentiable with respect to vertex positions and attributes
(the approach of deferred differentiable rasterizers). Screen-space barycentrics: exact for attributes
on small triangles, which is what a dense head mesh has at the resolutions used for fitting.
"""
from __future__ import annotations

import numpy as np
import torch

from . import raster


def render_attributes(uv: torch.Tensor, depth: torch.Tensor, faces: np.ndarray, attributes: torch.Tensor,
                      size: int) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Render per-vertex `attributes` (V, C) of a mesh projected to pixel positions `uv` (V, 2) with camera
    depth `depth` (V,). Returns the image (size, size, C), the coverage mask (size, size) and the
    visible triangle per pixel (numpy, -1 where empty)."""
    tri_id = raster.rasterize(uv.detach().cpu().numpy().astype(np.float64), -depth.detach().cpu().numpy(),
                              faces, size, size)
    ys, xs = np.nonzero(tri_id >= 0)
    image = attributes.new_zeros(size, size, attributes.shape[1])
    mask = torch.zeros(size, size, dtype=torch.bool)
    if len(ys) == 0:
        return image, mask, tri_id
    corners = torch.as_tensor(faces[tri_id[ys, xs]])
    a, b, c = uv[corners[:, 0]], uv[corners[:, 1]], uv[corners[:, 2]]
    p = torch.stack([torch.as_tensor(xs, dtype=uv.dtype), torch.as_tensor(ys, dtype=uv.dtype)], 1)
    e1, e2, ep = b - a, c - a, p - a
    den = e1[:, 0] * e2[:, 1] - e2[:, 0] * e1[:, 1]
    den = torch.where(den.abs() < 1e-9, torch.full_like(den, 1e-9), den)
    l1 = (ep[:, 0] * e2[:, 1] - e2[:, 0] * ep[:, 1]) / den
    l2 = (e1[:, 0] * ep[:, 1] - ep[:, 0] * e1[:, 1]) / den
    weights = torch.stack([1 - l1 - l2, l1, l2], 1).clamp(0, 1)
    weights = weights / weights.sum(1, keepdim=True).clamp_min(1e-6)
    values = (attributes[corners] * weights[..., None]).sum(1)
    rows, cols = torch.as_tensor(ys), torch.as_tensor(xs)
    image = image.index_put((rows, cols), values)
    mask[rows, cols] = True
    return image, mask, tri_id


def vertex_normals(vertices: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """Area-weighted vertex normals (V, 3) of counter-clockwise triangles, differentiable."""
    a, b, c = vertices[faces[:, 0]], vertices[faces[:, 1]], vertices[faces[:, 2]]
    face_normals = torch.cross(b - a, c - a, dim=1)
    normals = torch.zeros_like(vertices).index_add(0, faces.reshape(-1), face_normals.repeat_interleave(3, 0))
    return normals / normals.norm(dim=1, keepdim=True).clamp_min(1e-12)

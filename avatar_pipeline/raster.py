"""A small CPU triangle rasterizer (painter's algorithm on OpenCV fills, then exact barycentrics).

Used where a non-differentiable rendering of a mesh is enough (normal maps, overlays)."""
from __future__ import annotations

import cv2
import numpy as np

_SUBPIXEL_BITS = 4


def rasterize(xy: np.ndarray, closeness: np.ndarray, triangles: np.ndarray, height: int, width: int
              ) -> tuple[np.ndarray, np.ndarray]:
    """Visible triangle per pixel and barycentric coordinates of the pixel centre.

    xy: (V, 2) pixel coordinates; closeness: (V,) larger = nearer the camera; triangles: (T, 3).
    Returns tri_id (H, W) int32 (-1 where empty) and bary (H, W, 3) float32.
    """
    order = np.argsort(closeness[triangles].mean(1))  # far first, near ones paint over them
    tri_id = np.full((height, width), -1, np.int32)
    fixed = np.round(xy * (1 << _SUBPIXEL_BITS)).astype(np.int32)
    for t in order:
        cv2.fillConvexPoly(tri_id, fixed[triangles[t]], int(t), lineType=cv2.LINE_8, shift=_SUBPIXEL_BITS)
    bary = np.zeros((height, width, 3), np.float32)
    ys, xs = np.nonzero(tri_id >= 0)
    if len(ys):
        tri = triangles[tri_id[ys, xs]]
        a, b, c = xy[tri[:, 0]], xy[tri[:, 1]], xy[tri[:, 2]]
        p = np.stack([xs, ys], 1).astype(np.float64)
        v0, v1, v2 = b - a, c - a, p - a
        den = v0[:, 0] * v1[:, 1] - v1[:, 0] * v0[:, 1]
        den = np.where(np.abs(den) < 1e-12, 1e-12, den)
        l1 = (v2[:, 0] * v1[:, 1] - v1[:, 0] * v2[:, 1]) / den
        l2 = (v0[:, 0] * v2[:, 1] - v2[:, 0] * v0[:, 1]) / den
        lam = np.clip(np.stack([1 - l1 - l2, l1, l2], 1), 0, 1)  # pixel centres just outside an edge
        bary[ys, xs] = lam / lam.sum(1, keepdims=True)
    return tri_id, bary


def interpolate(values: np.ndarray, triangles: np.ndarray, tri_id: np.ndarray, bary: np.ndarray) -> np.ndarray:
    """Per-pixel barycentric interpolation of per-vertex `values` (V, C); zero where empty."""
    out = np.zeros(tri_id.shape + (values.shape[1],), np.float32)
    mask = tri_id >= 0
    tri = triangles[tri_id[mask]]
    out[mask] = np.einsum("nk,nkc->nc", bary[mask], values[tri])
    return out


def vertex_normals(vertices: np.ndarray, triangles: np.ndarray) -> np.ndarray:
    """Area-weighted smooth vertex normals (counter-clockwise triangles face the viewer)."""
    a, b, c = (vertices[triangles[:, k]] for k in range(3))
    face = np.cross(b - a, c - a)
    normals = np.zeros_like(vertices)
    for k in range(3):
        np.add.at(normals, triangles[:, k], face)
    return normals / np.maximum(np.linalg.norm(normals, axis=1, keepdims=True), 1e-12)

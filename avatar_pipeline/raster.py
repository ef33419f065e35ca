"""A small CPU triangle rasterizer: painter's algorithm on OpenCV fills for visibility, then per-pixel
interpolation through each triangle's barycentric affine map.

Used where a non-differentiable rendering of a mesh is enough (normal maps, overlays)."""

from __future__ import annotations

import cv2
import numpy as np

_SUBPIXEL_BITS = 4


def rasterize(xy: np.ndarray, closeness: np.ndarray, triangles: np.ndarray, height: int, width: int) -> np.ndarray:
    """Visible triangle per pixel: (H, W) int32, -1 where empty.

    xy: (V, 2) pixel coordinates; closeness: (V,) larger = nearer the camera; triangles: (T, 3).
    """
    order = np.argsort(closeness[triangles].mean(1))  # far first, near ones paint over them
    tri_id = np.full((height, width), -1, np.int32)
    polygons = np.round(xy[triangles[order]] * (1 << _SUBPIXEL_BITS)).astype(np.int32)
    for polygon, t in zip(polygons, order.tolist()):
        cv2.fillConvexPoly(tri_id, polygon, t, lineType=cv2.LINE_8, shift=_SUBPIXEL_BITS)
    return tri_id


def barycentric_maps(xy: np.ndarray, triangles: np.ndarray) -> np.ndarray:
    """(T, 3, 3) matrices B with (l0, l1, l2) = B @ (x, y, 1) for each triangle (closed form; a batched
    matrix inverse is several times slower). Degenerate triangles get constant weights 1/3."""
    a, b, c = (xy[triangles[:, k]].astype(np.float64) for k in range(3))
    e1, e2 = b - a, c - a
    den = e1[:, 0] * e2[:, 1] - e2[:, 0] * e1[:, 1]
    ok = np.abs(den) > 1e-9
    inv = np.where(ok, 1.0 / np.where(ok, den, 1.0), 0.0)
    maps = np.zeros((len(triangles), 3, 3))
    maps[:, 1] = np.stack([e2[:, 1], -e2[:, 0], e2[:, 0] * a[:, 1] - e2[:, 1] * a[:, 0]], 1) * inv[:, None]
    maps[:, 2] = np.stack([-e1[:, 1], e1[:, 0], e1[:, 1] * a[:, 0] - e1[:, 0] * a[:, 1]], 1) * inv[:, None]
    maps[:, 0] = -maps[:, 1] - maps[:, 2]
    maps[:, 0, 2] += 1.0
    maps[~ok] = 0.0
    maps[~ok, :, 2] = 1.0 / 3.0
    return maps


def interpolate(
    values: np.ndarray, xy: np.ndarray, triangles: np.ndarray, tri_id: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Barycentric interpolation of per-vertex `values` (V, C) over the visible triangles.

    Returns the covered pixels as flat arrays: rows, columns and their (N, C) values."""
    # per triangle, values as an affine function of the pixel position: (T, C, 3)
    affine = np.einsum("tkc,tkj->tcj", values[triangles], barycentric_maps(xy, triangles)).astype(np.float32)
    ys, xs = np.nonzero(tri_id >= 0)
    coef = affine[tri_id[ys, xs]]
    fx, fy = xs.astype(np.float32)[:, None], ys.astype(np.float32)[:, None]
    return ys, xs, coef[:, :, 0] * fx + coef[:, :, 1] * fy + coef[:, :, 2]


def vertex_normals(vertices: np.ndarray, triangles: np.ndarray) -> np.ndarray:
    """Area-weighted smooth vertex normals (counter-clockwise triangles face the viewer)."""
    a, b, c = (vertices[triangles[:, k]] for k in range(3))
    face = np.cross(b - a, c - a)
    normals = np.zeros_like(vertices)
    for k in range(3):
        for axis in range(3):  # bincount is much faster than np.add.at
            normals[:, axis] += np.bincount(triangles[:, k], face[:, axis], minlength=len(vertices))
    return normals / np.maximum(np.linalg.norm(normals, axis=1, keepdims=True), 1e-12)

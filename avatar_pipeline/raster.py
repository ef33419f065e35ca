"""A small CPU triangle rasterizer: a compiled z-buffer for visibility, then per-pixel interpolation through
each triangle's barycentric affine map.

Used where a non-differentiable rendering of a mesh is enough (normal maps, overlays, texel charts)."""

from __future__ import annotations

import numba
import numpy as np


def rasterize(xy: np.ndarray, closeness: np.ndarray, triangles: np.ndarray, height: int, width: int) -> np.ndarray:
    """Visible triangle per pixel: (H, W) int32, -1 where empty.

    xy: (V, 2) pixel coordinates (pixel centres at integers); closeness: (V,) larger = nearer the camera;
    triangles: (T, 3). Coverage is conservative (every pixel a triangle touches, so meshes leave no gaps
    and thin triangles are not lost); where triangles overlap, the nearest at the pixel centre wins (on a
    tie, the first).
    """
    return _zbuffer(
        np.ascontiguousarray(xy, np.float64),
        np.ascontiguousarray(closeness, np.float64),
        np.ascontiguousarray(triangles, np.int64),
        height,
        width,
    )


@numba.njit(cache=True, nogil=True)
def _zbuffer(xy, closeness, triangles, height, width):
    tri_id = np.full((height, width), -1, np.int32)
    nearest = np.full((height, width), -np.inf)
    for t in range(len(triangles)):
        a, b, c = triangles[t, 0], triangles[t, 1], triangles[t, 2]
        ax, ay, bx, by, cx, cy = xy[a, 0], xy[a, 1], xy[b, 0], xy[b, 1], xy[c, 0], xy[c, 1]
        area = (bx - ax) * (cy - ay) - (cx - ax) * (by - ay)
        if area == 0.0 or not np.isfinite(area):
            continue
        sign = 1.0 if area > 0 else -1.0
        # edge functions, positive inside: e_k(x, y) = nx_k * x + ny_k * y + d_k (the edge opposite corner k)
        n0x, n0y = sign * (by - cy), sign * (cx - bx)
        n1x, n1y = sign * (cy - ay), sign * (ax - cx)
        n2x, n2y = sign * (ay - by), sign * (bx - ax)
        d0, d1, d2 = -(n0x * bx + n0y * by), -(n1x * cx + n1y * cy), -(n2x * ax + n2y * ay)
        # a pixel square touches the triangle when each edge function, at the square's corner farthest inside,
        # is not negative
        r0, r1, r2 = 0.5 * (abs(n0x) + abs(n0y)), 0.5 * (abs(n1x) + abs(n1y)), 0.5 * (abs(n2x) + abs(n2y))
        x0 = max(int(np.ceil(min(ax, bx, cx) - 0.5)), 0)
        x1 = min(int(np.floor(max(ax, bx, cx) + 0.5)), width - 1)
        y0 = max(int(np.ceil(min(ay, by, cy) - 0.5)), 0)
        y1 = min(int(np.floor(max(ay, by, cy) + 0.5)), height - 1)
        whole = abs(area)
        za, zb, zc = closeness[a], closeness[b], closeness[c]
        for y in range(y0, y1 + 1):
            for x in range(x0, x1 + 1):
                e0, e1, e2 = n0x * x + n0y * y + d0, n1x * x + n1y * y + d1, n2x * x + n2y * y + d2
                if e0 + r0 < 0 or e1 + r1 < 0 or e2 + r2 < 0:
                    continue
                depth = (e0 * za + e1 * zb + e2 * zc) / whole
                if depth > nearest[y, x]:
                    nearest[y, x] = depth
                    tri_id[y, x] = t
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
    """Barycentric interpolation of per-vertex `values` (V, C) over the visible triangles (extrapolated at the
    pixels a triangle covers only in part, as in barycentric_maps).

    Returns the covered pixels as flat arrays: rows, columns and their (N, C) float32 values."""
    return _interpolate(
        np.ascontiguousarray(values, np.float64).reshape(len(values), -1),
        np.ascontiguousarray(xy, np.float64),
        np.ascontiguousarray(triangles, np.int64),
        np.ascontiguousarray(tri_id, np.int32),
    )


@numba.njit(cache=True, nogil=True)
def _interpolate(values, xy, triangles, tri_id):
    height, width = tri_id.shape
    covered = 0
    for y in range(height):
        for x in range(width):
            covered += tri_id[y, x] >= 0
    ys, xs = np.empty(covered, np.int64), np.empty(covered, np.int64)
    out = np.empty((covered, values.shape[1]), np.float32)
    p = 0
    for y in range(height):
        for x in range(width):
            t = tri_id[y, x]
            if t < 0:
                continue
            a, b, c = triangles[t, 0], triangles[t, 1], triangles[t, 2]
            e1x, e1y = xy[b, 0] - xy[a, 0], xy[b, 1] - xy[a, 1]
            e2x, e2y = xy[c, 0] - xy[a, 0], xy[c, 1] - xy[a, 1]
            den = e1x * e2y - e2x * e1y
            if abs(den) > 1e-9:
                px, py = x - xy[a, 0], y - xy[a, 1]
                l1, l2 = (px * e2y - e2x * py) / den, (e1x * py - px * e1y) / den
            else:  # degenerate: the corners' mean
                l1 = l2 = 1.0 / 3.0
            l0 = 1.0 - l1 - l2
            for k in range(values.shape[1]):
                out[p, k] = l0 * values[a, k] + l1 * values[b, k] + l2 * values[c, k]
            ys[p], xs[p] = y, x
            p += 1
    return ys, xs, out


def vertex_normals(vertices: np.ndarray, triangles: np.ndarray) -> np.ndarray:
    """Area-weighted smooth vertex normals (counter-clockwise triangles face the viewer)."""
    a, b, c = (vertices[triangles[:, k]] for k in range(3))
    face = np.cross(b - a, c - a)
    normals = np.zeros_like(vertices)
    for k in range(3):
        for axis in range(3):  # bincount is much faster than np.add.at
            normals[:, axis] += np.bincount(triangles[:, k], face[:, axis], minlength=len(vertices))
    return normals / np.maximum(np.linalg.norm(normals, axis=1, keepdims=True), 1e-12)

"""Where mediapipe's face-mesh points lie on a morphable model's surface (ICT FaceKit, FLAME).

No correspondence between mediapipe's 478 points and these models is published, so it is found per
subject from the subject's own landmarks. mediapipe's points carry a relative depth, so the rigidly
aligned mean of a subject's meshes is a 3D face in mediapipe's topology (the same shape the built-in
model starts from). A similarity transform of that face and the model's identity are fitted to each
other: first through the iBUG-68 points both define, then alternately by closest points on the model's
face surface. Every mediapipe point is then embedded at its closest point on the fitted surface
(triangle + barycentric weights), which carries over to every identity and expression.

Left out: the iris points (they move with the gaze, which the models do not fit) and points farther
than `max_distance` from the surface (where the two meshes disagree, e.g. beyond the model's face).
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy.spatial import cKDTree

from .. import facemesh
from .base import MorphableModel, barycentric_points
from .builtin import aligned_meshes, similarity

IRIS = np.array(facemesh.RIGHT_IRIS + facemesh.LEFT_IRIS)
MAX_SCALE_CHANGE = 0.15  # log-ratio of the fitted size to the size the 68 shared points give
MIN_POINTS = 234  # half of the mesh points: fewer means the two surfaces do not match


class CorrespondenceError(ValueError):
    pass


@dataclasses.dataclass
class MediapipeEmbedding:
    point_ids: np.ndarray  # (L,) mediapipe point indices that have a place on the model
    faces: np.ndarray  # (L,) the model triangle of each
    bary: np.ndarray  # (L, 3) barycentric weights on it
    distance_m: np.ndarray  # (L,) distance of the fitted mediapipe point to the model surface
    left_out: int  # mediapipe points without a place (iris, or too far from the surface)


def closest_points(points: np.ndarray, vertices: np.ndarray, faces: np.ndarray, neighbours: int = 8):
    """Closest point on the triangle mesh (vertices, faces) to each of `points` (P, 3), searched among the
    triangles around the `neighbours` nearest vertices. Returns triangle ids (P,), barycentric weights
    (P, 3) and distances (P,)."""
    used = np.unique(faces)
    _, nearest = cKDTree(vertices[used]).query(points, k=min(neighbours, len(used)))
    nearest = used[np.atleast_2d(nearest.T).T]
    # triangles incident to each vertex, as a padded table
    order = np.argsort(faces.ravel(), kind="stable")
    counts = np.bincount(faces.ravel(), minlength=len(vertices))
    starts = np.concatenate([[0], np.cumsum(counts)])
    width = counts.max()
    table = np.full((len(vertices), width), -1, np.int64)
    flat_vertex = faces.ravel()[order]
    table[flat_vertex, np.arange(len(order)) - starts[flat_vertex]] = order // 3
    cand = table[nearest].reshape(len(points), -1)  # (P, C) with -1 padding
    point_idx = np.repeat(np.arange(len(points)), cand.shape[1])
    tri_idx = cand.ravel()
    keep = tri_idx >= 0
    point_idx, tri_idx = point_idx[keep], tri_idx[keep]
    bary, dist = _closest_on_triangles(points[point_idx], vertices[faces[tri_idx]])
    best = np.full(len(points), np.inf)
    np.minimum.at(best, point_idx, dist)
    winner = np.flatnonzero(dist == best[point_idx])
    _, first = np.unique(point_idx[winner], return_index=True)
    winner = winner[first]
    return tri_idx[winner], bary[winner].astype(np.float32), dist[winner]


def _closest_on_triangles(p: np.ndarray, tri: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Closest point of triangles tri (M, 3, 3) to points p (M, 3): barycentric weights and distance.
    Inside the triangle it is the projection on its plane; otherwise it lies on one of the edges."""
    a, b, c = tri[:, 0], tri[:, 1], tri[:, 2]
    e1, e2 = b - a, c - a
    d = p - a
    g11, g12, g22 = (e1 * e1).sum(1), (e1 * e2).sum(1), (e2 * e2).sum(1)
    r1, r2 = (d * e1).sum(1), (d * e2).sum(1)
    det = np.maximum(g11 * g22 - g12**2, 1e-30)
    v = (g22 * r1 - g12 * r2) / det
    w = (g11 * r2 - g12 * r1) / det
    bary = np.stack([1 - v - w, v, w], 1)
    inside = (bary >= 0).all(1)
    best_bary = np.where(inside[:, None], bary, 0.0)
    best_dist = np.where(inside, np.linalg.norm((bary[:, :, None] * tri).sum(1) - p, axis=1), np.inf)
    for i, j in ((0, 1), (1, 2), (2, 0)):  # edge from corner i to corner j
        start, edge = tri[:, i], tri[:, j] - tri[:, i]
        t = np.clip(((p - start) * edge).sum(1) / np.maximum((edge * edge).sum(1), 1e-30), 0, 1)
        dist = np.linalg.norm(start + t[:, None] * edge - p, axis=1)
        better = ~inside & (dist < best_dist)
        edge_bary = np.zeros_like(bary)
        edge_bary[:, i], edge_bary[:, j] = 1 - t, t
        best_bary = np.where(better[:, None], edge_bary, best_bary)
        best_dist = np.where(better, dist, best_dist)
    return best_bary, best_dist


def mediapipe_embedding(
    model: MorphableModel,
    mp478: np.ndarray,
    valid: np.ndarray,
    num_identity: int = 40,
    noise_m: float = 0.002,
    iterations: int = 6,
    max_distance: float = 0.005,
) -> MediapipeEmbedding:
    """Embed mediapipe's points on `model` from a subject's landmarks (N, 478, 3) (pixels, relative depth)."""
    _, face = aligned_meshes(mp478, valid)
    surface_ids = np.flatnonzero(np.isin(model.faces, model.regions["face"]).all(1))
    surface = model.faces[surface_ids]
    mesh_points = np.setdiff1d(np.arange(facemesh.NUM_POINTS), IRIS)
    ki = min(num_identity, model.num_identity)
    basis = model.identity_basis[..., :ki].astype(np.float64)
    template = model.template.astype(np.float64)

    # start: the similarity that best takes mediapipe's iBUG points onto the model's
    import torch

    anchors = barycentric_points(torch.as_tensor(template[None]), *model.landmark_vertices())[0].numpy()
    mp_anchor_ids = facemesh.IBUG68_FROM_MP478[model.landmark_ids]
    scale, rotation, shift = similarity(face[mp_anchor_ids], anchors)
    anchor_scale = scale
    identity = np.zeros(ki)
    vertices = template
    for _ in range(iterations):
        target = scale * face @ rotation + shift
        tri_ids, bary, _ = closest_points(target[mesh_points], vertices, surface)
        tri = surface[tri_ids]
        # identity: MAP estimate (unit Gaussian prior, `noise_m` per coordinate) of the closest surface
        # points onto the moved mediapipe points - a ridge regression
        design = (basis[tri] * bary[..., None, None]).sum(1).reshape(-1, ki)  # (3P, K)
        rest = (template[tri] * bary[..., None]).sum(1).reshape(-1)
        lhs = design.T @ design + noise_m**2 * np.eye(ki)
        identity = np.linalg.solve(lhs, design.T @ (target[mesh_points].reshape(-1) - rest))
        vertices = template + basis @ identity
        matched = (vertices[tri] * bary[..., None]).sum(1)
        scale, rotation, shift = similarity(face[mesh_points], matched)
    # closest points can pull the face onto a small patch of surface by shrinking it: the 68 shared
    # points fix the size well enough to tell (on real clips the two sizes agree within a few percent)
    if abs(np.log(scale / anchor_scale)) > MAX_SCALE_CHANGE:
        raise CorrespondenceError(
            f"the face shrank or grew by {scale / anchor_scale:.2f}x while matching "
            f"mediapipe's mesh to the {model.name} surface"
        )
    target = scale * face @ rotation + shift
    tri_ids, bary, dist = closest_points(target[mesh_points], vertices, surface)
    close = dist <= max_distance
    if close.sum() < MIN_POINTS:
        raise CorrespondenceError(
            f"only {close.sum()} of mediapipe's points lie within {max_distance * 1e3:.0f} mm "
            f"of the {model.name} face surface"
        )
    return MediapipeEmbedding(
        point_ids=mesh_points[close],
        faces=surface_ids[tri_ids[close]],
        bary=bary[close],
        distance_m=dist[close].astype(np.float32),
        left_out=int(facemesh.NUM_POINTS - close.sum()),
    )

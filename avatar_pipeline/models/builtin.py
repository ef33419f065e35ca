"""The built-in default model: needs no file at all.

Face-only, on mediapipe's 478-point topology, learned per subject from its own tracked meshes: the
template is the mean of the rigidly aligned meshes (scaled to metres from a typical face width), the
expression basis the principal components of what remains after rigid alignment (scaled so the
coefficients have a unit Gaussian prior). There is no identity basis: the template is the identity.
"""

from __future__ import annotations

import numpy as np

from .. import facemesh
from .base import MorphableModel, vertex_landmarks

FACE_WIDTH_M = 0.14  # typical distance between the cheek edges (mediapipe points 234 and 454)


def similarity(source: np.ndarray, target: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """Least-squares similarity (scale, rotation (3, 3), translation) taking `source` (N, 3) onto `target`:
    target ~ scale * source @ rotation + translation."""
    mu_s, mu_t = source.mean(0), target.mean(0)
    s, t = source - mu_s, target - mu_t
    u, sig, vt = np.linalg.svd(s.T @ t)
    fix = np.diag([1, 1, np.sign(np.linalg.det(u @ vt))])
    rotation = u @ fix @ vt
    scale = (sig * np.diag(fix)).sum() / (s**2).sum()
    return scale, rotation, mu_t - scale * mu_s @ rotation


def _procrustes(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """`source` (N, 3) moved onto `target` by the best similarity transform."""
    scale, rotation, translation = similarity(source, target)
    return scale * source @ rotation + translation


def aligned_meshes(mp478: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The subject's meshes (N, 478, 3) in pixels (y down, z away from the camera) rigidly aligned in the
    model frame (y up, the face looking along +z) and scaled to metres from a typical face width,
    and their mean (478, 3), centred."""
    frames = mp478[valid].astype(np.float64)
    if len(frames) < 3:
        raise ValueError("the built-in model needs at least 3 frames with landmarks")
    frames = frames * np.array([1.0, -1.0, -1.0])
    reference = frames[0]
    for _ in range(2):  # align to the reference, then to the mean of the aligned set
        aligned = np.stack([_procrustes(f, reference) for f in frames])
        reference = aligned.mean(0)
    mean = aligned.mean(0)
    scale = FACE_WIDTH_M / np.linalg.norm(mean[facemesh.LEFT_CHEEK_EDGE] - mean[facemesh.RIGHT_CHEEK_EDGE])
    return (aligned - mean.mean(0)) * scale, (mean - mean.mean(0)) * scale


def learn(mp478: np.ndarray, valid: np.ndarray, num_expression: int = 20) -> MorphableModel:
    """Build the subject's model from its landmarks (N, 478, 3) in pixels (y down, z away from camera)."""
    aligned, mean = aligned_meshes(mp478, valid)
    residual = (aligned - mean).reshape(len(aligned), -1)
    k = int(min(num_expression, len(aligned) - 1))
    _, sig, vt = np.linalg.svd(residual, full_matrices=False)
    std = sig[:k] / np.sqrt(max(1, len(aligned) - 1))
    basis = (vt[:k] * std[:, None]).reshape(k, -1, 3).transpose(1, 2, 0)
    tris = facemesh.triangles()
    lmk_faces, lmk_bary = vertex_landmarks(tris, facemesh.IBUG68_FROM_MP478)
    eyes = np.array(facemesh.RIGHT_EYE + facemesh.LEFT_EYE + facemesh.RIGHT_IRIS + facemesh.LEFT_IRIS)
    return MorphableModel(
        name="builtin",
        template=mean.astype(np.float32),
        faces=tris,
        identity_basis=np.zeros((facemesh.NUM_POINTS, 3, 0), np.float32),
        expression_basis=basis.astype(np.float32),
        expression_names=[f"pca{k:02d}" for k in range(k)],
        landmark_faces=lmk_faces,
        landmark_bary=lmk_bary,
        landmark_ids=np.arange(68),
        regions={
            "face": np.arange(facemesh.NUM_POINTS),
            "scalp": np.zeros(0, np.int64),
            "neck": np.zeros(0, np.int64),
            "eyes": eyes,
            "mouth_interior": np.zeros(0, np.int64),
        },
        expression_prior="gaussian",
        **frontal_uvs(mean, tris),
    )


def frontal_uvs(template: np.ndarray, faces: np.ndarray) -> dict:
    """Texture coordinates for a face-only mesh that has none: the frontal projection of the template
    (x, y) into the unit square with a small margin, one chart (the face seen from the front has no
    overlapping parts)."""
    xy = template[:, :2]
    low, high = xy.min(0), xy.max(0)
    uv = 0.02 + 0.96 * (xy - low) / (high - low).max()
    return {
        "uvs": uv[faces].reshape(-1, 2).astype(np.float32),
        "uv_faces": np.arange(3 * len(faces)).reshape(-1, 3),
        "face_charts": np.zeros(len(faces), np.int8),
    }

"""What Local Deformation Fields reads of the tracked head model: the field centres of a frame and of the
canonical head, the tracked mesh (for the weak mesh prior), and how far each conditioning coefficient
moves each centre (for the attention masks)."""

from __future__ import annotations

import numpy as np
import torch

from ...models.base import MorphableModel, barycentric_points
from .deformation import attention_masks, field_centres

JOINT_STEP = 0.2  # radians: a joint rotation coefficient's probe when measuring what it moves
# iBUG-68 regions of the local edits: a coefficient belongs to a region when every field it reaches is there
EDIT_REGIONS = {
    "eyes": set(range(17, 27)) | set(range(36, 48)),  # brows and eyes
    "mouth": set(range(0, 17)) | set(range(27, 36)) | set(range(48, 68)),  # jaw line, nose and mouth
}


class TrackedHead:
    """The subject's tracked morphable model with its identity, evaluated from a frame's conditions (the
    expression coefficients, then the joint rotations for models with a jaw joint)."""

    def __init__(self, model: MorphableModel, tracking: dict, centres: str):
        self.model = model
        ids = [int(i) for i in model.landmark_ids]
        self.groups = [[ids.index(i) for i in group] for group in field_centres(centres, model.landmark_ids)]
        self.subset, inverse = np.unique(model.faces[model.landmark_faces], return_inverse=True)
        self.corners = inverse.reshape(-1, 3)
        identity = np.asarray(tracking["identity"], np.float32)
        self.identity = torch.as_tensor(identity)[None] if identity.size else None
        self.expression_dim = int(tracking["expression"].shape[1])
        self.has_joints = model.skinning is not None and "joint_rotations" in tracking
        self.faces = model.faces

    @property
    def fields(self) -> int:
        return len(self.groups)

    def _coefficients(self, conditions: torch.Tensor):
        batch = len(conditions)
        expression = conditions[:, : self.expression_dim]
        joints = conditions[:, self.expression_dim :].reshape(batch, -1, 3) if self.has_joints else None
        identity = None if self.identity is None else self.identity.expand(batch, -1)
        return identity, expression, joints

    @torch.no_grad()
    def vertices(self, conditions: torch.Tensor) -> torch.Tensor:
        """Head-space vertices (B, V, 3) of the tracked mesh for conditions (B, C)."""
        return self.model.vertices(*self._coefficients(conditions))

    @torch.no_grad()
    def centres(self, conditions: torch.Tensor) -> torch.Tensor:
        """Head-space field centres (B, L, 3) for conditions (B, C)."""
        verts = self.model.vertices(*self._coefficients(conditions), subset=self.subset)
        points = barycentric_points(verts, self.corners, self.model.landmark_bary)
        return torch.stack([points[:, group].mean(1) for group in self.groups], 1)

    def landmark_motion(self, condition_dim: int) -> np.ndarray:
        """(L, C): how far (metres) each centre moves when one conditioning coefficient alone is set to one
        (an expression) or to JOINT_STEP (a joint rotation), from the neutral head."""
        probes = torch.eye(condition_dim)
        probes[self.expression_dim :] *= JOINT_STEP
        neutral = self.centres(torch.zeros(1, condition_dim))
        return (self.centres(probes) - neutral).norm(dim=-1).t().numpy()

    def attention(self, condition_dim: int, masked: bool = True) -> np.ndarray:
        """Binary masks (L, C) of which coefficients each field sees (paper Sec. 3.3); every field sees every
        coefficient when not `masked` (the ablation without masks)."""
        if not masked:
            return np.ones((self.fields, condition_dim), dtype=bool)
        return attention_masks(self.landmark_motion(condition_dim))

    def centre_ids(self) -> list[tuple[int, ...]]:
        """The iBUG-68 landmarks of each field centre."""
        return [tuple(int(self.model.landmark_ids[i]) for i in group) for group in self.groups]

    def region_coefficients(self, masks: np.ndarray, region: str) -> list[int]:
        """The coefficients whose masks (L, C) reach fields of `region` (EDIT_REGIONS) and no others."""
        inside = np.array([set(ids) <= EDIT_REGIONS[region] for ids in self.centre_ids()])
        return [c for c in range(masks.shape[1]) if masks[:, c].any() and not (masks[:, c] & ~inside).any()]


def pose_feature(camera_to_head: torch.Tensor) -> torch.Tensor:
    """The head pose a frame's fields see, from its camera (..., 4, 4): the first two columns of the
    rotation (continuous, unlike an axis-angle near the half turn the camera convention adds)."""
    return camera_to_head[..., :3, :2].transpose(-1, -2).flatten(-2)

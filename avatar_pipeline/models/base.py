"""One interface for every morphable head model.

identity coefficients, expression coefficients and joint rotations (where the model has joints) in;
vertices in the model's canonical frame (metres, y up, the face looking along +z) out. The rigid head
pose (rotation, translation into camera space) is applied by the caller, the same way for every model.
Landmarks are given as barycentric points on triangles, so vertex landmarks and FLAME's embedding are
one format.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

REGIONS = ("face", "scalp", "neck", "eyes", "mouth_interior")
# texture charts: every triangle's UVs lie in the unit square of one of these (mesh avatars keep one
# feature grid per chart, so the mouth interior and the eyes never share texels with the skin)
UV_CHARTS = ("face", "mouth", "eyes")


@dataclasses.dataclass
class Skinning:
    """Linear blend skinning (FLAME): joints from the shaped template, pose-corrective offsets."""

    joint_names: list[str]
    parents: np.ndarray  # (J,), -1 for the root
    joint_regressor: np.ndarray  # (J, V)
    weights: np.ndarray  # (V, J)
    pose_basis: np.ndarray  # (V, 3, 9 * (J - 1)) offsets per element of (R - I) of the non-root joints


@dataclasses.dataclass
class MorphableModel:
    name: str
    template: np.ndarray  # (V, 3) float32, metres
    faces: np.ndarray  # (F, 3) int64
    identity_basis: np.ndarray  # (V, 3, Ki) float32: vertex offset per unit coefficient (prior N(0, 1))
    expression_basis: np.ndarray  # (V, 3, Ke) float32
    expression_names: list[str]
    landmark_faces: np.ndarray  # (L,) triangle per iBUG-68 landmark
    landmark_bary: np.ndarray  # (L, 3) barycentric weights
    landmark_ids: np.ndarray  # (L,) which of the 68 iBUG points these are (FLAME's static embedding has 51)
    regions: dict[str, np.ndarray]  # region name -> vertex indices
    skinning: Skinning | None = None
    expression_prior: str = "gaussian"  # "gaussian" (PCA, N(0,1)) or "unit" (blendshape weights in [0, 1])
    # texture coordinates, where the model has them: uvs (T, 2) in [0, 1], uv_faces (F, 3) rows of uvs per
    # triangle corner (seams make them differ from `faces`), face_charts (F,) index into UV_CHARTS
    uvs: np.ndarray | None = None
    uv_faces: np.ndarray | None = None
    face_charts: np.ndarray | None = None

    @property
    def has_uvs(self) -> bool:
        return self.uvs is not None and self.uv_faces is not None and self.face_charts is not None

    @property
    def num_vertices(self) -> int:
        return len(self.template)

    @property
    def num_identity(self) -> int:
        return self.identity_basis.shape[2]

    @property
    def num_expression(self) -> int:
        return self.expression_basis.shape[2]

    def landmark_vertices(self) -> tuple[np.ndarray, np.ndarray]:
        """(L, 3) vertex ids and (L, 3) weights of the landmarks."""
        return self.faces[self.landmark_faces], self.landmark_bary

    def save(self, path: str | Path) -> None:
        arrays = {k: v for k, v in dataclasses.asdict(self).items() if isinstance(v, np.ndarray)}
        arrays["expression_names"] = np.array(self.expression_names)
        arrays["name"] = np.array(self.name)
        arrays["expression_prior"] = np.array(self.expression_prior)
        for region, idx in self.regions.items():
            arrays[f"region_{region}"] = idx
        if self.skinning is not None:
            for k, v in dataclasses.asdict(self.skinning).items():
                arrays[f"skin_{k}"] = np.asarray(v)
        # float16 deltas would halve the size but lose millimetre detail on large heads: keep float32. Not
        # compressed: the bases hardly compress (53 -> 28 MB for ICT) and deflating them took 3 s of every
        # tracking run
        np.savez(path, **arrays)

    @classmethod
    def load(cls, path: str | Path) -> "MorphableModel":
        with np.load(path, allow_pickle=False) as d:
            data = {k: d[k] for k in d.files}
        regions = {k[len("region_") :]: v for k, v in data.items() if k.startswith("region_")}
        skin = {k[len("skin_") :]: v for k, v in data.items() if k.startswith("skin_")}
        skinning = None
        if skin:
            skin["joint_names"] = [str(n) for n in skin["joint_names"]]
            skinning = Skinning(**skin)
        return cls(
            name=str(data["name"]),
            template=data["template"],
            faces=data["faces"],
            identity_basis=data["identity_basis"],
            expression_basis=data["expression_basis"],
            expression_names=[str(n) for n in data["expression_names"]],
            landmark_faces=data["landmark_faces"],
            landmark_bary=data["landmark_bary"],
            landmark_ids=data["landmark_ids"],
            regions=regions,
            skinning=skinning,
            expression_prior=str(data["expression_prior"]),
            uvs=data.get("uvs"),
            uv_faces=data.get("uv_faces"),
            face_charts=data.get("face_charts"),
        )

    def vertices(self, identity=None, expression=None, joint_rotations=None, subset: np.ndarray | None = None):
        """Vertices (B, V, 3) as a torch tensor; coefficients are torch tensors (B, K) or None.

        `subset` restricts the evaluation to some vertices (e.g. the landmarks' triangles) - much
        faster for fitting. Joint rotations (B, J, 3) axis-angle apply to models with skinning."""
        import torch

        ref = next((t for t in (identity, expression, joint_rotations) if t is not None), None)
        device = ref.device if ref is not None else torch.device("cpu")
        batch = ref.shape[0] if ref is not None else 1
        cache = self._torch_cache(device)
        sel = slice(None) if subset is None else torch.as_tensor(subset, device=device)
        verts = cache["template"][sel].unsqueeze(0).expand(batch, -1, -1)
        if identity is not None and self.num_identity:
            verts = verts + torch.einsum("vck,bk->bvc", cache["identity"][sel][..., : identity.shape[1]], identity)
        if expression is not None and self.num_expression:
            verts = verts + torch.einsum(
                "vck,bk->bvc", cache["expression"][sel][..., : expression.shape[1]], expression
            )
        if self.skinning is not None and joint_rotations is not None:
            from .flame import skin_vertices

            verts = skin_vertices(self, verts, joint_rotations, subset, cache, identity, expression)
        return verts

    def _torch_cache(self, device):
        import torch

        key = str(device)
        caches = self.__dict__.setdefault("_torch", {})
        if key not in caches:
            caches[key] = {
                "template": torch.as_tensor(self.template, dtype=torch.float32, device=device),
                "identity": torch.as_tensor(self.identity_basis, dtype=torch.float32, device=device),
                "expression": torch.as_tensor(self.expression_basis, dtype=torch.float32, device=device),
            }
        return caches[key]


def barycentric_points(vertices, faces_of_points: np.ndarray, bary: np.ndarray):
    """Points on a mesh (B, L, 3) from vertices (B, V, 3), triangle vertex ids (L, 3) and weights (L, 3)."""
    import torch

    tri = torch.as_tensor(faces_of_points, device=vertices.device)
    w = torch.as_tensor(bary, dtype=vertices.dtype, device=vertices.device)
    return (vertices[:, tri] * w[None, :, :, None]).sum(2)


def vertex_landmarks(faces: np.ndarray, vertices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Express landmarks that are vertices as (triangle, barycentric weights) with all weight on the vertex."""
    tri_ids, bary = [], []
    for v in vertices:
        f, corner = np.argwhere(faces == v)[0]
        tri_ids.append(f)
        bary.append(np.eye(3, dtype=np.float32)[corner])
    return np.array(tri_ids, np.int64), np.array(bary, np.float32)

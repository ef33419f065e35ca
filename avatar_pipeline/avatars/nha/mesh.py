"""The head mesh of a Neural Head Avatar, built from the subject's tracked morphable model: the model's
triangles subdivided (four-way, as the paper does to FLAME), the regions the losses weight differently,
the inner-lip vertex pairs of the mouth conditioning, and mesh operators (uniform Laplacian, edges).

Regions are derived the same way for every model kind from its own coarse regions (eyes, mouth
interior, face, scalp, neck) and its 68 landmarks on the template: ears, nose, forehead, the eye
surroundings, lower neck. Distances are in units of the template's inter-ocular distance, so the rules
hold for a head of any size.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from ...models.base import MorphableModel

# priority order: a vertex takes the first region it falls in
REGIONS = (
    "eyeballs",
    "mouth_interior",
    "ears",
    "nose",
    "eye_region",
    "forehead",
    "lower_neck",
    "neck",
    "scalp",
    "face",
)
# iBUG-68 inner-lip points: the upper (61-63) against the lower (67-65) ones, and the mouth corners
INNER_LIP_PAIRS = tuple((u, d) for u in (61, 62, 63) for d in (67, 66, 65)) + ((60, 64),)
EYELID_PAIRS = ((37, 41), (38, 40), (43, 47), (44, 46))  # upper and lower lid points of each eye


@dataclasses.dataclass
class HeadMesh:
    """The subdivided mesh: `vertices_from_base` maps the model's vertices (V0) to the subdivided ones
    (V, the first V0 of which are the model's own), so any posed model mesh subdivides with one product."""

    model: MorphableModel
    faces: np.ndarray  # (F, 3) of the subdivided mesh
    vertices_from_base: torch.Tensor  # sparse (V, V0)
    corner_uvs: np.ndarray  # (F, 3, 2) texture coordinates of every triangle corner, in its chart
    face_charts: np.ndarray  # (F,) index into UV_CHARTS
    region: np.ndarray  # (V,) index into REGIONS
    template: np.ndarray  # (V, 3) subdivided template (metres)

    @property
    def num_vertices(self) -> int:
        return len(self.template)

    def region_mask(self, *names: str) -> np.ndarray:
        return np.isin(self.region, [REGIONS.index(n) for n in names])

    def subdivide(self, base_vertices: torch.Tensor) -> torch.Tensor:
        """(B, V0, 3) posed model vertices -> (B, V, 3)."""
        flat = base_vertices.permute(1, 0, 2).reshape(base_vertices.shape[1], -1)
        out = torch.sparse.mm(self.vertices_from_base.to(flat.device), flat)
        return out.reshape(-1, base_vertices.shape[0], 3).permute(1, 0, 2)


def build_head_mesh(model: MorphableModel, subdivisions: int) -> HeadMesh:
    if not model.has_uvs:
        raise ValueError(f"the {model.name} model has no texture coordinates")
    region = base_regions(model)
    # the lower neck is left out, as the paper does with FLAME's: it flares into the shoulders, which the
    # parsing labels as clothing and no head model describes
    keep = ~(region[model.faces] == REGIONS.index("lower_neck")).all(1)
    faces, corner_uvs = model.faces[keep], model.uvs[model.uv_faces[keep]]
    charts = model.face_charts[keep].astype(np.int64)
    rows, cols, vals = np.arange(model.num_vertices), np.arange(model.num_vertices), np.ones(model.num_vertices)
    mapping = (rows, cols, vals)
    count = model.num_vertices
    for _ in range(subdivisions):
        faces, corner_uvs, charts, midpoints = _subdivide_once(faces, corner_uvs, charts, count)
        # a midpoint is the mean of its edge's endpoints, each of which is a sparse row over the base vertices
        matrix = _sparse(mapping, count, model.num_vertices)
        new_rows = 0.5 * (matrix[midpoints[:, 0]] + matrix[midpoints[:, 1]])
        coo = new_rows.tocoo()
        mapping = (
            np.concatenate([mapping[0], coo.row + count]),
            np.concatenate([mapping[1], coo.col]),
            np.concatenate([mapping[2], coo.data]),
        )
        # a midpoint belongs to a region when both endpoints do, else to the later (broader) one of the two
        region = np.concatenate([region, np.maximum(region[midpoints[:, 0]], region[midpoints[:, 1]])])
        count += len(midpoints)
    matrix = _sparse(mapping, count, model.num_vertices).tocoo()
    sparse = torch.sparse_coo_tensor(
        np.stack([matrix.row, matrix.col]),
        matrix.data.astype(np.float32),
        (count, model.num_vertices),
        check_invariants=False,
    ).coalesce()
    template = torch.sparse.mm(sparse, torch.as_tensor(model.template)).numpy()
    return HeadMesh(model, faces, sparse, corner_uvs.astype(np.float32), charts, region, template)


def _sparse(mapping, rows: int, cols: int):
    import scipy.sparse

    return scipy.sparse.csr_matrix((mapping[2], (mapping[0], mapping[1])), shape=(rows, cols))


def _subdivide_once(faces: np.ndarray, corner_uvs: np.ndarray, charts: np.ndarray, count: int):
    """Four-way subdivision: one new vertex per edge (numbered from `count`), each triangle split in four.
    Returns the new faces, corner UVs and charts, and the endpoints (E, 2) of every new vertex's edge."""
    edges = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
    unique, inverse = np.unique(np.sort(edges, 1), axis=0, return_inverse=True)
    mid = count + inverse.reshape(3, -1).T  # (F, 3): midpoints of edges 01, 12, 20
    a, b, c = faces.T
    m01, m12, m20 = mid.T
    new_faces = np.concatenate([np.stack(t, 1) for t in ((a, m01, m20), (m01, b, m12), (m20, m12, c), (m01, m12, m20))])
    ua, ub, uc = corner_uvs[:, 0], corner_uvs[:, 1], corner_uvs[:, 2]
    u01, u12, u20 = (ua + ub) / 2, (ub + uc) / 2, (uc + ua) / 2
    new_uvs = np.concatenate(
        [np.stack(t, 1) for t in ((ua, u01, u20), (u01, ub, u12), (u20, u12, uc), (u01, u12, u20))]
    )
    return new_faces, new_uvs, np.tile(charts, 4), unique


def template_landmarks(model: MorphableModel) -> dict[int, np.ndarray]:
    """iBUG index -> position on the template, for the landmarks the model embeds."""
    points = (model.template[model.faces[model.landmark_faces]] * model.landmark_bary[..., None]).sum(1)
    return {int(i): p for i, p in zip(model.landmark_ids, points)}


def eye_centres(landmarks: dict[int, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The subject's right and left eye centres (means of iBUG 36-41 and 42-47)."""
    return tuple(np.mean([landmarks[i] for i in ids], 0) for ids in (range(36, 42), range(42, 48)))


def inter_ocular_distance(model: MorphableModel) -> float:
    """Distance between the eye centres of the template (metres): the unit of the region rules and of the
    mouth conditioning."""
    right, left = eye_centres(template_landmarks(model))
    return float(np.linalg.norm(left - right))


def base_regions(model: MorphableModel) -> np.ndarray:
    """(V0,) region index (REGIONS) of every model vertex; see the module docstring."""
    t = model.template
    lm = template_landmarks(model)
    eye_r, eye_l = eye_centres(lm)
    unit = inter_ocular_distance(model)
    regions = {name: np.zeros(len(t), bool) for name in REGIONS}
    regions["eyeballs"][model.regions.get("eyes", [])] = True
    regions["mouth_interior"][model.regions.get("mouth_interior", [])] = True
    surface = ~(regions["eyeballs"] | regions["mouth_interior"])
    # ears: beside the face contour at ear height (lm 0 / 16, or outside the brows where the model lacks them)
    if 0 in lm and 16 in lm:
        side_x, ear_y, ear_z = abs(lm[0][0] - lm[16][0]) / 2 + 0.06 * unit, lm[0][1], lm[0][2]
    else:
        side_x, ear_y, ear_z = 1.2 * abs(lm[17][0] - lm[26][0]) / 2, eye_r[1], eye_r[2] - 0.8 * unit
    nose_y = lm[30][1]
    regions["ears"] = (
        surface
        & (np.abs(t[:, 0]) > side_x)
        & (t[:, 1] > nose_y - 0.45 * unit)
        & (t[:, 1] < ear_y + 0.5 * unit)
        & (t[:, 2] > ear_z - 1.2 * unit)
        & (t[:, 2] < ear_z + 0.2 * unit)
    )
    # nose: near the bridge-to-tip line (27 -> 30) or the nostrils (31-35)
    bridge = _distance_to_segment(t, lm[27], lm[30])
    nostrils = np.min([np.linalg.norm(t - lm[i], axis=1) for i in range(31, 36)], 0)
    front = t[:, 2] > lm[30][2] - 0.7 * unit
    regions["nose"] = surface & front & ((bridge < 0.3 * unit) | (nostrils < 0.2 * unit))
    regions["eye_region"] = surface & (
        (np.linalg.norm(t - eye_r, axis=1) < 0.5 * unit) | (np.linalg.norm(t - eye_l, axis=1) < 0.5 * unit)
    )
    brow_y = max(lm[i][1] for i in range(17, 27))
    face = np.zeros(len(t), bool)
    face[model.regions.get("face", [])] = True
    regions["forehead"] = surface & face & (t[:, 1] > brow_y + 0.1 * unit) & (t[:, 2] > eye_r[2] - 0.8 * unit)
    neck = np.zeros(len(t), bool)
    neck[model.regions.get("neck", [])] = True
    chin_y = lm[8][1] if 8 in lm else nose_y - 1.3 * unit
    regions["lower_neck"] = surface & neck & (t[:, 1] < chin_y - 1.3 * unit)
    regions["neck"] = surface & neck
    scalp = np.zeros(len(t), bool)
    scalp[model.regions.get("scalp", [])] = True
    regions["scalp"] = surface & scalp
    regions["face"] = surface
    label = np.full(len(t), len(REGIONS) - 1)
    for index in reversed(range(len(REGIONS))):  # earlier names win
        label[regions[REGIONS[index]]] = index
    return label


def _distance_to_segment(points: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    ab = b - a
    t = np.clip(((points - a) @ ab) / max(float(ab @ ab), 1e-12), 0, 1)
    return np.linalg.norm(points - (a + t[:, None] * ab), axis=1)


def unique_edges(faces: np.ndarray) -> np.ndarray:
    edges = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
    return np.unique(np.sort(edges, 1), axis=0)


def uniform_laplacian(faces: np.ndarray, count: int) -> torch.Tensor:
    """Sparse (V, V) operator: each vertex minus the mean of its neighbours."""
    edges = unique_edges(faces)
    rows = np.concatenate([edges[:, 0], edges[:, 1]])
    cols = np.concatenate([edges[:, 1], edges[:, 0]])
    degree = np.bincount(rows, minlength=count).astype(np.float32)
    values = -1.0 / np.maximum(degree[rows], 1)
    index = np.stack([np.concatenate([rows, np.arange(count)]), np.concatenate([cols, np.arange(count)])])
    data = np.concatenate([values, (degree > 0).astype(np.float32)])
    return torch.sparse_coo_tensor(index, data.astype(np.float32), (count, count), check_invariants=False).coalesce()


def smoothed(values: np.ndarray, faces: np.ndarray, iterations: int) -> np.ndarray:
    """Per-vertex values averaged with their neighbours `iterations` times (blurs region weights)."""
    edges = unique_edges(faces)
    count = len(values)
    for _ in range(iterations):
        total = values.copy()
        np.add.at(total, edges[:, 0], values[edges[:, 1]])
        np.add.at(total, edges[:, 1], values[edges[:, 0]])
        degree = 1 + np.bincount(edges.ravel(), minlength=count)
        values = total / degree.reshape((-1,) + (1,) * (values.ndim - 1))
    return values


__all__ = ["HeadMesh", "REGIONS", "build_head_mesh", "uniform_laplacian", "smoothed"]

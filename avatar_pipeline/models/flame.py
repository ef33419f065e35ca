"""FLAME (2020 and 2023) from a user-given `generic_model.pkl` (or flame2023.pkl) and landmark embedding.

The official pickle is a latin-1 Python 2 pickle in which some arrays are chumpy objects and the joint
regressor is a scipy sparse matrix. chumpy breaks on current numpy, so it is never imported: its
classes are replaced by a stand-in that keeps the pickled state, from which the array (`x`) is taken.

Landmarks: DECA/EMOCA's `landmark_embedding.npy` (`full_lmk_faces_idx`, `full_lmk_bary_coords`: all 68
points) or RingNet's `flame_static_embedding.pkl` (`lmk_face_idx`, `lmk_b_coords`: iBUG points 17-67).
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..geometry import axis_angle_to_matrix
from .base import MorphableModel, Skinning

JOINT_NAMES = ["global", "neck", "jaw", "left_eye", "right_eye"]
NUM_SHAPE = 300  # shapedirs holds 300 identity then 100 expression components


class _Pickled:
    """Stand-in for classes we do not import (chumpy, old scipy.sparse paths): keeps the pickled state."""

    def __init__(self, *args, **kwargs):
        self.args = args

    def __setstate__(self, state):
        self.state = state


class _FlameUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if module.split(".")[0] == "chumpy" or module.startswith("scipy.sparse"):
            return type(name, (_Pickled,), {"module": module})
        return super().find_class(module, name)


def _array(value) -> np.ndarray:
    if isinstance(value, _Pickled):
        state = value.state if isinstance(value.state, dict) else {}
        if value.module.startswith("scipy.sparse"):
            from scipy import sparse

            shape = state.get("_shape") or state.get("shape")
            return sparse.csc_matrix((state["data"], state["indices"], state["indptr"]), shape=shape).toarray()
        if "x" in state:  # chumpy Ch: its value
            return np.asarray(state["x"])
        raise ValueError(f"unsupported pickled object {value.module}.{type(value).__name__}")
    return np.asarray(value)


def read_pickle(path: Path) -> dict:
    with open(path, "rb") as f:
        return _FlameUnpickler(f, encoding="latin1").load()


def _load_embedding(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if not path.exists():
        raise InputError(
            str(path),
            "FLAME landmark embedding not found",
            "set model.flame_landmarks to landmark_embedding.npy (DECA) or flame_static_embedding.pkl",
        )
    if path.suffix == ".npy":
        data = np.load(path, allow_pickle=True, encoding="latin1")
        data = data.item() if data.dtype == object else data
    else:
        data = read_pickle(path)
    if "full_lmk_faces_idx" in data:
        faces = _array(data["full_lmk_faces_idx"]).reshape(-1).astype(np.int64)
        bary = _array(data["full_lmk_bary_coords"]).reshape(-1, 3).astype(np.float32)
        ids = np.arange(68)
    elif "lmk_face_idx" in data:
        faces = _array(data["lmk_face_idx"]).reshape(-1).astype(np.int64)
        bary = _array(data["lmk_b_coords"]).reshape(-1, 3).astype(np.float32)
        ids = np.arange(68 - len(faces), 68)  # the static embedding leaves out the jaw line
    else:
        raise InputError(
            str(path),
            "no landmark arrays (full_lmk_faces_idx or lmk_face_idx) in the embedding",
            "use DECA's landmark_embedding.npy or RingNet's flame_static_embedding.pkl",
        )
    return faces, bary, ids


def load(
    model_path: str | Path,
    landmarks_path: str | Path,
    num_identity: int = 100,
    num_expression: int = 50,
    uv_path: str | Path | None = None,
) -> MorphableModel:
    model_path, landmarks_path = Path(model_path), Path(landmarks_path)
    if not model_path.exists():
        raise InputError(
            str(model_path),
            "FLAME model file not found",
            "download FLAME (registration required) and set model.flame_path to generic_model.pkl",
        )
    try:
        raw = read_pickle(model_path)
        template = _array(raw["v_template"]).astype(np.float32)
        faces = _array(raw["f"]).astype(np.int64)
        shapedirs = _array(raw["shapedirs"]).astype(np.float32)
        posedirs = _array(raw["posedirs"]).astype(np.float32)
        regressor = _array(raw["J_regressor"]).astype(np.float32)
        weights = _array(raw["weights"]).astype(np.float32)
        parents = _array(raw["kintree_table"])[0].astype(np.int64)
    except (KeyError, ValueError, pickle.UnpicklingError, EOFError, AttributeError) as e:
        raise InputError(
            str(model_path),
            f"not a FLAME model pickle ({type(e).__name__}: {e})",
            "point model.flame_path at FLAME's generic_model.pkl / flame2023.pkl",
        ) from None
    num_vertices = len(template)
    if shapedirs.shape[:2] != (num_vertices, 3) or shapedirs.shape[2] <= NUM_SHAPE:
        raise InputError(
            str(model_path),
            f"shapedirs has shape {shapedirs.shape}, expected ({num_vertices}, 3, 400)",
            "use the FLAME 2020 or 2023 model file",
        )
    parents[0] = -1
    lmk_faces, lmk_bary, lmk_ids = _load_embedding(landmarks_path)
    if lmk_faces.max() >= len(faces):
        raise InputError(
            str(landmarks_path),
            "landmark triangles beyond the model's faces",
            "use the embedding that belongs to this FLAME version",
        )
    skinning = Skinning(
        joint_names=JOINT_NAMES[: len(parents)],
        parents=parents,
        joint_regressor=regressor,
        weights=weights,
        pose_basis=posedirs,
    )
    # FLAME publishes no region list: eyes from the skinning weights, neck below the chin, face in front
    # of the ears; FLAME 2020 has no mouth interior (the mouth is a hole)
    dominant = weights.argmax(1)
    chin_y = template[faces[lmk_faces[lmk_ids == 8]], 1].mean() if (lmk_ids == 8).any() else template[:, 1].min()
    eyes = dominant >= 3
    neck = (template[:, 1] < chin_y) & ~eyes
    front = template[:, 2] > np.percentile(template[:, 2], 55)
    regions = {
        "face": np.flatnonzero(front & ~neck & ~eyes),
        "scalp": np.flatnonzero(~front & ~neck & ~eyes),
        "neck": np.flatnonzero(neck),
        "eyes": np.flatnonzero(eyes),
        "mouth_interior": np.zeros(0, np.int64),
    }
    return MorphableModel(
        name="flame",
        template=template,
        faces=faces,
        identity_basis=shapedirs[:, :, : min(num_identity, NUM_SHAPE)],
        expression_basis=shapedirs[:, :, NUM_SHAPE : NUM_SHAPE + num_expression],
        expression_names=[f"exp{k:02d}" for k in range(min(num_expression, shapedirs.shape[2] - NUM_SHAPE))],
        landmark_faces=lmk_faces,
        landmark_bary=lmk_bary,
        landmark_ids=lmk_ids,
        regions=regions,
        skinning=skinning,
        expression_prior="gaussian",
        **(_uv_template(Path(uv_path), faces, eyes) if uv_path else {}),
    )


def _uv_template(path: Path, faces: np.ndarray, eyes: np.ndarray) -> dict:
    """FLAME's texture coordinates from its UV template: head_template.obj (vt and f v/vt lines, as in the
    FLAME 2020 download) or an .npz with `vt` (T, 2) and `ft` (F, 3) (FLAME_texture.npz). The triangles
    must be the model's, in its order. One chart for the head; the eyeballs get their own."""
    how = "give model.flame_uvs the head_template.obj or FLAME_texture.npz of the same FLAME release"
    if not path.exists():
        raise InputError(str(path), "FLAME UV template not found", how)
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as data:
                uvs, uv_faces = data["vt"].astype(np.float32), data["ft"].astype(np.int64)
        else:
            from .ict import parse_obj

            _, obj_faces, uvs, uv_faces = parse_obj(path.read_bytes(), with_faces=True)
            if len(obj_faces) == len(faces) and not np.array_equal(obj_faces, faces):
                raise InputError(str(path), "its triangles are not the model's", how)
    except (KeyError, ValueError, OSError) as e:
        raise InputError(str(path), f"not a FLAME UV template ({type(e).__name__}: {e})", how) from None
    if uv_faces.shape != faces.shape or (uv_faces < 0).any() or uv_faces.max() >= len(uvs):
        raise InputError(
            str(path),
            f"has texture coordinates for {len(uv_faces)} triangles (or none), the model has {len(faces)}",
            how,
        )
    charts = np.where(eyes[faces].all(1), 2, 0).astype(np.int8)
    return {"uvs": uvs.clip(0, 1), "uv_faces": uv_faces, "face_charts": charts}


def skin_vertices(model: MorphableModel, verts, joint_rotations, subset, cache, identity, expression):
    """Pose-corrective offsets and linear blend skinning for (a subset of) shaped vertices.

    Joints come from the full shaped mesh (template + identity + expression through the regressor),
    computed from pre-regressed bases so a subset evaluation stays cheap."""
    import torch

    skin = model.skinning
    device = verts.device
    key = "skinning"
    if key not in cache:
        reg = skin.joint_regressor
        cache[key] = {
            "j_template": torch.as_tensor(reg @ model.template, dtype=torch.float32, device=device),
            "j_identity": torch.as_tensor(
                np.einsum("jv,vck->jck", reg, model.identity_basis), dtype=torch.float32, device=device
            ),
            "j_expression": torch.as_tensor(
                np.einsum("jv,vck->jck", reg, model.expression_basis), dtype=torch.float32, device=device
            ),
            "pose_basis": torch.as_tensor(skin.pose_basis, dtype=torch.float32, device=device),
            "weights": torch.as_tensor(skin.weights, dtype=torch.float32, device=device),
        }
    c = cache[key]
    batch = verts.shape[0]
    joints = c["j_template"].expand(batch, -1, -1)
    if identity is not None:
        joints = joints + torch.einsum("jck,bk->bjc", c["j_identity"][..., : identity.shape[1]], identity)
    if expression is not None:  # FLAME regresses joints from the shaped mesh, expression included
        joints = joints + torch.einsum("jck,bk->bjc", c["j_expression"][..., : expression.shape[1]], expression)
    sel = slice(None) if subset is None else torch.as_tensor(subset, device=device)
    rot = axis_angle_to_matrix(joint_rotations)  # (B, J, 3, 3)
    eye = torch.eye(3, device=device)
    pose_feature = (rot[:, 1:] - eye).reshape(batch, -1)
    verts = verts + torch.einsum("vcp,bp->bvc", c["pose_basis"][sel], pose_feature)
    # world transforms along the kinematic chain
    transforms = []
    for j, parent in enumerate(skin.parents.tolist()):
        local_t = joints[:, j] - (joints[:, parent] if parent >= 0 else 0)
        local = torch.cat(
            [
                torch.cat([rot[:, j], local_t[..., None]], -1),
                torch.tensor([0, 0, 0, 1.0], device=device).expand(batch, 1, 4),
            ],
            1,
        )
        transforms.append(local if parent < 0 else transforms[parent] @ local)
    world = torch.stack(transforms, 1)  # (B, J, 4, 4)
    # remove the rest pose: a vertex at rest follows joint j's motion relative to its rest position
    rest = world[..., :3, :3] @ joints[..., None]
    world = torch.cat([world[..., :3, :3], world[..., :3, 3:] - rest], -1)  # (B, J, 3, 4)
    blended = torch.einsum("vj,bjrc->bvrc", c["weights"][sel], world)
    homo = torch.cat([verts, torch.ones_like(verts[..., :1])], -1)
    return torch.einsum("bvrc,bvc->bvr", blended, homo)

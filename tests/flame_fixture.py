"""Writes a small model file in FLAME's exact pickle layout (chumpy objects, an old-path scipy sparse
joint regressor, latin-1-readable protocol 2), so the loader and skinning are tested without the
licensed file."""

from __future__ import annotations

import contextlib
import pickle
import sys
import types
from pathlib import Path

import numpy as np
import trimesh

JOINTS = np.array([[0, -0.10, 0], [0, -0.05, 0], [0, -0.02, 0.03], [0.03, 0.03, 0.07], [-0.03, 0.03, 0.07]], np.float64)


@contextlib.contextmanager
def _fake_modules():
    """Modules named like chumpy's and old scipy's, so pickle records those paths."""
    saved = {k: sys.modules.get(k) for k in ("chumpy", "chumpy.ch", "scipy.sparse.csc")}
    chumpy, ch, csc = (types.ModuleType(n) for n in ("chumpy", "chumpy.ch", "scipy.sparse.csc"))

    class Ch:  # chumpy.ch.Ch: pickled through its __dict__, the value in 'x'
        pass

    class csc_matrix:  # noqa: N801 - the real class name
        pass

    Ch.__module__, Ch.__qualname__ = "chumpy.ch", "Ch"
    csc_matrix.__module__, csc_matrix.__qualname__ = "scipy.sparse.csc", "csc_matrix"
    ch.Ch, csc.csc_matrix = Ch, csc_matrix
    sys.modules.update({"chumpy": chumpy, "chumpy.ch": ch, "scipy.sparse.csc": csc})
    try:
        yield Ch, csc_matrix
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


def make_flame(folder: Path, seed: int = 0) -> tuple[Path, Path, dict]:
    """generic_model.pkl + landmark_embedding.npy in `folder`; returns their paths and the raw arrays."""
    rng = np.random.default_rng(seed)
    mesh = trimesh.creation.icosphere(subdivisions=2, radius=0.1)
    template = np.asarray(mesh.vertices, np.float64)
    faces = np.asarray(mesh.faces, np.uint32)
    v = len(template)
    shapedirs = rng.normal(0, 1e-3, (v, 3, 400))
    posedirs = rng.normal(0, 1e-4, (v, 3, 36))
    dist = np.linalg.norm(template[:, None] - JOINTS[None], axis=2)
    weights = np.exp(-dist / 0.01)
    weights /= weights.sum(1, keepdims=True)
    regressor = np.zeros((5, v))
    for j in range(5):  # each joint: the mean of its 4 nearest vertices
        regressor[j, np.argsort(dist[:, j])[:4]] = 0.25
    from scipy import sparse

    reg = sparse.csc_matrix(regressor)
    embedding = {
        "full_lmk_faces_idx": rng.integers(0, len(faces), (1, 68)),
        "full_lmk_bary_coords": rng.dirichlet([1, 1, 1], (1, 68)),
        "lmk_face_idx": rng.integers(0, len(faces), 51),
        "lmk_b_coords": rng.dirichlet([1, 1, 1], 51),
    }
    with _fake_modules() as (Ch, csc_matrix):

        def ch(x):
            obj = Ch()
            obj.__dict__.update({"x": x, "_dirty_vars": set(), "_itr": None, "_parents": {}})
            return obj

        sp = csc_matrix()
        sp.__dict__.update(
            {"data": reg.data, "indices": reg.indices, "indptr": reg.indptr, "_shape": reg.shape, "maxprint": 50}
        )
        model = {
            "f": faces,
            "v_template": template,
            "shapedirs": ch(shapedirs),
            "posedirs": posedirs,
            "J_regressor": sp,
            "weights": weights,
            "kintree_table": np.array([[4294967295, 0, 1, 1, 1], [0, 1, 2, 3, 4]]),
            "J": ch(regressor @ template),
            "bs_style": "lbs",
            "bs_type": "lrotmin",
        }
        folder.mkdir(parents=True, exist_ok=True)
        model_path = folder / "generic_model.pkl"
        with open(model_path, "wb") as f:
            pickle.dump(model, f, protocol=2)
    lmk_path = folder / "landmark_embedding.npy"
    np.save(lmk_path, embedding, allow_pickle=True)
    raw = {
        "template": template,
        "faces": faces,
        "shapedirs": shapedirs,
        "posedirs": posedirs,
        "weights": weights,
        "regressor": regressor,
        "embedding": embedding,
    }
    return model_path, lmk_path, raw


def make_flame_uvs(folder: Path, model_path: Path) -> Path:
    """head_template.obj in FLAME's UV-template layout (v, vt, f v/vt) for the fixture's mesh: a spherical
    unwrapping, one texture coordinate per vertex."""
    mesh = trimesh.creation.icosphere(subdivisions=2, radius=0.1)
    x, y, z = np.asarray(mesh.vertices).T
    u = np.arctan2(x, z) / (2 * np.pi) + 0.5
    v = (y - y.min()) / (y.max() - y.min())
    lines = [f"v {a:.6f} {b:.6f} {c:.6f}" for a, b, c in mesh.vertices]
    lines += [f"vt {a:.6f} {b:.6f}" for a, b in zip(u, v)]
    lines += [f"f {a}/{a} {b}/{b} {c}/{c}" for a, b, c in np.asarray(mesh.faces) + 1]
    path = folder / "head_template.obj"
    path.write_text("\n".join(lines) + "\n")
    return path

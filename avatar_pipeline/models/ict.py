"""ICT FaceKit light (MIT, USC ICT): full head with mouth interior, teeth and eyes; 100 identity PCA modes,
53 ARKit-named expression shapes, 68 Multi-PIE landmark vertices.

The release is a folder `FaceXModel/` of OBJs (neutral mesh, identity000-099, one OBJ per expression)
plus `vertex_indices.json`. `convert()` reads it once - from the folder, or straight from a .tar.xz /
.tar.gz / .zip of the repository - and the result is cached as one compressed .npz (MorphableModel.save).
"""

from __future__ import annotations

import json
import logging
import tarfile
import urllib.request
import zipfile
from pathlib import Path
from typing import Iterator

import numpy as np

from ..errors import InputError
from .base import MorphableModel, vertex_landmarks

log = logging.getLogger(__name__)

RELEASE_COMMIT = "da5f95a"
DOWNLOAD_URL = "https://github.com/ICT-VGL/ICT-FaceKit/archive/{commit}.tar.gz"
NUM_VERTICES = 26719
NUM_IDENTITY = 100
CM = 0.01  # the OBJs are in centimetres

# vertex ranges of the geometries (the release's documentation, 0-indexed, inclusive)
FACE = (0, 9408)
HEAD_AND_NECK = (9409, 11247)
MOUTH = [(11248, 13293), (14062, 17038), (17039, 21450)]  # mouth socket, gums and tongue, teeth
EYES = [(13294, 14061), (21451, 24590)]  # eye sockets, eyeballs


def _range(a: int, b: int) -> np.ndarray:
    return np.arange(a, b + 1)


def parse_obj(data: bytes, with_faces: bool = False):
    """Vertices (V, 3) float32 of an OBJ (fast path for large files); with_faces: also the triangulated
    faces (F, 3), texture coordinates (T, 2) and each triangle's texture-coordinate rows (F, 3)."""
    lines = data.split(b"\n")
    verts = np.array(b" ".join(line[2:] for line in lines if line.startswith(b"v ")).split(), np.float32)
    verts = verts.reshape(-1, 3)
    if not with_faces:
        return verts
    uvs = np.array(b" ".join(line[3:] for line in lines if line.startswith(b"vt ")).split(), np.float32)
    faces, uv_faces = [], []
    for line in lines:
        if line.startswith(b"f "):
            corners = [tok.split(b"/") for tok in line.split()[1:]]
            ids = [int(c[0]) - 1 for c in corners]
            tex = [int(c[1]) - 1 if len(c) > 1 and c[1] else -1 for c in corners]
            for k in range(1, len(ids) - 1):  # fan-triangulate quads
                faces.append((ids[0], ids[k], ids[k + 1]))
                uv_faces.append((tex[0], tex[k], tex[k + 1]))
    return verts, np.array(faces, np.int64), uvs.reshape(-1, 2), np.array(uv_faces, np.int64)


def _iter_release(source: Path) -> Iterator[tuple[str, bytes]]:
    """(file name inside FaceXModel/, bytes) for every file of the release, from a folder or an archive."""
    if source.is_dir():
        folder = source if (source / "vertex_indices.json").exists() else source / "FaceXModel"
        if not folder.is_dir():
            folder = next(iter(source.glob("*/FaceXModel")), folder)
        for path in sorted(folder.iterdir()):
            yield path.name, path.read_bytes()
        return
    name = source.name.lower()
    if name.endswith((".tar.xz", ".tar.gz", ".tgz", ".tar")):
        with tarfile.open(source, "r:*") as tar:
            for member in tar:
                if member.isfile() and "/FaceXModel/" in f"/{member.name}":
                    yield Path(member.name).name, tar.extractfile(member).read()
        return
    if name.endswith(".zip"):
        with zipfile.ZipFile(source) as zf:
            for info in zf.infolist():
                if "FaceXModel/" in info.filename and not info.is_dir():
                    yield Path(info.filename).name, zf.read(info)
        return
    raise InputError(
        str(source),
        "not a folder or a .tar.xz/.tar.gz/.zip of ICT FaceKit",
        "point model.ict_path at the repository folder or its archive",
    )


def check_converted(path: Path) -> MorphableModel:
    """An ict.npz written by an earlier conversion (results/_models/ict.npz), checked before it is reused."""
    try:
        model = MorphableModel.load(path)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InputError(
            str(path),
            f"not a converted ICT FaceKit model ({e})",
            "point model.ict_path at the ICT-FaceKit folder or archive, or at the ict.npz an earlier "
            "run wrote in results/_models",
        ) from None
    if model.name == "ict" and not model.has_uvs:
        raise InputError(
            str(path),
            "was converted by an earlier version of avatar-pipeline, without the texture coordinates",
            "rerun the ict_model rule (or point model.ict_path at the ICT-FaceKit release) to convert it again",
        )
    if model.name != "ict" or model.template.shape != (NUM_VERTICES, 3):
        raise InputError(
            str(path),
            f"holds the {model.name} model with {len(model.template)} vertices, not ICT FaceKit",
            "point model.ict_path at the ICT-FaceKit release or at an ict.npz written by the ict_model rule",
        )
    return model


def convert(source: str | Path) -> MorphableModel:
    source = Path(source)
    if not source.exists():
        raise InputError(
            str(source),
            "ICT FaceKit release not found",
            "run the pipeline's `ict_model` rule to download it, or set model.ict_path",
        )
    objs: dict[str, np.ndarray] = {}
    neutral = faces = None
    meta = None
    for fname, data in _iter_release(source):
        if fname == "vertex_indices.json":
            meta = json.loads(data)
        elif fname == "generic_neutral_mesh.obj":
            neutral, faces, uvs, uv_faces = parse_obj(data, with_faces=True)
        elif fname.endswith(".obj"):
            objs[fname[:-4]] = parse_obj(data)
    missing = []
    if meta is None:
        missing.append("vertex_indices.json")
    if neutral is None:
        missing.append("generic_neutral_mesh.obj")
    identities = [f"identity{k:03d}" for k in range(NUM_IDENTITY)]
    expressions = meta["expressions"] if meta else []
    missing += [f"{n}.obj" for n in identities + expressions if n not in objs]
    if missing:
        raise InputError(
            str(source),
            f"not a complete ICT FaceKit release: missing {', '.join(missing[:5])}"
            + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""),
            "re-download it (the `ict_model` rule) or fix model.ict_path",
        )
    for name in ["generic_neutral_mesh"] + identities + expressions:
        shape = neutral.shape if name == "generic_neutral_mesh" else objs[name].shape
        if shape != (NUM_VERTICES, 3):
            raise InputError(
                str(source),
                f"{name}.obj has {shape[0]} vertices, expected {NUM_VERTICES}",
                "the release is damaged or a different version; re-download it",
            )
    identity = np.stack([objs[n] - neutral for n in identities], 2) * CM
    expression = np.stack([objs[n] - neutral for n in expressions], 2) * CM
    lmk_vertices = np.array(meta["idx_to_landmark_verts"], np.int64)
    lmk_faces, lmk_bary = vertex_landmarks(faces, lmk_vertices)
    head = _range(*HEAD_AND_NECK)
    chin_y = neutral[lmk_vertices[8], 1]
    regions = {
        "face": _range(*FACE),
        "scalp": head[neutral[head, 1] > chin_y],
        "neck": head[neutral[head, 1] <= chin_y],
        "eyes": np.concatenate([_range(a, b) for a, b in EYES]),
        "mouth_interior": np.concatenate([_range(a, b) for a, b in MOUTH]),
    }
    return MorphableModel(
        name="ict",
        template=neutral * CM,
        faces=faces,
        identity_basis=identity.astype(np.float32),
        expression_basis=expression.astype(np.float32),
        expression_names=list(expressions),
        landmark_faces=lmk_faces,
        landmark_bary=lmk_bary,
        landmark_ids=np.arange(68),
        regions=regions,
        expression_prior="unit",
        **_uv_charts(faces, uvs, uv_faces),
    )


def _uv_charts(faces: np.ndarray, uvs: np.ndarray, uv_faces: np.ndarray) -> dict:
    """ICT's UVs are UDIM tiles (u in [0, 7)): tile 0 the face, 1 the back of the head and the sockets,
    2 gums and tongue, 3 teeth, 4-6 irises and eye fluids, and the eyeballs again in tile 0. Recast as
    the charts of base.UV_CHARTS: face (tiles 0-1 side by side), mouth (tiles 2-3), eyes (every eye part)."""
    tile = np.floor(uvs[uv_faces[:, 0], 0]).astype(int)
    eyes = np.isin(faces[:, 0], np.concatenate([_range(a, b) for a, b in EYES[1:]]))  # the eyeballs
    charts = np.where(eyes | (tile >= 4), 2, np.where(tile >= 2, 1, 0))
    # every triangle corner gets its own texture coordinate in its chart's unit square
    corner_uv = uvs[uv_faces].copy()  # (F, 3, 2)
    corner_uv[charts == 0, :, 0] /= 2
    corner_uv[charts == 1, :, 0] = (corner_uv[charts == 1, :, 0] - 2) / 2
    corner_uv[charts == 2, :, 0] /= 7
    return {
        "uvs": corner_uv.reshape(-1, 2).clip(0, 1).astype(np.float32),
        "uv_faces": np.arange(3 * len(faces)).reshape(-1, 3),
        "face_charts": charts.astype(np.int8),
    }


def download(dest: str | Path, commit: str = RELEASE_COMMIT) -> Path:
    """Fetch the repository archive at `commit` (needs internet; the pipeline's ict_model rule calls this)."""
    dest = Path(dest)
    url = DOWNLOAD_URL.format(commit=commit)
    log.info("downloading ICT FaceKit from %s", url)
    try:
        with urllib.request.urlopen(url, timeout=20) as response:
            data = response.read()
    except OSError as e:
        raise InputError(
            url,
            f"download failed ({e})",
            "download the ICT-FaceKit repository archive by hand and set model.ict_path to it",
        ) from None
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(".part")
    tmp.write_bytes(data)
    tmp.replace(dest)
    with tarfile.open(dest, "r:*") as tar:  # a cheap check before the long conversion
        if not any(m.name.endswith("FaceXModel/vertex_indices.json") for m in tar):
            raise InputError(str(dest), "the downloaded archive has no FaceXModel/", "check the URL or commit")
    return dest

"""Morphable models: FLAME from a file in its exact layout, ICT FaceKit from the real release."""

import pickle

import numpy as np
import pytest
import torch

from avatar_pipeline.errors import InputError
from avatar_pipeline.models import flame
from avatar_pipeline.models.base import MorphableModel, barycentric_points

from .flame_fixture import make_flame


@pytest.fixture(scope="module")
def flame_files(tmp_path_factory):
    return make_flame(tmp_path_factory.mktemp("flame"))


def test_flame_pickle_loads_without_chumpy(flame_files):
    import sys

    model_path, lmk_path, raw = flame_files
    assert b"chumpy" in model_path.read_bytes() and b"scipy.sparse.csc" in model_path.read_bytes()
    model = flame.load(model_path, lmk_path, num_identity=20, num_expression=10)
    assert "chumpy" not in sys.modules
    assert np.allclose(model.template, raw["template"], atol=1e-6)
    assert np.allclose(model.identity_basis, raw["shapedirs"][:, :, :20], atol=1e-6)
    assert np.allclose(model.expression_basis, raw["shapedirs"][:, :, 300:310], atol=1e-6)
    assert np.allclose(model.skinning.joint_regressor, raw["regressor"])
    assert model.skinning.parents.tolist() == [-1, 0, 1, 1, 1]
    assert model.landmark_ids.tolist() == list(range(68))
    assert np.array_equal(model.landmark_faces, raw["embedding"]["full_lmk_faces_idx"][0])


def test_flame_shape_and_expression_are_linear(flame_files):
    model = flame.load(*flame_files[:2], num_identity=20, num_expression=10)
    beta, psi = torch.randn(2, 20), torch.randn(2, 10)
    v = model.vertices(beta, psi, torch.zeros(2, 5, 3))
    expected = (
        model.template
        + np.einsum("vck,k->vc", model.identity_basis, beta[1].numpy())
        + np.einsum("vck,k->vc", model.expression_basis, psi[1].numpy())
    )
    assert np.allclose(v[1].numpy(), expected, atol=1e-5)


def test_flame_jaw_rotation_follows_linear_blend_skinning(flame_files):
    model_path, lmk_path, raw = flame_files
    model = flame.load(model_path, lmk_path, num_identity=5, num_expression=5)
    angle = 0.3
    pose = torch.zeros(1, 5, 3)
    pose[0, 2, 0] = angle  # open the jaw about x
    v = model.vertices(torch.zeros(1, 5), torch.zeros(1, 5), pose)[0].numpy()
    joints = raw["regressor"] @ raw["template"]
    c, s = np.cos(angle), np.sin(angle)
    rot = np.array([[1, 0, 0], [0, c, -s], [0, s, c]])
    pose_feature = np.zeros(36)
    pose_feature[9:18] = (rot - np.eye(3)).ravel()  # the jaw is the second non-root joint
    posed = raw["template"] + np.einsum("vcp,p->vc", raw["posedirs"], pose_feature)
    per_joint = np.stack([posed - joints[j] + joints[j] for j in range(5)], 1)  # identity for other joints
    per_joint[:, 2] = (posed - joints[2]) @ rot.T + joints[2]
    expected = np.einsum("vj,vjc->vc", raw["weights"], per_joint)
    assert np.abs(v - expected).max() < 1e-5
    moved = np.linalg.norm(v - raw["template"], axis=1)
    jaw_bound = raw["weights"][:, 2] > 0.5
    assert moved[jaw_bound].mean() > 0.002 and moved[raw["weights"][:, 2] < 1e-3].max() < 0.2 * moved[jaw_bound].mean()


def test_flame_neck_rotation_carries_the_jaw(flame_files):
    model = flame.load(*flame_files[:2], num_identity=5, num_expression=5)
    pose = torch.zeros(1, 5, 3)
    pose[0, 1, 1] = 0.5  # turn the neck about y
    v = model.vertices(torch.zeros(1, 5), torch.zeros(1, 5), pose)[0].numpy()
    jaw_bound = model.skinning.weights[:, 2] > 0.5
    assert np.linalg.norm(v[jaw_bound] - model.template[jaw_bound], axis=1).mean() > 0.005


def test_flame_static_embedding_and_bad_files(flame_files, tmp_path):
    model_path, _, raw = flame_files
    static = tmp_path / "flame_static_embedding.pkl"
    with open(static, "wb") as f:
        pickle.dump(
            {"lmk_face_idx": raw["embedding"]["lmk_face_idx"], "lmk_b_coords": raw["embedding"]["lmk_b_coords"]},
            f,
            protocol=2,
        )
    model = flame.load(model_path, static)
    assert model.landmark_ids.tolist() == list(range(17, 68))
    with pytest.raises(InputError, match="FLAME model file not found"):
        flame.load(tmp_path / "nope.pkl", static)
    bad = tmp_path / "bad.pkl"
    with open(bad, "wb") as f:
        pickle.dump({"f": np.zeros((1, 3))}, f)
    with pytest.raises(InputError, match="not a FLAME model pickle"):
        flame.load(bad, static)


def test_model_save_load_roundtrip(flame_files, tmp_path):
    model = flame.load(*flame_files[:2], num_identity=5, num_expression=5)
    model.save(tmp_path / "m.npz")
    again = MorphableModel.load(tmp_path / "m.npz")
    pose = torch.zeros(1, 5, 3)
    pose[0, 2, 0] = 0.2
    args = (torch.ones(1, 5) * 0.3, torch.ones(1, 5) * -0.2, pose)
    assert torch.allclose(model.vertices(*args), again.vertices(*args), atol=1e-6)
    assert again.regions.keys() == model.regions.keys()


def test_flame_reads_its_uv_template_and_keeps_it_through_save_and_load(flame_files, tmp_path):
    from .flame_fixture import make_flame_uvs

    model_path, lmk_path, raw = flame_files
    uvs = make_flame_uvs(tmp_path, model_path)
    model = flame.load(model_path, lmk_path, num_identity=5, num_expression=5, uv_path=uvs)
    assert model.has_uvs and model.uv_faces.shape == model.faces.shape and 0 <= model.uvs.min() <= model.uvs.max() <= 1
    model.save(tmp_path / "m.npz")
    again = MorphableModel.load(tmp_path / "m.npz")
    assert np.array_equal(again.uv_faces, model.uv_faces) and np.array_equal(again.face_charts, model.face_charts)
    assert not flame.load(model_path, lmk_path, num_identity=5, num_expression=5).has_uvs  # none without it
    other = tmp_path / "other.obj"
    other.write_text("v 0 0 0\nv 1 0 0\nv 0 1 0\nvt 0 0\nvt 1 0\nvt 0 1\nf 1/1 2/2 3/3\n")
    with pytest.raises(InputError, match="texture coordinates for 1 triangles(.|\n)*model.flame_uvs"):
        flame.load(model_path, lmk_path, num_identity=5, num_expression=5, uv_path=other)


def test_subset_evaluation_matches_full(flame_files):
    model = flame.load(*flame_files[:2], num_identity=5, num_expression=5)
    pose = torch.randn(3, 5, 3) * 0.1
    args = (torch.randn(3, 5), torch.randn(3, 5), pose)
    tri, w = model.landmark_vertices()
    full = barycentric_points(model.vertices(*args), tri, w)
    uniq, inverse = np.unique(tri, return_inverse=True)
    sub = barycentric_points(model.vertices(*args, subset=uniq), inverse.reshape(tri.shape), w)
    assert torch.allclose(full, sub, atol=1e-6)


@pytest.fixture(scope="session")
def ict_model(ict_npz):
    """The session's one conversion of the ICT FaceKit release (conftest.ict_status), loaded back."""
    return MorphableModel.load(ict_npz)


def test_ict_release_converts(ict_model):
    m = ict_model
    assert m.template.shape == (26719, 3) and m.identity_basis.shape == (26719, 3, 100)
    assert m.expression_basis.shape[2] == 53 and "jawOpen" in m.expression_names
    assert 0.2 < np.ptp(m.template[:, 0]) < 0.3  # a head about 25 cm wide: metres
    lmk = barycentric_points(torch.as_tensor(m.template)[None], *m.landmark_vertices())[0].numpy()
    assert lmk[36:42, 0].mean() < lmk[42:48, 0].mean()  # subject's right eye at -x (image left)
    assert lmk[8, 1] < lmk[30, 1] < lmk[27, 1]  # chin below nose tip below nose bridge
    jaw = m.vertices(expression=torch.eye(53)[m.expression_names.index("jawOpen")][None])
    chin_open = barycentric_points(jaw, *m.landmark_vertices())[0, 8].numpy()
    assert chin_open[1] < lmk[8, 1] - 0.01  # opening the jaw lowers the chin by centimetres
    assert set(m.regions) == {"face", "scalp", "neck", "eyes", "mouth_interior"}


def test_ict_incomplete_release_is_named(tmp_path):
    from avatar_pipeline.models import ict

    (tmp_path / "FaceXModel").mkdir()
    (tmp_path / "FaceXModel" / "vertex_indices.json").write_text('{"expressions": ["jawOpen"]}')
    with pytest.raises(InputError, match="not a complete ICT FaceKit release"):
        ict.convert(tmp_path)
    with pytest.raises(InputError, match="not found"):
        ict.convert(tmp_path / "missing")


def test_an_earlier_conversion_is_reused_and_a_foreign_npz_refused(ict_npz, flame_files, tmp_path):
    from avatar_pipeline.config import ModelConfig
    from avatar_pipeline.models import prepare_ict

    status = prepare_ict(ModelConfig(kind="ict", ict_path=str(ict_npz)), tmp_path / "reused")
    assert status["available"] and (tmp_path / "reused" / "ict.npz").read_bytes() == ict_npz.read_bytes()
    foreign = tmp_path / "flame.npz"
    flame.load(flame_files[0], flame_files[1]).save(foreign)
    with pytest.raises(InputError, match="flame.npz: holds the flame model .* not ICT FaceKit"):
        prepare_ict(ModelConfig(kind="ict", ict_path=str(foreign)), tmp_path / "foreign")
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not an npz")
    with pytest.raises(InputError, match="garbage.npz: not a converted ICT FaceKit model"):
        prepare_ict(ModelConfig(kind="ict", ict_path=str(garbage)), tmp_path / "garbage")

"""Face-mesh topology: triangles, contours and the iBUG-68 subset."""

import numpy as np

from avatar_pipeline import facemesh


def test_tessellation_read_without_mediapipe_matches_mediapipe():
    from mediapipe.python.solutions.face_mesh_connections import FACEMESH_TESSELATION

    assert facemesh.tessellation_edges() == FACEMESH_TESSELATION


def test_triangles_cover_the_mesh_and_close_the_eyes():
    tris = facemesh.triangles()
    assert tris.shape[1] == 3 and len(tris) > 850
    used = set(tris.ravel().tolist())
    assert set(range(468)) <= used
    assert facemesh.RIGHT_IRIS[0] in used and facemesh.LEFT_IRIS[0] in used
    assert len({tuple(sorted(t)) for t in tris.tolist()}) == len(tris)  # no duplicates


def test_triangles_face_the_viewer_on_a_real_frontal_face(w009):
    pts = w009.landmarks()["mp478"][0]
    tris = facemesh.triangles()
    a, b, c = (pts[tris[:, k], :2] for k in range(3))
    # counter-clockwise with y up == negative cross product in image coordinates (y down)
    cross = (b[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1]) - (b[:, 1] - a[:, 1]) * (c[:, 0] - a[:, 0])
    assert (cross < 0).mean() > 0.95


def test_ibug68_subset_is_well_formed(w009):
    idx = facemesh.IBUG68_FROM_MP478
    assert len(idx) == 68 and len(set(idx.tolist())) == 68 and idx.max() < 468
    p = w009.landmarks()["ibug68"][0, :, :2]
    assert np.all(np.diff(p[0:9, 1]) > -2)  # jaw descends from the right ear to the chin
    assert p[8, 1] == p[0:17, 1].max()  # the chin is the lowest jaw point
    assert p[36:42, 0].mean() < p[42:48, 0].mean()  # subject's right eye on the image's left
    assert p[17:27, 1].mean() < p[36:48, 1].mean() < p[30, 1] < p[48:68, 1].mean()  # brows, eyes, nose, mouth

"""Topology of mediapipe's 478-point face mesh: region contours, triangles, the iBUG-68 subset.

"left"/"right" are the subject's own sides (mediapipe's naming): the subject's right eye is on
the image's left in an unmirrored video.
"""

from __future__ import annotations

import functools
import importlib.util
from collections import defaultdict
from pathlib import Path

import numpy as np

NUM_POINTS = 478  # 468 mesh points + 2 x 5 iris points

# Closed contours, ordered (read off mediapipe's FACEMESH_* connection sets).
FACE_OVAL = [
    10,
    338,
    297,
    332,
    284,
    251,
    389,
    356,
    454,
    323,
    361,
    288,
    397,
    365,
    379,
    378,
    400,
    377,
    152,
    148,
    176,
    149,
    150,
    136,
    172,
    58,
    132,
    93,
    234,
    127,
    162,
    21,
    54,
    103,
    67,
    109,
]
RIGHT_EYE = [33, 246, 161, 160, 159, 158, 157, 173, 133, 155, 154, 153, 145, 144, 163, 7]
LEFT_EYE = [263, 466, 388, 387, 386, 385, 384, 398, 362, 382, 381, 380, 374, 373, 390, 249]
RIGHT_BROW = [70, 63, 105, 66, 107, 55, 65, 52, 53, 46]
LEFT_BROW = [300, 293, 334, 296, 336, 285, 295, 282, 283, 276]
LIPS_OUTER = [61, 185, 40, 39, 37, 0, 267, 269, 270, 409, 291, 375, 321, 405, 314, 17, 84, 181, 91, 146]
LIPS_INNER = [78, 191, 80, 81, 82, 13, 312, 311, 310, 415, 308, 324, 318, 402, 317, 14, 87, 178, 88, 95]
# upper / lower lip as closed polygons: outer arc then inner arc back
UPPER_LIP = [61, 185, 40, 39, 37, 0, 267, 269, 270, 409, 291, 308, 415, 310, 311, 312, 13, 82, 81, 80, 191, 78]
LOWER_LIP = [61, 146, 91, 181, 84, 17, 314, 405, 321, 375, 291, 308, 324, 318, 402, 317, 14, 87, 178, 88, 95, 78]
NOSE = [168, 6, 197, 195, 5, 4, 1, 19, 94, 2, 98, 97, 326, 327, 64, 294, 48, 278, 115, 344, 220, 440, 45, 275]
RIGHT_IRIS = [468, 469, 470, 471, 472]  # centre first
LEFT_IRIS = [473, 474, 475, 476, 477]
FOREHEAD_TOP, CHIN = 10, 152
RIGHT_CHEEK_EDGE, LEFT_CHEEK_EDGE = 234, 454

# iBUG 68 (Multi-PIE) points as mediapipe indices: jaw 0-16 (image left to right through the chin),
# brows 17-26, nose bridge 27-30, nostrils 31-35, eyes 36-47 (outer corner first), mouth 48-67.
IBUG68_FROM_MP478 = np.array(
    [
        127,
        234,
        93,
        132,
        58,
        172,
        136,
        149,
        152,
        378,
        365,
        397,
        288,
        361,
        323,
        454,
        356,  # jaw
        70,
        63,
        105,
        66,
        107,  # right brow, outer -> inner
        336,
        296,
        334,
        293,
        300,  # left brow, inner -> outer
        168,
        197,
        5,
        4,  # nose bridge down to the tip
        98,
        97,
        2,
        326,
        327,  # nostrils
        33,
        160,
        158,
        133,
        153,
        144,  # right eye
        362,
        385,
        387,
        263,
        373,
        380,  # left eye
        61,
        40,
        37,
        0,
        267,
        270,
        291,
        321,
        314,
        17,
        84,
        91,  # outer lips
        78,
        81,
        13,
        311,
        308,
        402,
        14,
        178,  # inner lips
    ],
    dtype=np.int64,
)
IBUG68_RIGHT_EYE = slice(36, 42)
IBUG68_LEFT_EYE = slice(42, 48)
IBUG68_OUTER_LIPS = slice(48, 60)


@functools.lru_cache(maxsize=1)
def tessellation_edges() -> frozenset:
    """mediapipe's FACEMESH_TESSELATION, read from its pure-Python table without importing mediapipe
    (whose start-up takes most of a second) - stages that only need the topology stay light."""
    spec = importlib.util.find_spec("mediapipe")
    table = Path(spec.submodule_search_locations[0]) / "python" / "solutions" / "face_mesh_connections.py"
    module_spec = importlib.util.spec_from_file_location("_facemesh_connections", table)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.FACEMESH_TESSELATION


@functools.lru_cache(maxsize=1)
def triangles() -> np.ndarray:
    """(T, 3) int triangles of the 478-point mesh (eyes closed over the iris centres), consistently
    oriented so that they face the viewer (counter-clockwise in a y-up frame) on a frontal face.

    mediapipe ships only the mesh's edges; its faces are the 3-cliques of that edge graph.
    """
    edges = tessellation_edges()
    neighbours: dict[int, set[int]] = defaultdict(set)
    for a, b in edges:
        neighbours[a].add(b)
        neighbours[b].add(a)
    tris = sorted({tuple(sorted((a, b, c))) for a, b in edges for c in neighbours[a] & neighbours[b]})
    # the mesh has holes at the eyes: close them with fans around the iris centres (points 468, 473)
    for contour, centre in ((RIGHT_EYE, RIGHT_IRIS[0]), (LEFT_EYE, LEFT_IRIS[0])):
        tris += [(centre, contour[k], contour[(k + 1) % len(contour)]) for k in range(len(contour))]
    return _orient_consistently(np.array(tris, dtype=np.int64))


def _orient_consistently(tris: np.ndarray) -> np.ndarray:
    """Flip triangles so neighbours traverse shared edges in opposite directions (breadth-first)."""
    edge_faces: dict[tuple[int, int], list[int]] = defaultdict(list)
    for f, (a, b, c) in enumerate(tris):
        for e in ((a, b), (b, c), (c, a)):
            edge_faces[tuple(sorted(e))].append(f)
    tris = tris.copy()
    done = np.zeros(len(tris), bool)
    for seed in range(len(tris)):
        if done[seed]:
            continue
        done[seed] = True
        queue = [seed]
        while queue:
            f = queue.pop()
            a, b, c = tris[f]
            for u, v in ((a, b), (b, c), (c, a)):
                for g in edge_faces[tuple(sorted((u, v)))]:
                    if done[g]:
                        continue
                    ga, gb, gc = tris[g]
                    directed = {(ga, gb), (gb, gc), (gc, ga)}
                    if (u, v) in directed:  # same direction: flip g
                        tris[g] = (ga, gc, gb)
                    done[g] = True
                    queue.append(g)
    # make the majority face a viewer looking at the canonical frontal face (mediapipe's layout is
    # image-like: x right, y down), i.e. counter-clockwise once y points up
    ref = canonical_frontal_xy()
    p = ref[tris]
    cross = (p[:, 1, 0] - p[:, 0, 0]) * (p[:, 2, 1] - p[:, 0, 1]) - (p[:, 1, 1] - p[:, 0, 1]) * (
        p[:, 2, 0] - p[:, 0, 0]
    )
    if np.sum(cross > 0) > np.sum(cross < 0):  # y-down: CCW-in-y-up shows up as negative cross
        tris = tris[:, [0, 2, 1]]
    return tris


@functools.lru_cache(maxsize=1)
def canonical_frontal_xy() -> np.ndarray:
    """A rough frontal layout (x right, y down) of the mesh points from the mesh connectivity alone:
    Tutte embedding with the face oval pinned to a circle. Good enough to orient triangles."""
    n = NUM_POINTS
    pos = np.zeros((n, 2))
    angles = np.linspace(0, 2 * np.pi, len(FACE_OVAL), endpoint=False)
    # FACE_OVAL runs from the forehead top towards image right (the subject's left) then down
    pos[FACE_OVAL] = np.stack([np.sin(angles), -np.cos(angles)], 1)
    fixed = np.zeros(n, bool)
    fixed[FACE_OVAL] = True
    adj = np.zeros((n, n))
    for a, b in tessellation_edges():
        adj[a, b] = adj[b, a] = 1
    for contour, centre in ((RIGHT_EYE, RIGHT_IRIS[0]), (LEFT_EYE, LEFT_IRIS[0])):
        adj[centre, contour] = adj[contour, centre] = 1
    lap = np.diag(adj.sum(1)) - adj
    free = ~fixed
    rhs = -lap[np.ix_(free, fixed)] @ pos[fixed]
    pos[free] = np.linalg.solve(lap[np.ix_(free, free)] + 1e-9 * np.eye(free.sum()), rhs)
    return pos

"""Neural Head Avatars' geometry where the truth is known.

    .venv/bin/python bench/nha_geometry.py          # -> bench/results/nha_geometry.json, nha_geometry.png
    .venv/bin/python bench/nha_geometry.py NAME '{"offset_lr": [1e-5, 1e-5, 2e-6]}'
                                                    # a variant of the fast preset -> nha_geometry_NAME.*

A synthetic subject: lp_d18's tracked ICT FaceKit head (its fitted identity, and its tracked expressions and
poses for every frame) with a known surface change the morphable model cannot express, a nose 4 mm larger
and 8 mm of volume on the scalp (along the normals, blended out over a few rings of vertices), rendered with
a known texture (flat colours per region with a fine UV pattern, Lambert shading) over a plain background.
Its caches are written as the stages would write them from a perfect detector and parser: the frames, the
478 face-mesh points and iBUG-68 points projected from the true surface, the parsing labels from the true
regions, the background plate. The pipeline's own `normals` and `tracking` stages then run on them, so the
tracked mesh is what this project's tracker makes of that face; an `nha` fast avatar trains on it.

Reported: the distance (mm) from the true surface's visible vertices to the NHA mesh and to the plain
tracked mesh, in the test frames (last 20%), under both test protocols (tracked parameters, and
expression and pose fitted to the frame), per region: nose, scalp, and the whole visible head. The paper
(its Table 2, real scans): 4.8-6.1 mm for the tracked FLAME mesh, 2.5-3.1 mm for NHA.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from avatar_pipeline import cache, facemesh, render  # noqa: E402
from avatar_pipeline.avatars import find, trainer  # noqa: E402
from avatar_pipeline.avatars.data import SubjectFrames  # noqa: E402
from avatar_pipeline.avatars.nha.mesh import REGIONS, base_regions, smoothed  # noqa: E402
from avatar_pipeline.config import ModelConfig, NormalsConfig, TrackingConfig, validate_config  # noqa: E402
from avatar_pipeline.geometry import project  # noqa: E402
from avatar_pipeline.models.base import barycentric_points  # noqa: E402
from avatar_pipeline.models.builtin import similarity  # noqa: E402
from avatar_pipeline.models.correspondence import closest_points  # noqa: E402
from avatar_pipeline.runtime import cpu_info, matmul_gflops  # noqa: E402
from avatar_pipeline.stages import normals as normals_stage  # noqa: E402
from avatar_pipeline.stages import tracking as tracking_stage  # noqa: E402
from avatar_pipeline.stages.tracking import model_vertices  # noqa: E402
from bench.nerface_bench import _write, head_commit  # noqa: E402
from bench.nha_bench import compare_bench  # noqa: E402

SOURCE = "lp_d18"
SUBJECT = "synthetic_ict_head"
WORK = REPO / "bench" / "work"
CHANGES_MM = {"nose": 4.0, "scalp": 8.0}  # outward along the canonical normals
AVATAR = {"method": "nha", "preset": "fast"}
BACKGROUND = np.array([0.62, 0.64, 0.66])
LIGHT = np.array([-0.3, -0.4, -1.0]) / np.linalg.norm([-0.3, -0.4, -1.0])  # toward the light, OpenCV camera
REGION_COLOURS = {  # albedo per region; the rest is skin
    "eyeballs": (0.92, 0.92, 0.9),
    "mouth_interior": (0.55, 0.18, 0.2),
    "scalp": (0.24, 0.17, 0.12),
}
SKIN = (0.82, 0.6, 0.5)
# parsing class of each mesh region (eyes and ears split by the side of the head)
REGION_CLASS = {
    "mouth_interior": "mouth",
    "nose": "nose",
    "eye_region": "skin",
    "forehead": "skin",
    "face": "skin",
    "lower_neck": "cloth",  # as the parsing labels a real subject's shoulders: not head
    "neck": "neck",
    "scalp": "hair",
}


def parsing_class(model, vertex: int, region: np.ndarray) -> str:
    name = REGIONS[region[vertex]]
    side = "l" if model.template[vertex, 0] > 0 else "r"  # the model's +x is the subject's left
    return {"eyeballs": f"{side}_eye", "ears": f"{side}_ear"}.get(name) or REGION_CLASS[name]


def true_displacement(model) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(V, 3) canonical displacement of the known surface change, and the vertices each change moves."""
    region = base_regions(model)
    normals = render.vertex_normals(torch.as_tensor(model.template), torch.as_tensor(model.faces)).numpy()
    displacement = np.zeros_like(model.template)
    moved = {}
    for name, millimetres in CHANGES_MM.items():
        weight = smoothed((region == REGIONS.index(name)).astype(np.float64), model.faces, 4)
        weight = np.clip(weight * 1.5, 0, 1)
        displacement += normals * (weight * millimetres / 1000)[:, None]
        moved[name] = np.flatnonzero(weight > 0.5)
    outward = model.template - model.template.mean(0)
    if (displacement * outward).sum(1)[moved["scalp"]].mean() <= 0:
        raise RuntimeError("the model's vertex normals point inward: the known change would shrink the head")
    return displacement.astype(np.float32), moved


def texture(uv: np.ndarray) -> np.ndarray:
    """A fine pattern (P,) in [-1, 1] over the UV domain: a few crossing waves."""
    rng = np.random.default_rng(7)
    total = np.zeros(len(uv))
    for _ in range(6):
        angle, frequency, phase = rng.uniform(0, np.pi), rng.uniform(25, 70), rng.uniform(0, 2 * np.pi)
        total += np.sin(frequency * (uv[:, 0] * np.cos(angle) + uv[:, 1] * np.sin(angle)) * 2 * np.pi + phase)
    return total / 6


def make_subject() -> dict:
    """Write the synthetic subject's caches (frames, landmarks, parsing, background), then run the
    pipeline's normals and tracking stages on them."""
    source = cache.SubjectCache(WORK / "results", SOURCE)
    store = cache.SubjectCache(WORK / "results", SUBJECT)
    if (store.stage_dir("tracking") / "tracking.npz").exists():
        return cache.read_json(store.root / "truth.json", "synthetic subject")
    model, data = source.tracked_model(), source.tracking()
    meta = source.crop_meta()
    size, count = meta["size"], len(meta["frames"])
    focal = float(data["focal"])
    displacement, moved = true_displacement(model)
    region = base_regions(model)
    faces = model.faces
    corner_uvs = model.uvs[model.uv_faces]
    class_of_vertex = np.array([cache.PARSING_CLASS_ID[parsing_class(model, v, region)] for v in range(len(region))])
    albedo = np.tile(np.array(SKIN), (len(region), 1))
    for name, colour in REGION_COLOURS.items():
        albedo[region == REGIONS.index(name)] = colour
    mp_points = np.full((count, facemesh.NUM_POINTS, 3), np.nan, np.float32)
    truth_cam = true_vertices(model, data, displacement, np.arange(count))
    plate = (BACKGROUND * 255).round().astype(np.uint8)
    for stage in ("crop", "parsing", "background", "landmarks"):
        shutil.rmtree(store.stage_dir(stage), ignore_errors=True)
    with cache.staged_dir(store.stage_dir("crop")) as crop, cache.staged_dir(store.stage_dir("parsing")) as parsing:
        for folder in (crop / "frames", parsing / "labels", parsing / "matte"):
            folder.mkdir(parents=True)
        for k in range(count):
            cam = torch.as_tensor(truth_cam[k])
            uv = project(cam, focal, size) - 0.5
            tri_id, ys, xs, corners, weights = render.rasterize_visible(uv, cam[:, 2], faces, size)
            w = weights.numpy()
            tri = tri_id[ys, xs]
            normals = render.vertex_normals(cam, torch.as_tensor(faces)).numpy()
            normal = (w[..., None] * normals[corners.numpy()]).sum(1)
            normal /= np.linalg.norm(normal, axis=1, keepdims=True).clip(1e-6)
            shade = 0.35 + 0.65 * np.clip(normal @ LIGHT, 0, 1)
            surface_uv = (w[..., None] * corner_uvs[tri]).sum(1)
            colour = (w[..., None] * albedo[corners.numpy()]).sum(1) * (1 + 0.15 * texture(surface_uv))[:, None]
            image = np.tile(BACKGROUND, (size, size, 1))
            image[ys, xs] = np.clip(colour * shade[:, None], 0, 1)
            cache.write_png(crop / "frames" / cache.frame_name(k), (image * 255).round().astype(np.uint8))
            dominant = corners.numpy()[np.arange(len(w)), w.argmax(1)]
            labels = np.zeros((size, size), np.uint8)
            labels[ys, xs] = class_of_vertex[dominant]
            matte = np.zeros((size, size), np.uint8)
            matte[ys, xs] = 255
            cache.write_png(parsing / "labels" / cache.frame_name(k), labels)
            cache.write_png(parsing / "matte" / cache.frame_name(k), matte)
            # the face-mesh points where tracking placed them on this head, on the true surface
            points = barycentric_points(cam[None], faces[data["mediapipe_faces"]], data["mediapipe_bary"])[0]
            pixels = project(points, focal, size).numpy()
            depth = (points[:, 2].numpy() - points[:, 2].numpy().mean()) * focal / float(points[:, 2].mean())
            mp_points[k, data["fit_point_ids"]] = np.concatenate([pixels, depth[:, None]], 1)
        for name in ("meta.json", "split.json"):
            shutil.copy(source.stage_dir("crop") / name, crop / name)
        cache.write_json(parsing / "meta.json", {"backend": "synthetic (the true mesh regions)"})
    for contour, iris in ((facemesh.RIGHT_EYE, facemesh.RIGHT_IRIS), (facemesh.LEFT_EYE, facemesh.LEFT_IRIS)):
        mp_points[:, iris] = mp_points[:, contour].mean(1, keepdims=True)
    with cache.staged_dir(store.stage_dir("landmarks")) as stage:
        ibug68 = mp_points[:, facemesh.IBUG68_FROM_MP478].copy()
        cache.write_npz(stage / "landmarks.npz", mp478=mp_points, ibug68=ibug68, valid=np.ones(count, bool))
        cache.write_json(stage / "meta.json", {"backend": "synthetic (projected from the true surface)"})
    with cache.staged_dir(store.stage_dir("background")) as stage:
        cache.write_png(stage / "background.png", np.tile(plate, (size, size, 1)))
        cache.write_png(stage / "coverage.png", np.full((size, size), 255, np.uint8))
        cache.write_json(stage / "background.json", {"source": "plate", "covered_fraction": 1.0})
    normals_stage.run(store, NormalsConfig())
    model_cfg = ModelConfig(kind="ict")
    tracking_stage.run(store, TrackingConfig(), model_cfg, WORK / "results" / "_models" / "ict.json")
    truth = {"changes_mm": CHANGES_MM, "moved_vertices": {k: len(v) for k, v in moved.items()}, "frames": count}
    cache.write_json(store.root / "truth.json", truth)
    np.savez(store.root / "truth.npz", displacement=displacement, **{f"moved_{k}": v for k, v in moved.items()})
    return truth


def true_vertices(model, data: dict, displacement: np.ndarray, frames: np.ndarray) -> np.ndarray:
    """Camera-space vertices of the true surface: the tracked head of the source frames plus the change
    (a head-space displacement, so it turns with the head)."""
    rotation = data["head_to_camera"][frames, :3, :3]
    return model_vertices(model, data, frames) + np.einsum("nij,vj->nvi", rotation, displacement)


def visible_vertices(cam: np.ndarray, faces: np.ndarray, focal: float, size: int) -> np.ndarray:
    """Vertices of the triangles a camera sees (corners of any visible triangle)."""
    uv = project(torch.as_tensor(cam), focal, size) - 0.5
    tri_id, _, _, _, _ = render.rasterize_visible(uv, torch.as_tensor(cam[:, 2]), faces, size)
    return np.unique(faces[np.unique(tri_id[tri_id >= 0])])


def distances_mm(points: np.ndarray, vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    return closest_points(points.astype(np.float64), vertices.astype(np.float64), faces, neighbours=12)[2] * 1000


def summary(millimetres: np.ndarray) -> dict:
    return {"mean_mm": round(float(millimetres.mean()), 2), "median_mm": round(float(np.median(millimetres)), 2)}


def measure(avatar: dict, name: str, output: str) -> dict:
    source = cache.SubjectCache(WORK / "results", SOURCE)
    store = cache.SubjectCache(WORK / "results", SUBJECT)
    spec = find("nha")
    cfg = spec.config_from(validate_config({"avatars": {"a": dict(avatar)}})["avatars"]["a"])
    train_dir = store.training_dir(name)
    trainer.train(spec, store, cfg, train_dir)  # (returns at once when a finished run is there)
    train_minutes = store.training_summary(name)["seconds"] / 60
    device = torch.device("cpu")
    frames = SubjectFrames(store, cfg.size, "train", **spec.model_class().training_data(cfg))
    model = trainer.load_trained(spec, cfg, frames, train_dir, device)
    test = SubjectFrames(store, cfg.size, "test", **spec.model_class().training_data(cfg))
    true_model, true_data = source.tracked_model(), source.tracking()
    tracked_model, tracked = store.tracked_model(), store.tracking()
    saved = np.load(store.root / "truth.npz")
    displacement = saved["displacement"]
    region = base_regions(true_model)
    focal = float(true_data["focal"])
    frames_used = np.asarray(test.frames)
    truth_cam = true_vertices(true_model, true_data, displacement, frames_used)
    plain_cam = model_vertices(tracked_model, tracked, frames_used)
    head = np.flatnonzero(~np.isin(region, [REGIONS.index(n) for n in ("eyeballs", "mouth_interior", "lower_neck")]))
    groups = {"nose": saved["moved_nose"], "scalp": saved["moved_scalp"], "head (visible)": head}
    # a monocular tracker knows the head's depth and size only up to the focal length it estimates: the
    # meshes are also compared after the similarity transform that best aligns the unchanged face (the
    # model's vertices come first in the NHA mesh, so both meshes have the truth's vertex order there)
    face = np.isin(region, [REGIONS.index(n) for n in ("face", "eye_region", "forehead")])
    anchors = np.flatnonzero(face & (np.abs(displacement).sum(1) == 0))
    results: dict = {"anchor_vertices": len(anchors)}
    error_maps = {}
    for protocol in ("tracked", "fitted"):
        views = model.test_views(protocol, test)
        sums: dict[str, list] = {}
        for i, view in enumerate(views):
            rotation, translation = model._view_pose(view)
            expression, joints = model._view_parameters(view)
            with torch.no_grad():
                verts, _, _ = model.posed(expression, model.tracked["identity"] + model.shape, joints, rotation[None])
            meshes = {
                "tracked_mesh": (plain_cam[i], tracked_model.faces),
                "nha": ((verts[0] @ rotation.T + translation).numpy(), model.mesh.faces),
            }
            seen = visible_vertices(truth_cam[i], true_model.faces, focal, cfg.size)
            for who, (vertices, faces) in meshes.items():
                scale, turn, shift = similarity(vertices[anchors], truth_cam[i][anchors])
                for space, placed in (("camera", vertices), ("aligned", scale * vertices @ turn + shift)):
                    for g, members in groups.items():
                        points = truth_cam[i][np.intersect1d(members, seen)]
                        if len(points):
                            sums.setdefault(f"{space}/{who}/{g}", []).append(distances_mm(points, placed, faces))
                    if space == "aligned" and protocol == "fitted" and i == len(views) // 2:
                        error_maps[who] = distances_mm(truth_cam[i], placed, faces)
                        error_frame = i
        results[protocol] = {key: summary(np.concatenate(v)) for key, v in sums.items()}
        print(protocol, results[protocol], flush=True)
    figure = REPO / "bench" / "results" / f"{output}.png"
    write_error_figure(figure, truth_cam[error_frame], true_model.faces, focal, cfg.size, error_maps)
    return {"train_minutes": round(train_minutes, 1), "test_frames": len(frames_used), "distances": results}


def write_error_figure(path: Path, cam: np.ndarray, faces: np.ndarray, focal: float, size: int, maps: dict) -> None:
    """The true surface of one test frame coloured by its distance to each aligned mesh (0 blue .. 8 mm red)."""
    import cv2

    panels = []
    cam = cam.astype(np.float32)
    uv = project(torch.as_tensor(cam), focal, size) - 0.5
    for name, mm in maps.items():
        value = torch.as_tensor(np.clip(mm / 8.0, 0, 1)[:, None], dtype=torch.float32)
        image, mask, _ = render.render_attributes(uv, torch.as_tensor(cam[:, 2]), faces, value, size)
        grey = (image[..., 0].numpy() * 255).astype(np.uint8)
        coloured = cv2.applyColorMap(grey, cv2.COLORMAP_JET)[..., ::-1].copy()
        coloured[~mask.numpy()] = 255
        cv2.putText(coloured, name, (6, 18), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
        panels.append(coloured)
    cache.write_png(path, np.concatenate(panels, 1))


def main(variant: str | None = None, overrides: dict | None = None) -> None:
    name, output = ("nha_fast", "nha_geometry") if variant is None else (f"nha_{variant}", f"nha_geometry_{variant}")
    avatar = {**AVATAR, **(overrides or {})}
    compare_bench([f"{SOURCE}.mp4"], tracking_only=True)  # the source's caches (nothing runs when present)
    truth = make_subject()
    figures = {
        "command": " ".join(["bench/nha_geometry.py"] + ([variant, json.dumps(overrides)] if variant else [])),
        "cpu": cpu_info(),
        "matmul_gflops_fp32": round(matmul_gflops(torch.float32), 1),
        "commit": head_commit(),
        "source": SOURCE,
        "truth": truth,
        "avatar": avatar,
        **measure(avatar, name, output),
    }
    _write(f"{output}.json", figures)


if __name__ == "__main__":
    if len(sys.argv) > 2:
        main(sys.argv[1], json.loads(sys.argv[2]))
    else:
        main()

"""What a Neural Head Avatar leaves beside its renders: the canonical textured mesh (OBJ + MTL + a baked
texture image), one mesh per test frame (PLY) and a video of the fitted mesh over the test frames.

The texture is baked by evaluating the texture network at every texel's surface point with the static
conditioning (closed mouth, frontal normal patch): the view- and expression-dependent parts of the avatar's
colour cannot live in a texture image. The charts (face, mouth, eyes) sit side by side in one atlas.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ... import cache, raster
from ...models.base import UV_CHARTS
from ...runtime import progress
from ...video import VideoWriter
from ..base import View


@torch.no_grad()
def canonical_mesh(model, folder: Path, texture_size: int) -> dict:
    """folder/canonical.obj, canonical.mtl, texture.png: the neutral head (identity fitted, expression zero,
    static offsets) in the model's frame (metres, y up, the face toward +z)."""
    folder.mkdir(parents=True, exist_ok=True)
    identity = model.tracked["identity"] + model.shape
    expression = torch.zeros(1, model.tracked["expression"].shape[1])
    joints = torch.zeros_like(model.tracked["joints"][:1]) if model.joints is not None else None
    verts, _, _ = model.posed(expression, identity, joints, torch.eye(3)[None])
    verts = verts[0].numpy()
    mesh = model.mesh
    atlas = _bake(model, texture_size)
    cache.write_png(folder / "texture.png", atlas)
    corner_uv = mesh.corner_uvs.reshape(-1, 2)
    charts = np.repeat(mesh.face_charts, 3)
    atlas_uv = np.stack([(charts + corner_uv[:, 0]) / len(UV_CHARTS), corner_uv[:, 1]], 1)
    lines = ["mtllib canonical.mtl", "usemtl head"]
    lines += [f"v {x:.6f} {y:.6f} {z:.6f}" for x, y, z in verts]
    lines += [f"vt {u:.6f} {v:.6f}" for u, v in atlas_uv]
    texture_ids = np.arange(len(atlas_uv)).reshape(-1, 3) + 1
    lines += [f"f {a}/{ta} {b}/{tb} {c}/{tc}" for (a, b, c), (ta, tb, tc) in zip(mesh.faces + 1, texture_ids)]
    cache.write_text(folder / "canonical.obj", "\n".join(lines) + "\n")
    cache.write_text(folder / "canonical.mtl", "newmtl head\nKa 1 1 1\nKd 1 1 1\nmap_Kd texture.png\n")
    return {"vertices": int(len(verts)), "triangles": int(len(mesh.faces)), "texture": list(atlas.shape[:2])}


def _bake(model, size: int) -> np.ndarray:
    """The atlas (size, 3 * size, 3) uint8: each chart's texels coloured by the texture network."""
    mesh = model.mesh
    encoding = model.normal_encoder(torch.tensor([0.0, 0.0, 1.0]).view(1, 3, 1, 1).expand(1, 3, 8, 8))[0, :, 4, 4]
    atlas = np.zeros((size, size * len(UV_CHARTS), 3), np.uint8)
    for chart in range(len(UV_CHARTS)):
        faces = np.flatnonzero(mesh.face_charts == chart)
        if not len(faces):
            continue
        # the chart's triangles laid out in texel space, v up as in OBJ files: each corner its own vertex
        uv = mesh.corner_uvs[faces].reshape(-1, 2).astype(np.float64)
        xy = np.stack([uv[:, 0], 1 - uv[:, 1]], 1) * size - 0.5
        triangles = np.arange(3 * len(faces)).reshape(-1, 3)
        tri_id = raster.rasterize(xy, np.zeros(len(xy)), triangles, size, size)
        canonical = model.canonical[torch.as_tensor(mesh.faces[faces])].reshape(-1, 3).numpy()
        values = np.concatenate([canonical, mesh.corner_uvs[faces].reshape(-1, 2)], 1)
        ys, xs, sampled = raster.interpolate(values, xy, triangles, tri_id)
        if not len(ys):
            continue
        sampled = torch.as_tensor(sampled, dtype=torch.float32)
        for start in range(0, len(ys), 65536):
            part = slice(start, start + 65536)
            count = len(sampled[part])
            rgb = model.texture(
                sampled[part, :3],
                sampled[part, 3:].clamp(0, 1),
                torch.full((count,), chart),
                encoding.expand(count, -1),
                torch.zeros(1, model.texture.condition_dim),
            )
            colours = (((rgb + 1) / 2).clamp(0, 1).numpy() * 255).round().astype(np.uint8)
            atlas[ys[part], xs[part] + chart * size] = colours
    return atlas


@torch.no_grad()
def frame_meshes(model, folder: Path, views: list[View], count: int) -> int:
    """folder/<frame>.ply for the first `count` test views: the fitted mesh in that frame's camera space
    (OpenCV axes, metres), so it overlays the frame through the camera's focal length."""
    import trimesh

    folder.mkdir(parents=True, exist_ok=True)
    written = 0
    for view in views[:count]:
        verts, rotation, translation = _posed_view(model, view)
        cam = (verts @ rotation.T + translation).numpy()
        trimesh.Trimesh(cam, model.mesh.faces, process=False).export(folder / f"{view.frame:06d}.ply")
        written += 1
    return written


@torch.no_grad()
def overlay_video(model, path: Path, views: list[View], images: list[np.ndarray], limit: int) -> None:
    """The fitted mesh, shaded by its normals, over each test frame (half transparent)."""
    size = views[0].size if views else 0
    with VideoWriter(path, size, size) as video:
        for view, image in progress(list(zip(views, images))[:limit], min(limit, len(views)), "nha: mesh overlay"):
            verts, rotation, translation = _posed_view(model, view)
            cam = verts @ rotation.T + translation
            r = model.rasterize(cam, view.focal, view.size)
            normals = model.normals_camera(verts, rotation)
            shade = ((r["w"][..., None] * normals[r["corners"]]).sum(1)[:, 2].abs().clamp(0, 1) * 0.8 + 0.2).numpy()
            frame = image.astype(np.float32).copy()
            ys, xs = r["ys"].numpy(), r["xs"].numpy()
            frame[ys, xs] = 0.35 * frame[ys, xs] + 0.65 * (255 * shade)[:, None] * np.array([0.75, 0.8, 0.95])
            video.write(frame.clip(0, 255).astype(np.uint8))


def _posed_view(model, view: View):
    rotation, translation = model._view_pose(view)
    expression, joints = model._view_parameters(view)
    verts, _, _ = model.posed(expression, model.tracked["identity"] + model.shape, joints, rotation[None])
    return verts[0], rotation, translation


__all__ = ["canonical_mesh", "frame_meshes", "overlay_video"]

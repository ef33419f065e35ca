"""Differentiable mesh rendering for the tracker: PyTorch3D's rasterizer when installed, else the project's own.

Both give, for every covered pixel, the visible triangle and screen-space barycentric weights that are
differentiable in the projected vertex positions; rendered attributes are those weights times the
triangle's vertex attributes. PyTorch3D rasterizes in C++/CUDA and differentiates its barycentrics
itself. The project's own path (PyTorch3D has no Linux wheel and cannot be built everywhere) takes
visibility from a hard rasterization (raster.rasterize: no gradient, like a z-buffer) and recomputes the
barycentric weights in torch from the projected vertices of each covered pixel's triangle (the approach
of deferred differentiable rasterizers). Screen-space barycentrics in both: exact for attributes on
small triangles, which is what a dense head mesh has at the resolutions used for fitting.
"""

from __future__ import annotations

import numpy as np
import torch

from . import raster
from .errors import InputError


def pick_rasterizer(choice: str) -> tuple[str, str]:
    """The rasterizer `choice` ("auto", "pytorch3d" or "own") resolves to, and why."""
    if choice == "own":
        return "own", "chosen in config (tracking.rasterizer: own)"
    try:
        import pytorch3d
        from pytorch3d.renderer.mesh.rasterize_meshes import rasterize_meshes  # noqa: F401
    except ImportError as e:
        if choice == "pytorch3d":
            raise InputError(
                "tracking.rasterizer: pytorch3d",
                f"PyTorch3D cannot be imported ({e})",
                "install PyTorch3D for this torch version (it has no Linux wheel on PyPI: build it from "
                "https://github.com/facebookresearch/pytorch3d) or set tracking.rasterizer to auto or own",
            ) from e
        return "own", f"PyTorch3D is not installed ({e}); the project's own rasterizer renders instead"
    return "pytorch3d", f"PyTorch3D {getattr(pytorch3d, '__version__', '(unknown version)')}"


def render_attributes(
    uv: torch.Tensor,
    depth: torch.Tensor,
    faces: np.ndarray,
    attributes: torch.Tensor,
    size: int,
    rasterizer: str = "own",
) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Render per-vertex `attributes` (V, C) of a mesh projected to pixel positions `uv` (V, 2; pixel
    centres at integers) with camera depth `depth` (V, positive in front) by `rasterizer` ("own" or
    "pytorch3d", see pick_rasterizer). Returns the image (size, size, C), the coverage mask (size, size)
    and the visible triangle per pixel (numpy, -1 where empty)."""
    tri_id, ys, xs, corners, weights = rasterize_visible(uv, depth, faces, size, rasterizer)
    image = attributes.new_zeros(size, size, attributes.shape[1])
    mask = torch.zeros(size, size, dtype=torch.bool)
    if len(ys) == 0:
        return image, mask, tri_id
    values = (attributes[corners] * weights[..., None]).sum(1)
    rows, cols = torch.as_tensor(ys), torch.as_tensor(xs)
    image = image.index_put((rows, cols), values)
    mask[rows, cols] = True
    return image, mask, tri_id


def rasterize_visible(uv: torch.Tensor, depth: torch.Tensor, faces: np.ndarray, size: int, rasterizer: str = "own"):
    """Hard visibility of a projected mesh (uv pixel positions, pixel centres at integers; depth positive in
    front): the visible triangle per pixel (numpy, -1 where empty), the covered pixels (ys, xs), their
    triangles' corners (P, 3) and barycentric weights (P, 3), differentiable in `uv`."""
    visible = _visible_pytorch3d if rasterizer == "pytorch3d" else _visible_own
    return visible(uv, depth, faces, size)


def _visible_own(uv: torch.Tensor, depth: torch.Tensor, faces: np.ndarray, size: int):
    """Visible triangle per pixel from the hard rasterizer, covered pixels (ys, xs), their triangles'
    corners (P, 3) and barycentric weights (P, 3) recomputed in torch so they carry gradients to `uv`."""
    tri_id = raster.rasterize(
        uv.detach().cpu().numpy().astype(np.float64), -depth.detach().cpu().numpy(), faces, size, size
    )
    ys, xs = np.nonzero(tri_id >= 0)
    corners = torch.as_tensor(faces[tri_id[ys, xs]], device=uv.device)
    if len(ys) == 0:
        return tri_id, ys, xs, corners, uv.new_zeros(0, 3)
    a, b, c = uv[corners[:, 0]], uv[corners[:, 1]], uv[corners[:, 2]]
    p = torch.stack([torch.as_tensor(xs, dtype=uv.dtype), torch.as_tensor(ys, dtype=uv.dtype)], 1).to(uv.device)
    e1, e2, ep = b - a, c - a, p - a
    den = e1[:, 0] * e2[:, 1] - e2[:, 0] * e1[:, 1]
    den = torch.where(den.abs() < 1e-9, torch.full_like(den, 1e-9), den)
    l1 = (ep[:, 0] * e2[:, 1] - e2[:, 0] * ep[:, 1]) / den
    l2 = (e1[:, 0] * ep[:, 1] - ep[:, 0] * e1[:, 1]) / den
    weights = torch.stack([1 - l1 - l2, l1, l2], 1).clamp(0, 1)
    return tri_id, ys, xs, corners, weights / weights.sum(1, keepdim=True).clamp_min(1e-6)


def _visible_pytorch3d(uv: torch.Tensor, depth: torch.Tensor, faces: np.ndarray, size: int):
    """The same from PyTorch3D's rasterizer (one face per pixel, no blur, screen-space barycentrics)."""
    from pytorch3d.renderer.mesh.rasterize_meshes import rasterize_meshes
    from pytorch3d.structures import Meshes

    # PyTorch3D's NDC: +x left, +y up, pixel column i (row j) centred at 1 - (2i + 1) / size; z = depth
    ndc = torch.stack([1 - (2 * uv[:, 0] + 1) / size, 1 - (2 * uv[:, 1] + 1) / size, depth], 1).float()
    mesh = Meshes(verts=[ndc], faces=[torch.as_tensor(faces, dtype=torch.int64, device=uv.device)])
    pix_to_face, _, bary, _ = rasterize_meshes(
        mesh, image_size=size, blur_radius=0.0, faces_per_pixel=1, perspective_correct=False
    )
    tri_id = pix_to_face[0, ..., 0].cpu().numpy().astype(np.int32)  # one mesh: packed face index = row of `faces`
    ys, xs = np.nonzero(tri_id >= 0)
    weights = bary[0, torch.as_tensor(ys, device=bary.device), torch.as_tensor(xs, device=bary.device), 0].to(uv.dtype)
    return tri_id, ys, xs, torch.as_tensor(faces[tri_id[ys, xs]], device=uv.device), weights


def vertex_normals(vertices: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """Area-weighted vertex normals (V, 3) of counter-clockwise triangles, differentiable."""
    a, b, c = vertices[faces[:, 0]], vertices[faces[:, 1]], vertices[faces[:, 2]]
    face_normals = torch.cross(b - a, c - a, dim=1)
    normals = torch.zeros_like(vertices).index_add(0, faces.reshape(-1), face_normals.repeat_interleave(3, 0))
    return normals / normals.norm(dim=1, keepdim=True).clamp_min(1e-12)

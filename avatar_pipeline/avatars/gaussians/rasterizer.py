"""A differentiable 3D Gaussian splatting rasterizer that runs without CUDA.

The image model is that of 3D Gaussian splatting (Kerbl et al. 2023): each Gaussian is projected to a 2D
Gaussian through the camera's local affine approximation (EWA splatting), with 0.3 px² added to its
covariance; every pixel composites its Gaussians front to back, alpha = opacity * exp(-q / 2) capped at
0.99, Gaussians below alpha 1/255 skipped, and a pixel stops once less than 1e-4 of its light is left.

Two ways to composite, which render the same image and gradients (tested against each other):
- on a CPU, compiled loops (cpu_kernels.py) walk the depth-sorted Gaussians over their pixels, forward and
  backward, the way the CUDA rasterizers walk a tile's list;
- on any device, tensor operations on a flat list of (pixel, Gaussian) pairs: each Gaussian pairs with the
  pixels of the box where its alpha can reach 1/255, pairs are sorted by pixel then depth, and a pixel's
  transmittance before each pair is a segmented cumulative sum of log(1 - alpha); autograd differentiates.

Cameras are OpenCV (x right, y down, z forward); pixel i spans [i, i + 1), as in geometry.project.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch

ALPHA_MIN = 1.0 / 255.0
ALPHA_MAX = 0.99
TRANSMITTANCE_MIN = 1e-4
BLUR = 0.3  # px², added to every projected covariance (3DGS's low-pass filter)
NEAR = 0.01  # camera units in front of which a Gaussian is dropped
FOV_GUARD = 1.3  # the projection's Jacobian is taken no further out than 1.3 x the half field of view


@dataclasses.dataclass
class Splats:
    """N Gaussians in one frame's head space: means (N, 3), unnormalised quaternions (N, 4) as w, x, y, z,
    scales (N, 3) (standard deviations along the rotated axes), opacities (N,) in [0, 1], colours (N, C)."""

    means: torch.Tensor
    quats: torch.Tensor
    scales: torch.Tensor
    opacities: torch.Tensor
    colours: torch.Tensor


def joined(a: Splats, b: Splats) -> Splats:
    """The Gaussians of both sets, a's first."""
    # (not dataclasses.astuple, which deep-copies the tensors and so cuts them from the autograd graph)
    return Splats(*(torch.cat([getattr(a, f.name), getattr(b, f.name)]) for f in dataclasses.fields(Splats)))


def quaternion_to_matrix(quats: torch.Tensor) -> torch.Tensor:
    """(..., 4) quaternions w, x, y, z (normalised here) -> (..., 3, 3) rotation matrices."""
    w, x, y, z = torch.nn.functional.normalize(quats, dim=-1).unbind(-1)
    rows = (
        (1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)),
        (2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)),
        (2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)),
    )
    return torch.stack([torch.stack(r, -1) for r in rows], -2)


def quaternion_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Hamilton product a * b of (..., 4) quaternions w, x, y, z (the rotation b, then a)."""
    aw, ax, ay, az = a.unbind(-1)
    bw, bx, by, bz = b.unbind(-1)
    return torch.stack(
        (
            aw * bw - ax * bx - ay * by - az * bz,
            aw * bx + ax * bw + ay * bz - az * by,
            aw * by - ax * bz + ay * bw + az * bx,
            aw * bz + ax * by - ay * bx + az * bw,
        ),
        -1,
    )


def project(splats: Splats, rotation: torch.Tensor, translation: torch.Tensor, focal: float, size: int):
    """Pixel centres (N, 2), 2D covariances (N, 2, 2) and depths (N,) of the Gaussians seen by the camera
    x_cam = rotation @ x + translation."""
    cam = splats.means @ rotation.T + translation
    depth = cam[:, 2]
    z = depth.clamp_min(NEAR)
    limit = FOV_GUARD * (size / 2) / focal
    x = (cam[:, 0] / z).clamp(-limit, limit) * z
    y = (cam[:, 1] / z).clamp(-limit, limit) * z
    zero = torch.zeros_like(z)
    jacobian = torch.stack(
        (torch.stack((focal / z, zero, -focal * x / z**2), -1), torch.stack((zero, focal / z, -focal * y / z**2), -1)),
        -2,
    )  # (N, 2, 3)
    # covariance = R S S^T R^T, so the projected one is A A^T with A = J W R S
    spread = quaternion_to_matrix(splats.quats) * splats.scales[:, None, :]
    a = jacobian @ rotation @ spread
    covariance = a @ a.transpose(1, 2) + BLUR * torch.eye(2, dtype=a.dtype, device=a.device)
    centres = focal * cam[:, :2] / z[:, None] + size / 2
    return centres, covariance, depth


@dataclasses.dataclass
class Pairs:
    """The (pixel, Gaussian) pairs that carry light, sorted by pixel and then front to back."""

    pixel: torch.Tensor  # (P,) flat pixel index y * size + x
    gaussian: torch.Tensor  # (P,) index into the splats


def conic(covariance: torch.Tensor) -> torch.Tensor:
    """(N, 3) the inverse 2D covariance as (a, b, c): q = a dx² + 2 b dx dy + c dy²."""
    xx, xy, yy = covariance[:, 0, 0], covariance[:, 0, 1], covariance[:, 1, 1]
    det = (xx * yy - xy * xy).clamp_min(1e-12)
    return torch.stack((yy / det, -xy / det, xx / det), -1)


def _power(d: torch.Tensor, ellipse: torch.Tensor) -> torch.Tensor:
    """-q / 2 for offsets d (P, 2) from the centres and the conics (P, 3)."""
    dx, dy = d[:, 0], d[:, 1]
    return -0.5 * (ellipse[:, 0] * dx * dx + ellipse[:, 2] * dy * dy) - ellipse[:, 1] * dx * dy


def _boxes(centres, covariance, depth, opacities, size: int):
    """The Gaussians that can reach a pixel, front to back (ids), and the inclusive pixel box of each one
    (x0, x1, y0, y1 over all N) where its alpha can reach ALPHA_MIN: where the Mahalanobis square
    q <= 2 ln(opacity / ALPHA_MIN)."""
    reach = 2 * torch.log((opacities / ALPHA_MIN).clamp_min(1.0))
    half_w = torch.sqrt(reach * covariance[:, 0, 0])
    half_h = torch.sqrt(reach * covariance[:, 1, 1])
    u, v = centres[:, 0], centres[:, 1]
    x0 = torch.ceil(u - half_w - 0.5).clamp(0, size)
    x1 = torch.floor(u + half_w - 0.5).clamp(-1, size - 1)
    y0 = torch.ceil(v - half_h - 0.5).clamp(0, size)
    y1 = torch.floor(v + half_h - 0.5).clamp(-1, size - 1)
    keep = (depth > NEAR) & (opacities > ALPHA_MIN) & (x1 >= x0) & (y1 >= y0)
    ids = keep.nonzero()[:, 0]
    return ids.index_select(0, torch.argsort(depth.index_select(0, ids))), x0, x1, y0, y1


@torch.no_grad()
def pair_up(centres, covariance, depth, opacities, size: int) -> Pairs:
    """The pairs a pixel composites: every Gaussian whose alpha at the pixel's centre reaches ALPHA_MIN, front
    to back, up to the one that would leave less than TRANSMITTANCE_MIN of the light (3DGS stops there, and
    that pair is not added). Found without gradients, so the differentiable pass only sees pairs that count.
    (1-D index_select and int32 indices throughout: tensor indexing is several times slower on a CPU.)"""
    device = centres.device
    # Gaussians numbered front to back, so that pairs listed Gaussian by Gaussian are in depth order
    ids, x0, x1, y0, y1 = _boxes(centres, covariance, depth, opacities, size)
    u, v = centres[:, 0], centres[:, 1]
    x0, y0 = x0.index_select(0, ids).int(), y0.index_select(0, ids).int()
    width = x1.index_select(0, ids).int() - x0 + 1
    counts = width * (y1.index_select(0, ids).int() - y0 + 1)
    slot = torch.repeat_interleave(torch.arange(len(ids), device=device, dtype=torch.int32), counts)
    local = torch.arange(len(slot), device=device, dtype=torch.int32) - (
        torch.cumsum(counts, 0, dtype=torch.int32) - counts
    ).index_select(0, slot)
    span = width.index_select(0, slot)
    row = torch.div(local, span, rounding_mode="floor")
    px = x0.index_select(0, slot) + local - row * span
    py = y0.index_select(0, slot) + row
    del local, span, row
    # only the pairs whose alpha reaches ALPHA_MIN (the box's corners lie outside the ellipse)
    ellipse = conic(covariance).index_select(0, ids)
    dx = px.to(centres.dtype) + 0.5 - u.index_select(0, ids).index_select(0, slot)
    dy = py.to(centres.dtype) + 0.5 - v.index_select(0, ids).index_select(0, slot)
    power = -0.5 * (ellipse[:, 0].index_select(0, slot) * dx * dx + ellipse[:, 2].index_select(0, slot) * dy * dy)
    power -= ellipse[:, 1].index_select(0, slot) * dx * dy
    alpha = opacities.index_select(0, ids).index_select(0, slot) * torch.exp(power)
    del dx, dy, power
    reaches = (alpha >= ALPHA_MIN).nonzero()[:, 0]
    slot, alpha = slot.index_select(0, reaches), alpha.index_select(0, reaches)
    pixel = (py * size + px).index_select(0, reaches)
    # a stable sort by pixel keeps each pixel's pairs front to back (NumPy's on a CPU: its stable sort is
    # about ten times faster than torch's on these runs of already sorted pixels)
    if pixel.device.type == "cpu":
        order = torch.from_numpy(np.argsort(pixel.numpy(), kind="stable"))
    else:
        order = torch.sort(pixel, stable=True).indices
    slot, pixel, alpha = slot.index_select(0, order), pixel.index_select(0, order), alpha.index_select(0, order)
    after = _log_transmittance(torch.log1p(-alpha.clamp(max=ALPHA_MAX)).double(), pixel)
    lit = (after >= math.log(TRANSMITTANCE_MIN)).nonzero()[:, 0]
    slot, pixel = slot.index_select(0, lit), pixel.index_select(0, lit).long()
    return Pairs(pixel, ids.index_select(0, slot.long()))


def composite_compiled(splats: Splats, centres, covariance, depth, size: int):
    """composite's image and alpha by the compiled CPU walk (cpu_kernels), which finds the pairs as it goes,
    and the number of pairs it composited."""
    from . import cpu_kernels

    with torch.no_grad():
        order, x0, x1, y0, y1 = _boxes(centres, covariance, depth, splats.opacities, size)
        boxes = torch.stack((x0, x1, y0, y1), 1).long()
    stats: dict = {}
    colour, alpha = cpu_kernels.Composite.apply(
        centres,
        conic(covariance),
        splats.opacities,
        splats.colours,
        order,
        boxes,
        size,
        (ALPHA_MIN, ALPHA_MAX, TRANSMITTANCE_MIN),
        stats,
    )
    return colour.reshape(size, size, -1), alpha.reshape(size, size), stats["pairs"]


def _log_transmittance(log_pass: torch.Tensor, pixel: torch.Tensor) -> torch.Tensor:
    """Log of the light left after each pair of pixel-sorted pairs: a running sum of log(1 - alpha) restarted
    at each pixel's first pair (in float64: the running sum over all pairs grows far beyond one pixel's)."""
    running = torch.cumsum(log_pass, 0)
    starts = torch.ones_like(pixel, dtype=torch.bool)
    starts[1:] = pixel[1:] != pixel[:-1]
    start = torch.cummax(torch.where(starts, torch.arange(len(pixel), device=pixel.device), 0), 0).values
    return running - (running - log_pass)[start]


def composite(splats: Splats, centres, covariance, pairs: Pairs, size: int):
    """Front-to-back alpha compositing of the pairs: colour (size, size, C) and alpha (size, size)."""
    g, pixel = pairs.gaussian, pairs.pixel
    channels = splats.colours.shape[1]
    dtype, device = splats.colours.dtype, splats.colours.device
    if len(g) == 0:
        zero = splats.colours.sum() * 0 + splats.means.sum() * 0  # keeps the graph for callers that backpropagate
        return zero + torch.zeros(size, size, channels, dtype=dtype, device=device), zero + torch.zeros(
            size, size, dtype=dtype, device=device
        )
    # one gather of everything a pair reads of its Gaussian (its gradient is one scatter)
    packed = torch.cat((centres, conic(covariance), splats.opacities[:, None], splats.colours), 1)
    centre, ellipse, opacity, colour = packed.index_select(0, g).split((2, 3, 1, channels), 1)
    row = torch.div(pixel, size, rounding_mode="floor")
    pixel_centre = torch.stack((pixel - row * size, row), -1).to(dtype) + 0.5
    alpha = (opacity[:, 0] * torch.exp(_power(pixel_centre - centre, ellipse))).clamp(max=ALPHA_MAX)
    log_pass = torch.log1p(-alpha).double()
    weight = alpha * torch.exp((_log_transmittance(log_pass, pixel) - log_pass).to(dtype))
    out = torch.zeros(size * size, channels + 1, dtype=dtype, device=device)
    out = out.index_add(0, pixel, torch.cat((weight[:, None] * colour, weight[:, None]), 1))
    out = out.reshape(size, size, channels + 1)
    return out[..., :channels], out[..., channels]


def _over(colour: torch.Tensor, alpha: torch.Tensor, background: torch.Tensor | None) -> torch.Tensor:
    """The premultiplied `colour` with coverage `alpha` over `background` (none: over black)."""
    return colour if background is None else colour + (1 - alpha)[..., None] * background


def rasterize(
    splats: Splats,
    rotation: torch.Tensor,
    translation: torch.Tensor,
    focal: float,
    size: int,
    background: torch.Tensor | None = None,
    compiled: bool | None = None,
):
    """Render the splats seen by the camera x_cam = rotation @ x + translation into a size x size image.

    Returns the image (size, size, C) (over `background` (size, size, C) where given), the alpha (size, size)
    and the number of (pixel, Gaussian) pairs composited. Differentiable in every field of `splats`.
    `compiled`: by the compiled CPU walk (None: where the splats are on the CPU), else by tensor operations
    on a list of pairs (any device)."""
    centres, covariance, depth = project(splats, rotation, translation, focal, size)
    if compiled is None:
        compiled = centres.device.type == "cpu"
    if compiled:
        colour, alpha, pairs = composite_compiled(splats, centres, covariance, depth.detach(), size)
    else:
        found = pair_up(centres.detach(), covariance.detach(), depth.detach(), splats.opacities.detach(), size)
        colour, alpha = composite(splats, centres, covariance, found, size)
        pairs = len(found.pixel)
    return _over(colour, alpha, background), alpha, pairs


def gsplat_rasterize(
    splats: Splats,
    rotation: torch.Tensor,
    translation: torch.Tensor,
    focal: float,
    size: int,
    background: torch.Tensor | None = None,
):
    """The same image from gsplat's CUDA rasterizer (only where CUDA and gsplat are present)."""
    import gsplat

    view = torch.eye(4, dtype=splats.means.dtype, device=splats.means.device)
    view[:3, :3], view[:3, 3] = rotation, translation
    intrinsics = torch.tensor(
        [[focal, 0, size / 2], [0, focal, size / 2], [0, 0, 1]], dtype=view.dtype, device=view.device
    )
    colours, alphas, _ = gsplat.rasterization(
        splats.means,
        splats.quats,
        splats.scales,
        splats.opacities,
        splats.colours,
        view[None],
        intrinsics[None],
        size,
        size,
        near_plane=NEAR,
        eps2d=BLUR,
        packed=False,
    )
    alpha = alphas[0, ..., 0]
    return _over(colours[0], alpha, background), alpha, None  # (gsplat does not count pairs)

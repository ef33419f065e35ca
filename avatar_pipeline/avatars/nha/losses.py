"""How image-space terms move a hard-rasterized mesh (the mechanism of the NHA authors' code, written anew).

A hard rasterizer has no gradient with respect to which surface point a pixel shows. Instead, every
covered pixel carries the screen position of its visible surface point, computed from the projected
vertices with the barycentric weights held fixed (so it equals the pixel, yet moves with the vertices).
`screen_sampled` reads a target image at covered pixels and, in the backward pass, turns the gradient
with respect to that read into a gradient of the screen position: the target's spatial gradient. A term
comparing a surface point's own value (its texture colour, its normal) with the target image there thus
moves the point toward where the image agrees with it.

`hole_filling_loss` is the silhouette and semantic term built on it: rendered pixels are pulled toward
nearby target pixels the mesh does not cover yet (holes), and rendered pixels outside the target are
pulled back toward it.
"""

from __future__ import annotations

import math

import torch


class _ScreenSampled(torch.autograd.Function):
    @staticmethod
    def forward(ctx, image: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor, screen: torch.Tensor):
        # central differences (one-sided at the border), per pixel unit of x (columns) and y (rows)
        gx = torch.zeros_like(image)
        gy = torch.zeros_like(image)
        gx[:, 1:-1] = (image[:, 2:] - image[:, :-2]) / 2
        gx[:, 0], gx[:, -1] = image[:, 1] - image[:, 0], image[:, -1] - image[:, -2]
        gy[1:-1] = (image[2:] - image[:-2]) / 2
        gy[0], gy[-1] = image[1] - image[0], image[-1] - image[-2]
        ctx.save_for_backward(gx[ys, xs], gy[ys, xs])
        return image[ys, xs]

    @staticmethod
    def backward(ctx, grad_output):
        gx, gy = ctx.saved_tensors
        grad_screen = torch.stack([(grad_output * gx).sum(-1), (grad_output * gy).sum(-1)], -1)
        return None, None, None, grad_screen


def screen_sampled(image: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor, screen: torch.Tensor) -> torch.Tensor:
    """image (H, W, C) (no gradient) at the covered pixels (ys, xs) -> (P, C); the backward pass sends the
    image's spatial gradient to `screen` (P, 2), the screen positions (x, y) of the visible surface points."""
    return _ScreenSampled.apply(image.detach(), ys, xs, screen)


def gaussian_blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """(H, W, C) blurred by a separable Gaussian (reflected borders)."""
    radius = max(1, int(math.ceil(3 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=image.dtype)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = kernel / kernel.sum()
    channels = image.shape[-1]
    out = image.permute(2, 0, 1)[None]
    out = torch.nn.functional.pad(out, (radius, radius, radius, radius), mode="reflect")
    out = torch.nn.functional.conv2d(out, kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
    out = torch.nn.functional.conv2d(out, kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)
    return out[0].permute(1, 2, 0)


def masked_blur(image: torch.Tensor, mask: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur of `image` (H, W, C) using only the pixels of `mask` (H, W), renormalised; 0 outside."""
    weights = mask.to(image.dtype)[..., None]
    blurred = gaussian_blur(torch.cat([image * weights, weights], -1), sigma)
    return blurred[..., :-1] / blurred[..., -1:].clamp_min(1e-7) * weights


def hole_filling_loss(
    target: torch.Tensor,
    rendered: torch.Tensor,
    ys: torch.Tensor,
    xs: torch.Tensor,
    screen: torch.Tensor,
    sigma: float,
    uncovered: bool = False,
) -> torch.Tensor:
    """target (H, W, K) bool masks; rendered (P, K) bool: which covered pixel shows each class; `uncovered`:
    the rendering's value where the mesh is not (True for complement masks such as "not an eyeball").

    Every rendered pixel is drawn toward the blurred holes (target pixels no rendered pixel covers), and a
    rendered pixel outside the target toward the blurred union of target and rendering: its value is
    1 - those blurred masks read at the moving screen positions, normalised by the pixels involved."""
    size = target.shape[:2]
    shown = torch.full(size + (target.shape[2],), uncovered, dtype=torch.bool)
    shown[ys, xs] = rendered
    holes = gaussian_blur((target & ~shown).float(), sigma).clamp(0, 1)
    union = gaussian_blur((target | shown).float(), sigma).clamp(0, 1)
    outside = rendered & ~target[ys, xs]
    hole_alpha = screen_sampled(holes, ys, xs, screen)
    union_alpha = screen_sampled(union, ys, xs, screen)
    total = (1 - hole_alpha)[rendered].sum() + (1 - union_alpha)[outside].sum()
    return total / max(1, int(rendered.sum()) + int(outside.sum()))


def lid_distances(points: torch.Tensor, pairs) -> torch.Tensor:
    """(..., 68, 2) landmarks -> (..., len(pairs)) distances between the paired points."""
    a = points[..., [p[0] for p in pairs], :]
    b = points[..., [p[1] for p in pairs], :]
    return torch.sqrt(((a - b) ** 2).sum(-1) + 1e-7)


def frontal_trust(head_to_camera: torch.Tensor) -> torch.Tensor:
    """How far the semantic labels of a frame can be trusted, from its head-to-camera rotation (B, 3, 3):
    parsing is unreliable on profile views (the authors' weighting: sigmoid of 30 degrees minus the
    azimuth and of 20 degrees minus the elevation of the face direction)."""
    gaze = head_to_camera @ torch.tensor([0.0, 0.0, 1.0])  # the face's direction (model +z), camera space
    azimuth = torch.rad2deg(torch.atan2(gaze[:, 0], -gaze[:, 2]))
    elevation = torch.rad2deg(torch.asin(gaze[:, 1].clamp(-1, 1)))
    return torch.sigmoid(30 - azimuth.abs()) * torch.sigmoid(20 - elevation.abs())


__all__ = ["screen_sampled", "gaussian_blur", "masked_blur", "hole_filling_loss", "lid_distances", "frontal_trust"]

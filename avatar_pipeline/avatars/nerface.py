"""NeRFace (Gafni et al., CVPR 2021) building blocks: the conditioned radiance field and its volume
rendering with the static background as the colour of the last sample of every ray.

Following the paper: positional encoding with 10 frequencies for the position and 4 for the viewing
direction; the position, the expression vector and a learnable per-frame latent code (32-d) enter an
MLP of 8 fully connected layers of 256 units; one layer predicts density; a 4-layer, 128-unit branch
conditioned on the viewing direction predicts colour. Coarse and fine networks share this design;
64 stratified samples feed the coarse one, 64 more drawn from its weights feed the fine one.

Not yet wired into the pipeline (training, test-time latent optimisation and metrics are to come).
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn


@dataclasses.dataclass(frozen=True)
class FieldConfig:
    position_frequencies: int = 10
    direction_frequencies: int = 4
    expression_dim: int = 53
    latent_dim: int = 32
    width: int = 256
    depth: int = 8
    colour_width: int = 128
    colour_depth: int = 4


def positional_encoding(x: torch.Tensor, frequencies: int) -> torch.Tensor:
    """(..., D) -> (..., D * (1 + 2 * frequencies)): x, then sin and cos of 2^k x for k < frequencies."""
    scales = 2.0 ** torch.arange(frequencies, dtype=x.dtype, device=x.device)
    angles = (x[..., None, :] * scales[:, None]).flatten(-2)
    return torch.cat([x, angles.sin(), angles.cos()], -1)


class ConditionedField(nn.Module):
    """Density and colour at canonical-space points, given the frame's expression and latent code."""

    def __init__(self, cfg: FieldConfig = FieldConfig()):
        super().__init__()
        self.cfg = cfg
        pos_dim = 3 * (1 + 2 * cfg.position_frequencies)
        dir_dim = 3 * (1 + 2 * cfg.direction_frequencies)
        self.condition_dim = cfg.expression_dim + cfg.latent_dim
        layers, width_in = [], pos_dim + self.condition_dim
        for _ in range(cfg.depth):
            layers += [nn.Linear(width_in, cfg.width), nn.ReLU(inplace=True)]
            width_in = cfg.width
        self.backbone = nn.Sequential(*layers)
        self.density = nn.Linear(cfg.width, 1)
        branch, width_in = [], cfg.width + dir_dim
        for _ in range(cfg.colour_depth):
            branch += [nn.Linear(width_in, cfg.colour_width), nn.ReLU(inplace=True)]
            width_in = cfg.colour_width
        self.colour = nn.Sequential(*branch, nn.Linear(cfg.colour_width, 3))
        # He initialisation keeps the signal alive through the deep ReLU stack; with PyTorch's default
        # the 8-layer backbone starts nearly constant and the ReLU density can start dead everywhere
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
                nn.init.zeros_(module.bias)

    def forward(self, points: torch.Tensor, directions: torch.Tensor, condition: torch.Tensor):
        """points (..., 3), directions (..., 3) unit, condition (..., E + L) -> density (...,), rgb (..., 3)."""
        enc = positional_encoding(points, self.cfg.position_frequencies)
        features = self.backbone(torch.cat([enc, condition], -1))
        density = torch.relu(self.density(features)[..., 0])
        rgb = torch.sigmoid(self.colour(torch.cat([features, positional_encoding(directions, self.cfg.direction_frequencies)], -1)))
        return density, rgb


def stratified_depths(near: torch.Tensor, far: torch.Tensor, count: int, jitter: bool) -> torch.Tensor:
    """(R,) near/far -> (R, count) depths, one per equal bin (uniformly jittered within it when training)."""
    bins = torch.linspace(0.0, 1.0, count + 1, device=near.device)
    lower, width = bins[:-1], bins[1:] - bins[:-1]
    offsets = torch.rand(near.shape[0], count, device=near.device) if jitter else torch.full((near.shape[0], count), 0.5, device=near.device)
    t = lower + offsets * width
    return near[:, None] + (far - near)[:, None] * t


def importance_depths(depths: torch.Tensor, weights: torch.Tensor, count: int, jitter: bool) -> torch.Tensor:
    """Draw `count` more depths per ray from the piecewise-constant distribution of `weights` over the
    bins between consecutive `depths` (hierarchical sampling)."""
    mids = 0.5 * (depths[:, 1:] + depths[:, :-1])
    w = weights[:, 1:-1].detach() + 1e-5
    pdf = w / w.sum(-1, keepdim=True)
    cdf = torch.cat([torch.zeros_like(pdf[:, :1]), pdf.cumsum(-1)], -1)
    u = torch.rand(depths.shape[0], count, device=depths.device) if jitter else \
        torch.linspace(0.0, 1.0, count, device=depths.device).expand(depths.shape[0], count)
    idx = torch.searchsorted(cdf, u.contiguous(), right=True).clamp(1, cdf.shape[-1] - 1)
    lo, hi = cdf.gather(-1, idx - 1), cdf.gather(-1, idx)
    t_lo, t_hi = mids.gather(-1, idx - 1), mids.gather(-1, idx)
    frac = torch.where(hi - lo > 1e-8, (u - lo) / (hi - lo), torch.zeros_like(u))
    return t_lo + frac * (t_hi - t_lo)


def composite(density: torch.Tensor, rgb: torch.Tensor, depths: torch.Tensor, background: torch.Tensor):
    """Volume rendering where the last sample of every ray is the background: it is fully opaque and has
    the background pixel's colour, so light not absorbed by the head shows the static background.

    density (R, S), rgb (R, S, 3), depths (R, S) sorted, background (R, 3) ->
    colour (R, 3), per-sample weights (R, S + 1) (the last one is the background's), foreground alpha (R,)."""
    deltas = depths[:, 1:] - depths[:, :-1]
    deltas = torch.cat([deltas, deltas[:, -1:]], -1)
    alpha = 1.0 - torch.exp(-density * deltas)
    alpha = torch.cat([alpha, torch.ones_like(alpha[:, :1])], -1)  # the background sample is opaque
    transmittance = torch.cumprod(torch.cat([torch.ones_like(alpha[:, :1]), 1.0 - alpha[:, :-1] + 1e-10], -1), -1)
    weights = alpha * transmittance
    colours = torch.cat([rgb, background[:, None]], 1)
    colour = (weights[..., None] * colours).sum(1)
    return colour, weights, weights[:, :-1].sum(-1)


def camera_rays(camera_to_head: torch.Tensor, focal: float, size: int, pixels: torch.Tensor):
    """Rays in head space through pixel centres (N, 2) (x, y) of a size x size image.

    camera_to_head (4, 4) in the OpenGL convention (the camera looks along -z, y up), as in the
    NeRFace export of the tracking stage. Returns origins (N, 3) and unit directions (N, 3)."""
    centre = size / 2.0
    x = (pixels[:, 0] + 0.5 - centre) / focal
    y = -(pixels[:, 1] + 0.5 - centre) / focal
    d_cam = torch.stack([x, y, -torch.ones_like(x)], -1)
    directions = torch.nn.functional.normalize(d_cam @ camera_to_head[:3, :3].T, dim=-1)
    return camera_to_head[:3, 3].expand_as(directions), directions


class NeRFaceRenderer(nn.Module):
    """Coarse and fine fields rendering rays of one frame: stratified samples for the coarse field,
    importance samples from its weights (plus the coarse ones) for the fine field."""

    def __init__(self, cfg: FieldConfig = FieldConfig(), coarse_samples: int = 64, fine_samples: int = 64):
        super().__init__()
        self.coarse, self.fine = ConditionedField(cfg), ConditionedField(cfg)
        self.coarse_samples, self.fine_samples = coarse_samples, fine_samples

    def forward(self, origins, directions, near, far, condition, background, jitter: bool = True):
        """origins/directions (R, 3), near/far (R,), condition (E + L,), background (R, 3) ->
        dict of coarse and fine colours (R, 3) and the fine foreground alpha (R,)."""
        out = {}
        depths = stratified_depths(near, far, self.coarse_samples, jitter)
        weights = None
        for name, field in (("coarse", self.coarse), ("fine", self.fine)):
            if name == "fine":
                extra = importance_depths(depths, weights[:, :-1], self.fine_samples, jitter)
                depths = torch.sort(torch.cat([depths, extra], -1), -1).values
            points = origins[:, None] + directions[:, None] * depths[..., None]
            dirs = directions[:, None].expand_as(points)
            cond = condition.expand(points.shape[:-1] + condition.shape[-1:])
            density, rgb = field(points, dirs, cond)
            colour, weights, alpha = composite(density, rgb, depths, background)
            out[name], out[f"{name}_alpha"] = colour, alpha
        return out

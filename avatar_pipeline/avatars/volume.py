"""Volume rendering shared by the NeRF-based avatars (NeRFace, Local Deformation Fields): the ray bounds
around the head, stratified and importance sampling along rays, compositing with the static background as
the last sample of every ray, an occupancy grid that lets rendering skip the samples in empty space, and a
full image rendered ray batch by ray batch."""

from __future__ import annotations

import logging
import math
from typing import Callable

import torch

from ..geometry import camera_rays, project
from .trainer import is_out_of_memory

log = logging.getLogger(__name__)

# rendering: rays whose foreground alpha after a first pass is below this show the background; a method's
# second pass may skip them. Rays also stop being traced once less than this share of their light is left
SKIP_EMPTY = 1e-4


def ray_bounds(camera_to_head: torch.Tensor, scene_radius: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Near and far depths of the rays from cameras (..., 4, 4): the ball of `scene_radius` around the head."""
    distance = camera_to_head[..., :3, 3].norm(dim=-1)
    return (distance - scene_radius).clamp_min(0.05), distance + scene_radius


def stratified_depths(near: torch.Tensor, far: torch.Tensor, count: int, jitter: bool) -> torch.Tensor:
    """(R,) near/far -> (R, count) depths, one per equal bin (uniformly jittered within it when training)."""
    bins = torch.linspace(0.0, 1.0, count + 1, device=near.device)
    lower, width = bins[:-1], bins[1:] - bins[:-1]
    offsets = (
        torch.rand(near.shape[0], count, device=near.device)
        if jitter
        else torch.full((near.shape[0], count), 0.5, device=near.device)
    )
    t = lower + offsets * width
    return near[:, None] + (far - near)[:, None] * t


def importance_depths(depths: torch.Tensor, weights: torch.Tensor, count: int, jitter: bool) -> torch.Tensor:
    """Draw `count` more depths per ray from the piecewise-constant distribution of `weights` over the
    bins between consecutive `depths` (hierarchical sampling)."""
    mids = 0.5 * (depths[:, 1:] + depths[:, :-1])
    w = weights[:, 1:-1].detach() + 1e-5
    pdf = w / w.sum(-1, keepdim=True)
    cdf = torch.cat([torch.zeros_like(pdf[:, :1]), pdf.cumsum(-1)], -1)
    u = (
        torch.rand(depths.shape[0], count, device=depths.device)
        if jitter
        else torch.linspace(0.0, 1.0, count, device=depths.device).expand(depths.shape[0], count)
    )
    idx = torch.searchsorted(cdf, u.contiguous(), right=True).clamp(1, cdf.shape[-1] - 1)
    lo, hi = cdf.gather(-1, idx - 1), cdf.gather(-1, idx)
    t_lo, t_hi = mids.gather(-1, idx - 1), mids.gather(-1, idx)
    frac = torch.where(hi - lo > 1e-8, (u - lo) / (hi - lo), torch.zeros_like(u))
    return t_lo + frac * (t_hi - t_lo)


def sample_widths(depths: torch.Tensor) -> torch.Tensor:
    """(R, S) sorted depths -> (R, S) the length of ray each sample stands for: up to the next sample, the
    last one as long as the one before it (the background sample comes after it)."""
    gaps = depths[:, 1:] - depths[:, :-1]
    return torch.cat([gaps, gaps[:, -1:]], -1)


def composite(density: torch.Tensor, rgb: torch.Tensor, depths: torch.Tensor, background: torch.Tensor):
    """Volume rendering where the last sample of every ray is the background: it is fully opaque and has
    the background pixel's colour, so light not absorbed by the head shows the static background.

    density (R, S), rgb (R, S, 3), depths (R, S) sorted, background (R, 3) ->
    colour (R, 3), per-sample weights (R, S + 1) (the last one is the background's), foreground alpha (R,)."""
    alpha = 1.0 - torch.exp(-density * sample_widths(depths))
    alpha = torch.cat([alpha, torch.ones_like(alpha[:, :1])], -1)  # the background sample is opaque
    transmittance = torch.cumprod(torch.cat([torch.ones_like(alpha[:, :1]), 1.0 - alpha[:, :-1] + 1e-10], -1), -1)
    weights = alpha * transmittance
    colours = torch.cat([rgb, background[:, None]], 1)
    colour = (weights[..., None] * colours).sum(1)
    return colour, weights, weights[:, :-1].sum(-1)


def distortion_loss(weights: torch.Tensor, depths: torch.Tensor, near: torch.Tensor, far: torch.Tensor):
    """Mip-NeRF 360's distortion loss (Barron et al. 2022, eq. 15), mean over rays: small when a ray's weight
    sits in one short stretch (an opaque surface, or nothing), large when it is spread along the ray (fog).
    weights (R, S) of the foreground samples at sorted depths (R, S), each sample standing for the interval up
    to the next one (as `composite` integrates); near/far (R,) map depths to [0, 1] along the ray."""
    span = (far - near)[:, None]
    widths = sample_widths(depths) / span
    mids = (depths - near[:, None]) / span + 0.5 * widths
    # sum over pairs of w_i w_j |m_i - m_j| in one pass: the mids are sorted, so each pair is counted once
    # from its later sample, against the weight and weighted mid of all before it
    weight_before = weights.cumsum(-1) - weights
    weighted_mid_before = (weights * mids).cumsum(-1) - weights * mids
    between = 2.0 * (weights * (mids * weight_before - weighted_mid_before)).sum(-1)
    within = (weights**2 * widths).sum(-1) / 3.0
    return (between + within).mean()


def march(
    evaluate: Callable[[torch.Tensor, slice], tuple[torch.Tensor, torch.Tensor]],
    depths: torch.Tensor,
    stop_below: float,
    segments: int = 4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Density (R, S) and colour (R, S, 3) of rays at sorted `depths` (R, S), computed by `evaluate(rays,
    samples)` (the density and colour of those rays (index tensor) at those samples (a slice)) one depth
    segment after another, front to back. Before each segment, rays with less than `stop_below` of their light
    left are dropped: their later samples count as empty, which changes their colour and opacity by less than
    `stop_below` (early ray termination, rendering only)."""
    rays, samples = depths.shape
    density = depths.new_zeros(rays, samples)
    rgb = depths.new_zeros(rays, samples, 3)
    deltas = sample_widths(depths)
    optical_depth = depths.new_zeros(rays)  # -log of the light left
    limit = -math.log(stop_below)
    step = -(-samples // segments)
    for a in range(0, samples, step):
        span = slice(a, min(a + step, samples))
        active = (optical_depth < limit).nonzero()[:, 0]
        if not len(active):
            break
        part_density, part_rgb = evaluate(active, span)
        density[active, span] = part_density
        rgb[active, span] = part_rgb
        optical_depth[active] += (part_density * deltas[active, span]).sum(-1)
    return density, rgb


def cell_occupied(occupied: torch.Tensor, unit_points: torch.Tensor) -> torch.Tensor:
    """Whether the cell of a (cells, cells, cells) grid over [-1, 1]^3 that holds each point (..., 3) is
    occupied; points outside the cube read the nearest border cell."""
    cells = occupied.shape[0]
    index = ((unit_points.clamp(-1, 1) + 1) * 0.5 * cells).long().clamp_max(cells - 1)
    return occupied[index[..., 0], index[..., 1], index[..., 2]]


class OccupancyGrid:
    """Which cells of a cube of half-size `radius` metres around the head hold any density: a sample in an
    empty cell is left out of the network and counts as empty space (density 0), as in the accelerated NeRFs
    (Instant-NGP, Plenoxels). A cell is empty when its highest measured density would absorb less than
    `threshold` of a ray's light over the cube's whole width: however many empty cells a ray crosses, the
    samples skipped change its colour and opacity by less than `threshold` (as far as the measure holds
    between the measured points; the occupied set is grown by one cell on every side for that).
    Points outside the cube are never culled."""

    def __init__(self, radius: float, cells: int, threshold: float, device: torch.device | str = "cpu"):
        self.radius, self.cells, self.threshold = radius, cells, threshold
        self.occupied = torch.ones(cells, cells, cells, dtype=torch.bool, device=device)
        self.density: torch.Tensor | None = None  # per cell, in the order of centres(); None until measured
        self.seen: torch.Tensor | None = None  # cells some training camera sees (None: all)

    @property
    def cell_size(self) -> float:
        return 2.0 * self.radius / self.cells

    def contains(self, points: torch.Tensor) -> torch.Tensor:
        """(..., 3) points in head space -> (...) bool: inside an occupied cell, or outside the cube."""
        unit = points / self.radius
        return (unit.abs() > 1).any(-1) | cell_occupied(self.occupied, unit)

    def centres(self) -> torch.Tensor:
        """(cells^3, 3) cell centres in head space, in the order of occupied.flatten()."""
        axis = (torch.arange(self.cells, device=self.occupied.device) + 0.5) * self.cell_size - self.radius
        return torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3)

    @torch.no_grad()
    def build(self, peak_density: Callable[[torch.Tensor], torch.Tensor], chunk: int = 65536) -> float:
        """Set the occupied cells from `peak_density(points (N, 3)) -> (N,)`, the highest density per metre at
        the points over whatever conditions the field takes, at the cell centres; returns the share of cells
        occupied."""
        self.density = _chunked(peak_density, self.centres(), chunk)
        return self.mark_occupied()

    @torch.no_grad()
    def update(
        self,
        density: Callable[[torch.Tensor], torch.Tensor],
        decay: float,
        generator: torch.Generator,
        chunk: int = 65536,
    ) -> float:
        """During training (Instant-NGP's update): each cell's density becomes the larger of its decayed old
        value and `density` at a random point in the cell, so a cell the field has emptied is freed after a few
        updates and one it fills is taken back at once; returns the share of cells occupied."""
        jitter = torch.rand(self.cells**3, 3, generator=generator) - 0.5
        points = self.centres() + jitter.to(self.occupied.device) * self.cell_size
        measured = _chunked(density, points, chunk)
        self.density = measured if self.density is None else torch.maximum(self.density * decay, measured)
        return self.mark_occupied()

    @torch.no_grad()
    def restrict_to_views(self, camera_to_head: torch.Tensor, focal: float, size: int) -> float:
        """Count as empty the cells no camera of (K, 4, 4) (OpenGL camera-to-head) sees any part of, as
        Instant-NGP does: no training ray ever reached them, so whatever density the fields hold there is
        untrained fog. Returns the share of cells seen."""
        centres = self.centres()
        reach = 0.5 * 3**0.5 * self.cell_size  # a cell's half diagonal
        seen = torch.zeros(len(centres), dtype=torch.bool, device=centres.device)
        gl_to_cv = centres.new_tensor([1.0, -1.0, -1.0])  # OpenGL camera space (looking down -z) to OpenCV
        for camera in camera_to_head.to(centres.device):
            local = (centres - camera[:3, 3]) @ camera[:3, :3] * gl_to_cv
            depth = local[:, 2]
            margin = (focal * reach / depth.clamp_min(1e-6))[:, None]
            pixels = project(local, focal, size)
            seen |= (depth > -reach) & ((pixels > -margin) & (pixels < size + margin)).all(-1)
        self.seen = seen
        if self.density is not None:
            self.mark_occupied()
        return float(seen.float().mean())

    def mark_occupied(self) -> float:
        """Set the occupied cells from the measured densities (and the cells seen); returns their share."""
        density = self.density if self.seen is None else self.density * self.seen
        opaque = (1.0 - torch.exp(-density * 2.0 * self.radius)) >= self.threshold
        grown = torch.nn.functional.max_pool3d(
            opaque.view(1, 1, *self.occupied.shape).float(), kernel_size=3, stride=1, padding=1
        )
        self.occupied = grown[0, 0] > 0
        return self.share

    @property
    def share(self) -> float:
        return float(self.occupied.float().mean())


def _chunked(function: Callable[[torch.Tensor], torch.Tensor], points: torch.Tensor, chunk: int) -> torch.Tensor:
    return torch.cat([function(points[a : a + chunk]) for a in range(0, len(points), chunk)])


@torch.no_grad()
def render_rays(
    trace: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    camera_to_head: torch.Tensor,
    focal: float,
    size: int,
    background: torch.Tensor,
    rays_per_call: int = 8192,
    shrink: Callable[[], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Full image (size, size, 3) and foreground alpha (size, size) on the CPU, from `trace(origins, dirs,
    background colours)` -> (colours, alphas) over batches of rays. Running out of memory halves the rays
    per call (and calls `shrink`, for the method to lower its own chunking) and tries again."""
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    pixels = torch.stack([xs.flatten(), ys.flatten()], 1).float()
    origins, dirs = camera_rays(camera_to_head, focal, size, pixels)
    bg = background.reshape(-1, 3)
    colour, alpha = [], []
    a = 0
    while a < len(pixels):
        sl = slice(a, a + rays_per_call)
        try:
            rgb, opacity = trace(origins[sl], dirs[sl], bg[sl])
        except RuntimeError as e:
            if not is_out_of_memory(e) or rays_per_call <= 64:
                raise
            rays_per_call //= 2
            if shrink is not None:
                shrink()
            log.warning("rendering ran out of memory: retrying with %d rays per call", rays_per_call)
            continue
        colour.append(rgb.cpu())
        alpha.append(opacity.cpu())
        a += len(origins[sl])
    return torch.cat(colour).reshape(size, size, 3), torch.cat(alpha).reshape(size, size)

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


def binned_weights(weights: torch.Tensor, depths: torch.Tensor, bins: torch.Tensor) -> torch.Tensor:
    """Weights (R, M) of samples at depths (R, M) gathered onto the nearest of the sorted depths `bins` (R, S):
    (R, S), each sample's weight counted at the bin sample it lies nearest to, as importance_depths spreads a
    bin sample's weight around it. A second pass's weights as a proposal over the first pass's samples."""
    mids = 0.5 * (bins[:, 1:] + bins[:, :-1])
    nearest = torch.searchsorted(mids.contiguous(), depths.contiguous())
    return weights.new_zeros(bins.shape).scatter_add_(1, nearest, weights)


def proposed_samples(proposal: torch.Tensor, order: torch.Tensor, empty_below: float) -> torch.Tensor:
    """Which samples of a ray to compute when its fine samples come from a proposal (R, S) over its S stratified
    samples: (R, S + M) bool over the joined samples sorted by `order` (R, S + M; indices below S are the
    stratified ones), True for every importance sample and for a stratified sample whose bin or a neighbouring
    bin carries at least `empty_below` of the proposal's weight. Where the proposal puts (nearly) no weight the
    neighbours found empty space, and computing it there changes nothing but the time."""
    bins = proposal.shape[1]
    busy = proposal >= empty_below
    near = busy.clone()
    near[:, 1:] |= busy[:, :-1]
    near[:, :-1] |= busy[:, 1:]
    return (order >= bins) | near.gather(1, order.clamp(max=bins - 1))


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


def adaptive_sampling(cfg) -> tuple[int, float] | None:
    """(block, tolerance) of adaptive sampling from a volumetric method's config (`adaptive_block`,
    `adaptive_tolerance`); None when every pixel is traced."""
    return (cfg.adaptive_block, cfg.adaptive_tolerance) if cfg.adaptive_block > 0 else None


def adaptive_note(cfg) -> str:
    """The rendering note of a volumetric method's config (AvatarModel.rendering_note)."""
    if adaptive_sampling(cfg) is None:
        return ""
    proposals = (
        "; pixels traced inside a block place their samples from its corners' weights (neighbour_proposals)"
        if cfg.neighbour_proposals
        else ""
    )
    return (
        f"adaptive sampling: pixels traced where the image changes (blocks of {cfg.adaptive_block} px), the others "
        f"interpolated within {cfg.adaptive_tolerance * 255:g}/255 of their neighbours' prediction{proposals}; "
        "adaptive_block: 0 traces every pixel"
    )


@torch.no_grad()
def render_rays(
    trace: Callable[..., tuple[torch.Tensor, ...]],
    camera_to_head: torch.Tensor,
    focal: float,
    size: int,
    background: torch.Tensor,
    rays_per_call: int = 8192,
    shrink: Callable[[], None] | None = None,
    adaptive: tuple[int, float] | None = None,
    proposals: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Full image (size, size, 3) and foreground alpha (size, size) on the CPU, from `trace(origins, dirs,
    background colours, proposal)` -> (colours, alphas, proposals) over batches of rays. Running out of memory
    halves the rays per call (and calls `shrink`, for the method to lower its own chunking) and tries again. With
    `adaptive` (block, tolerance), only the pixels `adaptive_pixels` picks are traced and the others interpolated.
    Without `proposals`, `proposal` is always None and the proposals returned are ignored (None will do). With
    them, a ray's proposal (N, S) is its weights over the method's first-pass samples; with `adaptive`, a pixel
    traced inside a block is given the interpolation of its corners' proposals (None for the first pixels
    traced), to place its samples from instead of a first pass of its own."""
    bg = background.reshape(size, size, 3)
    calls = {"rays": rays_per_call}

    def trace_pixels(pixels: torch.Tensor, hint: torch.Tensor | None = None):
        """(N, 2) integer (x, y) -> (N, 4): the foreground's colour premultiplied by its alpha, and the alpha;
        with `proposals` also the rays' proposals (N, S)."""
        origins, dirs = camera_rays(camera_to_head, focal, size, pixels.float())
        behind = bg[pixels[:, 1], pixels[:, 0]]
        out, guides = [], []
        a = 0
        while a < len(pixels):
            sl = slice(a, a + calls["rays"])
            try:
                rgb, opacity, guide = trace(origins[sl], dirs[sl], behind[sl], None if hint is None else hint[sl])
                if proposals:
                    guides.append(guide.cpu().float())
            except RuntimeError as e:
                if not is_out_of_memory(e) or calls["rays"] <= 64:
                    raise
                calls["rays"] //= 2
                if shrink is not None:
                    shrink()
                log.warning("rendering ran out of memory: retrying with %d rays per call", calls["rays"])
                continue
            rgb, opacity = rgb.cpu().float(), opacity.cpu().float()
            # the background is the last sample: colour = premultiplied foreground + (1 - alpha) background
            out.append(torch.cat([rgb - (1.0 - opacity)[:, None] * behind[sl], opacity[:, None]], 1))
            a += len(origins[sl])
        return (torch.cat(out), torch.cat(guides)) if proposals else torch.cat(out)

    if adaptive is None:
        values = trace_pixels(_all_pixels(size))
        values = (values[0] if proposals else values).reshape(size, size, 4)
        alpha = values[..., 3]
        return values[..., :3] + (1.0 - alpha)[..., None] * bg, alpha

    return adaptive_image(trace_pixels, bg, *adaptive, guided=proposals)


def _all_pixels(size: int) -> torch.Tensor:
    """(size * size, 2) integer (x, y) of every pixel, row by row."""
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    return torch.stack([xs.flatten(), ys.flatten()], 1)


def adaptive_image(
    trace_pixels: Callable[..., torch.Tensor | tuple[torch.Tensor, torch.Tensor]],
    background: torch.Tensor,
    block: int,
    tolerance: float,
    guided: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Image (size, size, 3) and foreground alpha (size, size) over `background` (size, size, 3) from the pixels
    adaptive_pixels picks, `trace_pixels((N, 2) x, y) -> (N, 4)` giving their premultiplied foreground colour and
    alpha. A pixel is interpolated either as that (smooth over an opaque head in front of a textured background)
    or as its difference from the background (smooth where a thin fog of the background's own colour lies in
    front of it): each block takes the one its corners predict better. `guided`: as adaptive_pixels'."""

    def trace_both(pixels: torch.Tensor, hint: torch.Tensor | None = None):
        values, guide = trace_pixels(pixels, hint) if guided else (trace_pixels(pixels), None)
        both = torch.cat([values, values[:, :3] - values[:, 3:] * background[pixels[:, 1], pixels[:, 0]]], 1)
        return (both, guide) if guided else both

    # what a pixel looks like, read either way: the error that matters is the composited colour's
    def premultiplied(values: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
        return values[:, :3] + (1.0 - values[:, 3:4]) * background[pixels[:, 1], pixels[:, 0]]

    def difference(values: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
        return background[pixels[:, 1], pixels[:, 0]] + values[:, 4:]

    size = background.shape[0]
    values, source, _ = adaptive_pixels(
        trace_both,
        size,
        block,
        tolerance,
        groups=[slice(0, 4), slice(4, 7)],
        readouts=[premultiplied, difference],
        guided=guided,
    )
    pixels, flat = _all_pixels(size), values.view(-1, values.shape[-1])
    by_difference = (source == 1).view(-1, 1)  # the traced pixels read the same either way
    colour = torch.where(by_difference, difference(flat, pixels), premultiplied(flat, pixels))
    return colour.view(size, size, 3), values[..., 3]


def adaptive_pixels(
    trace_pixels: Callable[[torch.Tensor], torch.Tensor],
    size: int,
    block: int,
    tolerance: float,
    groups: list[slice] | None = None,
    readouts: list[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] | None = None,
    guided: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """A (size, size, C) image of which only some pixels are traced (adaptive sampling in image space, as ray
    tracers refine where an image changes): the corners of blocks of `block` pixels first; a block whose
    corners differ by at most `tolerance` in every channel of one of the channel `groups` (default: all
    channels) is filled by bilinear interpolation between them; else its five midpoints (edges and centre) are
    traced, and if its corners predicted them within `tolerance` its quarters are filled from their own corners
    (a gradient is not a detail), otherwise each quarter is taken in the same way, down to single pixels. With
    `readouts` (one per group, `(values (N, C), pixels (N, 2)) -> (N, K)`), a prediction is judged by what the
    group's readout makes of it against what it makes of the traced values.
    `trace_pixels((N, 2) integer x, y) -> (N, C)`. Returns the image, per pixel the group a filled pixel's value
    is to be read from (-1 where traced), and the number of pixels traced. A detail smaller than a block that
    none of the points traced touches is missed: the block size bounds what can be lost.
    `guided`: `trace_pixels(pixels, hint)` -> (values (N, C), guides (N, G)), and a pixel traced inside a block
    is given as hint the bilinear interpolation of the guides of the block's corners (every block's corners are
    traced pixels; the first lattice is given None): what a tracer may reuse of its neighbours' work."""
    groups = groups or [slice(None)]
    # without readouts a group is judged on its own channels
    readouts = readouts or [lambda values, _, g=g: values[:, g] for g in groups]
    lattice = torch.tensor(sorted(set(range(0, size, block)) | {size - 1}))
    image: torch.Tensor | None = None
    source = torch.full((size, size), -1, dtype=torch.int8)

    guides: torch.Tensor | None = None  # (size * size, G) of the traced pixels when guided

    def trace(xs: torch.Tensor, ys: torch.Tensor, hints: torch.Tensor | None = None) -> None:
        """Trace the pixels (xs, ys) not traced yet; `hints` (one row per pixel given, guided only): a pixel
        given twice (an edge's midpoint, shared by two blocks) takes the mean of its rows."""
        nonlocal image, guides
        key, inverse = torch.unique(ys * size + xs, return_inverse=True)
        hint = None
        if hints is not None:
            sums = hints.new_zeros(len(key), hints.shape[1]).index_add_(0, inverse, hints)
            hint = sums / torch.bincount(inverse, minlength=len(key)).clamp_min(1)[:, None]
        new = ~traced.view(-1)[key]
        key = key[new]
        if not len(key):
            return
        pixels = torch.stack([key % size, key // size], 1)
        if guided:
            values, guide = trace_pixels(pixels, None if hint is None else hint[new])
            if guides is None:
                guides = guide.new_zeros(size * size, guide.shape[1])
            guides[key] = guide
        else:
            values = trace_pixels(pixels)
        if image is None:
            image = values.new_zeros(size, size, values.shape[1])
        image.view(-1, values.shape[1])[key] = values
        traced.view(-1)[key] = True
        source.view(-1)[key] = -1  # a pixel filled before and traced now is read as traced

    def best_group(deviation: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C) per-channel deviations -> (B,) whether some group stays within the tolerance, and which."""
        per_group = torch.stack([deviation[:, g].amax(1) for g in groups], 1)
        smallest, group = per_group.min(1)
        return smallest <= tolerance, group

    def fill(blocks: torch.Tensor, group: torch.Tensor) -> None:
        _fill_bilinear(image, source, traced, blocks, _corners(image, blocks), group)

    traced = torch.zeros(size, size, dtype=torch.bool)
    gy, gx = torch.meshgrid(lattice, lattice, indexing="ij")
    trace(gx.flatten(), gy.flatten())
    # blocks as rows (x0, x1, y0, y1) between neighbouring lattice coordinates
    x0, y0 = torch.meshgrid(lattice[:-1], lattice[:-1], indexing="xy")
    x1, y1 = torch.meshgrid(lattice[1:], lattice[1:], indexing="xy")
    blocks = torch.stack([x0.flatten(), x1.flatten(), y0.flatten(), y1.flatten()], 1)
    while len(blocks):
        corners = _corners(image, blocks)
        smooth, group = best_group(corners.amax(1) - corners.amin(1))
        fill(blocks[smooth], group[smooth])
        rough, corners = blocks[~smooth], corners[~smooth]
        x0, x1, y0, y1 = rough.T
        xm, ym = (x0 + x1) // 2, (y0 + y1) // 2
        middles = (torch.cat([xm, xm, x0, x1, xm]), torch.cat([y0, y1, ym, ym, ym]))
        u = ((middles[0] - x0.repeat(5)) / (x1 - x0).clamp_min(1).repeat(5))[:, None]
        v = ((middles[1] - y0.repeat(5)) / (y1 - y0).clamp_min(1).repeat(5))[:, None]
        hints = None
        if guided:
            hints = _bilinear(_corners(guides.view(size, size, -1), rough).repeat(5, 1, 1), u, v)
        trace(*middles, hints)
        c = corners.repeat(5, 1, 1)
        predicted, truth = _bilinear(c, u, v), image[middles[1], middles[0]]
        pixels = torch.stack(middles, 1)
        errors = [(read(predicted, pixels) - read(truth, pixels)).abs().amax(1) for read in readouts]
        smallest, group = torch.stack(errors, 1).view(5, len(rough), len(readouts)).amax(0).min(1)
        predictable = smallest <= tolerance
        # children: halves along each side longer than one pixel step (a side of one step stays whole); a block
        # whose pixels are all corners is done
        wide, tall = x1 - x0 > 1, y1 - y0 > 1
        left_end, right_start = torch.where(wide, xm, x1), torch.where(wide, xm, x0)
        top_end, bottom_start = torch.where(tall, ym, y1), torch.where(tall, ym, y0)
        children = torch.cat(
            [
                torch.stack([x0, left_end, y0, top_end], 1),
                torch.stack([right_start, x1, y0, top_end], 1),
                torch.stack([x0, left_end, bottom_start, y1], 1),
                torch.stack([right_start, x1, bottom_start, y1], 1),
            ]
        )
        predictable, group = predictable.repeat(4), group.repeat(4)
        fill(children[predictable], group[predictable])
        children = _unique_rows(children[~predictable], size)
        blocks = children[(children[:, 1] - children[:, 0] > 1) | (children[:, 3] - children[:, 2] > 1)]
    return image, source, int(traced.sum())


def _unique_rows(rows: torch.Tensor, size: int) -> torch.Tensor:
    """The distinct rows of an (N, K) tensor of integers in [0, size), sorted: as one number per row (torch.unique
    with dim=0 compares rows one pair at a time, which cost a tenth of an adaptive render)."""
    weights = size ** torch.arange(rows.shape[1] - 1, -1, -1)
    keys = torch.unique(rows @ weights)
    return torch.stack([(keys // w) % size for w in weights.tolist()], 1)


def _bilinear(corners: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Bilinear interpolation of corner values (..., 4, C) (top left, top right, bottom left, bottom right) at
    fractions u across and v down (broadcasting against (..., C))."""
    top = (1 - u) * corners[..., 0, :] + u * corners[..., 1, :]
    bottom = (1 - u) * corners[..., 2, :] + u * corners[..., 3, :]
    return (1 - v) * top + v * bottom


def _corners(image: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """(B, 4, C) values at the corners of blocks (x0, x1, y0, y1): top left, top right, bottom left, bottom right."""
    x0, x1, y0, y1 = blocks.T
    return torch.stack([image[y0, x0], image[y0, x1], image[y1, x0], image[y1, x1]], 1)


def _fill_bilinear(
    image: torch.Tensor,
    source: torch.Tensor,
    traced: torch.Tensor,
    blocks: torch.Tensor,
    corners: torch.Tensor,
    group: torch.Tensor,
) -> None:
    """Fill the untraced pixels of each block (x0, x1, y0, y1) by bilinear interpolation of its corner values
    (B, 4, C) (top left, top right, bottom left, bottom right) and mark them as read from the block's `group`,
    blocks of one shape at a time."""
    if not len(blocks):
        return
    shapes = blocks[:, [1, 3]] - blocks[:, [0, 2]]
    for width, height in _unique_rows(shapes, image.shape[0]).tolist():
        pick = (shapes[:, 0] == width) & (shapes[:, 1] == height)
        b, c = blocks[pick], corners[pick]
        u = torch.arange(width + 1) / max(width, 1)
        v = torch.arange(height + 1) / max(height, 1)
        vv, uu = torch.meshgrid(v, u, indexing="ij")  # (h + 1, w + 1)
        values = _bilinear(c[:, None, None], uu[None, :, :, None], vv[None, :, :, None])  # (B, h + 1, w + 1, C)
        ys = (b[:, 2, None, None] + torch.arange(height + 1)[None, :, None]).expand(-1, height + 1, width + 1)
        xs = (b[:, 0, None, None] + torch.arange(width + 1)[None, None, :]).expand(-1, height + 1, width + 1)
        keep = ~traced[ys, xs]
        image[ys[keep], xs[keep]] = values[keep]
        source[ys[keep], xs[keep]] = group[pick].to(source.dtype)[:, None, None].expand_as(keep)[keep]

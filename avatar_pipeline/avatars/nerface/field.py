"""NeRFace (Gafni et al., CVPR 2021) building blocks: the conditioned radiance field and its coarse and
fine renderer (the sampling and the compositing over the background are avatars/volume.py's).

Following the paper: positional encoding with 10 frequencies for the position and 4 for the viewing
direction; the position, the expression vector and a learnable per-frame latent code (32-d) enter an
MLP of 8 fully connected layers of 256 units; one layer predicts density; a 4-layer, 128-unit branch
conditioned on the viewing direction predicts colour. Coarse and fine networks share this design;
64 stratified samples feed the coarse one, 64 more drawn from its weights feed the fine one.

The first backbone layer is split into a position part and a conditioning part: the same affine map as
one layer on their concatenation, but the conditioning (constant over a frame's samples) is multiplied
once per ray instead of once per sample.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..layers import compute_dtype, dense, positional_encoding
from ..volume import (
    OccupancyGrid,
    binned_weights,
    composite,
    importance_depths,
    march,
    proposed_samples,
    stratified_depths,
)

# early ray termination (rendering): the most samples a ray takes between two checks of its light left
MARCH_SEGMENT = 16


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
    position_scale: float = 1.0  # positions are multiplied by this before the encoding
    density_activation: str = "softplus"  # or NeRF's "relu"
    # learned feature planes (xy, xz, yz) at these resolutions, read at the scaled position and fed to the
    # backbone beside the positional encoding; none in the paper
    plane_resolutions: tuple[int, ...] = ()
    plane_channels: int = 8


class FeaturePlanes(nn.Module):
    """Three axis-aligned planes of learned features per resolution; a point's features are the bilinear
    reads of its three projections (xy, xz, yz) at every resolution, concatenated. Fine detail then lives in
    the planes, which a step updates directly, instead of having to emerge from a deep MLP of the encoding
    (on a CPU budget of minutes the MLP alone renders a soft face). Points beyond [-1, 1] read the border."""

    def __init__(self, resolutions: tuple[int, ...], channels: int):
        super().__init__()
        self.planes = nn.ParameterList(nn.Parameter(0.1 * torch.randn(3, channels, r, r)) for r in resolutions)
        self.dim = 3 * channels * len(resolutions)
        self.register_buffer("pairs", torch.tensor([[0, 1], [0, 2], [1, 2]]), persistent=False)

    def forward(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """(N, 3) -> (N, dim), written into `out` (N, dim; any precision) when given."""
        # (3, N, 1, 2), contiguous (grid_sample reads a strided grid six times slower)
        grid = x.t()[self.pairs].transpose(1, 2).contiguous()[:, :, None]
        out = x.new_empty(len(x), self.dim) if out is None else out
        by_plane, start = out.view(len(x), 3, -1), 0
        for plane in self.planes:
            read = torch.nn.functional.grid_sample(plane, grid, align_corners=True, padding_mode="border")
            by_plane[:, :, start : start + plane.shape[1]] = read[..., 0].permute(2, 0, 1)  # from (3, C, N)
            start += plane.shape[1]
        return out


class ConditionedField(nn.Module):
    """Density and colour at canonical-space points, given the frame's expression and latent code."""

    def __init__(self, cfg: FieldConfig = FieldConfig()):
        super().__init__()
        self.cfg = cfg
        self.planes = FeaturePlanes(cfg.plane_resolutions, cfg.plane_channels) if cfg.plane_resolutions else None
        pos_dim = 3 * (1 + 2 * cfg.position_frequencies) + (self.planes.dim if self.planes else 0)
        dir_dim = 3 * (1 + 2 * cfg.direction_frequencies)
        self.condition_dim = cfg.expression_dim + cfg.latent_dim
        self.position_in = nn.Linear(pos_dim, cfg.width)
        self.condition_in = nn.Linear(self.condition_dim, cfg.width, bias=False)
        layers = [nn.ReLU()]
        for _ in range(cfg.depth - 1):
            layers += [nn.Linear(cfg.width, cfg.width), nn.ReLU()]
        self.backbone = nn.Sequential(*layers)
        self.density = nn.Linear(cfg.width, 1)
        branch, width_in = [], cfg.width + dir_dim
        for _ in range(cfg.colour_depth):
            branch += [nn.Linear(width_in, cfg.colour_width), nn.ReLU()]
            width_in = cfg.colour_width
        self.colour = nn.Sequential(*branch, nn.Linear(cfg.colour_width, 3))
        # He initialisation keeps the signal alive through the deep ReLU stack; with PyTorch's default
        # the 8-layer backbone starts nearly constant and the ReLU density can start dead everywhere
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        # the two input parts together form one He-initialised layer over the concatenated input
        fan_in = pos_dim + self.condition_dim
        for part in (self.position_in, self.condition_in):
            nn.init.normal_(part.weight, std=(2.0 / fan_in) ** 0.5)

    def _density(self, features: torch.Tensor) -> torch.Tensor:
        raw = dense(features, self.density.weight, self.density.bias)[:, 0]
        # a ReLU density can die everywhere in the first steps (it did for vr_face2's coarse field: the render
        # stayed the background); the shifted softplus always has a gradient and starts as thin fog
        return torch.relu(raw) if self.cfg.density_activation == "relu" else torch.nn.functional.softplus(raw - 1.0)

    def _encode(self, points: torch.Tensor) -> torch.Tensor:
        """(N, 3) head-space points -> the first layer's position input (N, position features)."""
        scaled = points * self.cfg.position_scale
        encoding = positional_encoding(scaled, self.cfg.position_frequencies)  # in fp32: sin(2^9 x) needs it
        dtype = compute_dtype(points)
        if self.planes is None:
            return encoding.to(dtype)
        # both parts written into one tensor of the layers' precision: joining in fp32 and casting the whole took
        # three times as long as the first layer
        joined = encoding.new_empty(len(points), encoding.shape[1] + self.planes.dim, dtype=dtype)
        joined[:, : encoding.shape[1]] = encoding
        self.planes(scaled, joined[:, encoding.shape[1] :])
        return joined

    def _features(self, encoding: torch.Tensor, conditioned: torch.Tensor, samples: int = 1) -> torch.Tensor:
        """The backbone's output (N, width) from encoded positions (N, F) and the conditioning's part of the first
        layer: (width,) shared by all, or per ray (N / samples, width) for rays of `samples` consecutive samples."""
        first = self.position_in
        if conditioned.dim() == 1:  # a shared conditioning is part of the first layer's bias
            hidden = dense(encoding, first.weight, first.bias + conditioned, "relu")
        else:
            hidden = dense(encoding, first.weight, first.bias).view(len(conditioned), samples, -1)
            hidden = torch.relu_((hidden + conditioned[:, None]).view(len(encoding), -1))
        for layer in self.backbone:
            if isinstance(layer, nn.Linear):
                hidden = dense(hidden, layer.weight, layer.bias, "relu")
        return hidden

    def _colour(self, features: torch.Tensor, view: torch.Tensor, samples: int = 1) -> torch.Tensor:
        """RGB (N, 3) from the backbone's features (N, width) and the viewing direction's part of the colour
        branch's first layer, per ray (N / samples, colour width) for rays of `samples` consecutive samples."""
        first, *rest = [layer for layer in self.colour if isinstance(layer, nn.Linear)]
        hidden = dense(features, first.weight[:, : self.cfg.width], first.bias)
        hidden = torch.relu_((hidden.view(len(view), samples, -1) + view[:, None]).view(len(features), -1))
        for layer in rest[:-1]:
            hidden = dense(hidden, layer.weight, layer.bias, "relu")
        return dense(hidden, rest[-1].weight, rest[-1].bias, "sigmoid")

    def forward(
        self,
        points: torch.Tensor,
        directions: torch.Tensor,
        condition: torch.Tensor,
        keep: torch.Tensor | None = None,
    ):
        """points (R, S, 3), directions (R, 3) unit, condition (C,) for all rays or (R, C) per ray
        -> density (R, S), rgb (R, S, 3). keep (R, S) bool: only those samples are computed, the others are
        empty space (density 0, black)."""
        rays, samples = points.shape[:2]
        shared = condition.dim() == 1

        def per_ray_terms(directions, condition):
            """The first layers' parts that are constant along a ray, each one product per ray instead of one per
            sample: conditioning (one row for a shared condition) and viewing direction (per-sample copies of the
            direction and their concatenation with the features cost more than the colour branch's layer)."""
            encoded = positional_encoding(directions, self.cfg.direction_frequencies)
            view = dense(encoded, self.colour[0].weight[:, self.cfg.width :])
            return self.condition_in(condition), view

        if keep is None:
            conditioned, view = per_ray_terms(directions, condition)
            # 2-D (rays * samples, features) operands: batched 3-D matmuls and their backward copies cost twice
            # as much
            features = self._features(self._encode(points.reshape(-1, 3)), conditioned, samples)
            rgb = self._colour(features, view, samples).view(rays, samples, 3)
            return self._density(features).view(rays, samples), rgb
        # the kept samples packed, ray by ray; the per-ray terms only for the rays with a kept sample (a chunk of
        # sparse rays spans thousands of rays, and their products with the 85-wide condition cost more than the
        # samples' layers when made for every ray)
        index = keep.reshape(-1).nonzero()[:, 0]
        if not len(index):  # nothing kept: all empty space (the layers cannot take zero rows)
            return points.new_zeros(rays, samples), points.new_zeros(rays, samples, 3)
        hit, of_sample = torch.unique_consecutive(index // samples, return_inverse=True)
        conditioned, view = per_ray_terms(directions[hit], condition if shared else condition[hit])
        features = self._features(
            self._encode(points.reshape(-1, 3)[index]), conditioned if shared else conditioned[of_sample]
        )
        density = points.new_zeros(rays * samples).index_put((index,), self._density(features).to(points.dtype))
        rgb = points.new_zeros(rays * samples, 3).index_put(
            (index,), self._colour(features, view[of_sample]).to(points.dtype)
        )
        return density.view(rays, samples), rgb.view(rays, samples, 3)

    def density_at(self, points: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        """Density per metre (N,) at head-space points (N, 3) under one condition (C,); no colour."""
        return self._density(self._features(self._encode(points), self.condition_in(condition)))


class NeRFaceRenderer(nn.Module):
    """Coarse and fine fields rendering rays of one frame: stratified samples for the coarse field,
    importance samples from its weights (plus the coarse ones) for the fine field."""

    def __init__(
        self,
        cfg: FieldConfig = FieldConfig(),
        coarse_samples: int = 64,
        fine_samples: int = 64,
        precision: str = "fp32",
        chunk_samples: int = 8192,
    ):
        super().__init__()
        self.coarse, self.fine = ConditionedField(cfg), ConditionedField(cfg)
        self.coarse_samples, self.fine_samples = coarse_samples, fine_samples
        self.precision, self.chunk_samples = precision, chunk_samples
        self.samples_computed = 0  # samples sent through a field so far (what skipping saves; benchmarks read it)

    def _field(self, field: ConditionedField, points, directions, condition, keep=None):
        """The field over chunks of about `chunk_samples` samples (of the kept ones, with `keep`), in bf16 when
        asked (weights and compositing stay fp32). Chunks keep every activation small enough for the C
        allocator to reuse memory instead of mapping fresh pages for each layer, which cost as much as the
        matrix products themselves here."""
        rays, samples = points.shape[:2]
        if keep is None:
            edges = [*range(0, rays, max(1, self.chunk_samples // samples)), rays]
            self.samples_computed += rays * samples
        else:  # ray ranges holding about chunk_samples kept samples each
            cumulative = keep.sum(1).cumsum(0)
            total = int(cumulative[-1]) if rays else 0
            self.samples_computed += total
            marks = torch.tensor(range(self.chunk_samples, total, self.chunk_samples), device=cumulative.device)
            edges = sorted({0, rays, *torch.searchsorted(cumulative, marks, right=True).tolist()})
        densities, colours = [], []
        for a, b in zip(edges[:-1], edges[1:]):
            cond = condition if condition.dim() == 1 else condition[a:b]
            with torch.autocast(points.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
                density, rgb = field(points[a:b], directions[a:b], cond, None if keep is None else keep[a:b])
            densities.append(density.float())
            colours.append(rgb.float())
        return torch.cat(densities), torch.cat(colours)

    def _trace(self, field, points, directions, condition, keep, depths, stop_below: float):
        """The field at all samples of rays (R, S, 3), or with stop_below > 0 front to back, leaving out the
        samples behind the point where a ray has less than stop_below of its light left (volume.march)."""
        if stop_below <= 0:
            return self._field(field, points, directions, condition, keep)

        def evaluate(rays, span):
            cond = condition if condition.dim() == 1 else condition[rays]
            part_keep = None if keep is None else keep[rays, span]
            return self._field(field, points[rays, span], directions[rays], cond, part_keep)

        # a ray is checked for spent light between segments: at least 4, of at most MARCH_SEGMENT samples each,
        # so the long evenly spaced rays of render_marched stop within a few samples of where their light ends
        return march(evaluate, depths, stop_below, segments=max(4, -(-depths.shape[1] // MARCH_SEGMENT)))

    def peak_density(self, points: torch.Tensor, conditions: torch.Tensor) -> torch.Tensor:
        """The highest density per metre (N,) at points (N, 3) over conditions (K, C), of either field
        (in the renderer's precision)."""
        with torch.autocast(points.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            return (
                torch.stack([f.density_at(points, c) for f in (self.coarse, self.fine) for c in conditions])
                .amax(0)
                .float()
            )

    @torch.no_grad()
    def render_marched(
        self,
        origins,
        directions,
        near,
        far,
        condition,
        background,
        occupancy: OccupancyGrid | None,
        samples: int,
        stop_below: float,
    ):
        """Rendering only, as the accelerated NeRFs render (Instant-NGP): the fine field alone at `samples`
        evenly spaced depths per ray, without the coarse pass and its importance samples; with `occupancy`,
        samples in the grid's empty cells are not computed and rays with no sample in an occupied cell show the
        background; with stop_below > 0, nor are those behind the point where a ray has less than stop_below of
        its light left. -> colours (R, 3), foreground alphas (R,)."""
        depths = stratified_depths(near, far, samples, jitter=False)
        points = origins[:, None] + directions[:, None] * depths[..., None]
        if occupancy is None:
            density, rgb = self._trace(self.fine, points, directions, condition, None, depths, stop_below)
            colour, _, alpha = composite(density, rgb, depths, background)
            return colour, alpha
        keep = occupancy.contains(points)
        colour, alpha = background.clone(), background.new_zeros(len(origins))
        hit = keep.any(1).nonzero()[:, 0]
        if len(hit):
            cond = condition if condition.dim() == 1 else condition[hit]
            depths = depths[hit]
            density, rgb = self._trace(self.fine, points[hit], directions[hit], cond, keep[hit], depths, stop_below)
            colour[hit], _, alpha[hit] = composite(density, rgb, depths, background[hit])
        return colour, alpha

    def forward(
        self,
        origins,
        directions,
        near,
        far,
        condition,
        background,
        jitter: bool = True,
        skip_empty: float = 0.0,
        occupancy: OccupancyGrid | None = None,
        stop_below: float = 0.0,
        proposal: torch.Tensor | None = None,
        propose: bool = False,
        proposal_samples: int = 0,
        proposal_empty_below: float = 0.0,
    ):
        """origins/directions (R, 3), near/far (R,), condition (C,) or (R, C), background (R, 3) ->
        dict of coarse and fine colours (R, 3), foreground alphas (R,) and the fine expected depth (R,); the
        coarse samples' depths and weights (R, S) (the background's left out), and the fine ones' when every ray
        took the fine pass.

        Rendering only: skip_empty > 0: rays whose coarse foreground alpha is below it keep the coarse result
        instead of the fine one (they show the background), which saves most of the fine pass on the
        background pixels of a frame; `occupancy`: samples in its empty cells are not computed (empty);
        stop_below > 0: a ray's samples behind the point where less than stop_below of its light is left are
        not computed (empty); `proposal` (R, S): weights over the coarse samples that place the fine samples
        instead of a coarse pass (a neighbouring pixel's, volume.render_rays), whose colour is then the
        background's; `propose`: also the fine weights gathered onto the coarse samples (`proposal`, R, S). Rays given a
        `proposal` draw proposal_samples importance samples when it is > 0 (fine_samples otherwise) and, with
        proposal_empty_below > 0, leave out (empty) the coarse samples where the proposal and its neighbouring bins
        weigh less than it (volume.proposed_samples)."""
        depths = stratified_depths(near, far, self.coarse_samples, jitter)
        if proposal is None:
            points = origins[:, None] + directions[:, None] * depths[..., None]
            keep = None if occupancy is None else occupancy.contains(points)
            density, rgb = self._trace(self.coarse, points, directions, condition, keep, depths, stop_below)
            coarse, weights, coarse_alpha = composite(density, rgb, depths, background)
            weights = weights[:, :-1]
        else:
            weights, coarse_alpha = proposal, proposal.sum(-1)
            coarse = background.clone()
        out = {"coarse": coarse, "coarse_alpha": coarse_alpha, "coarse_weights": weights, "coarse_depths": depths}
        busy = torch.ones_like(coarse_alpha, dtype=torch.bool) if skip_empty <= 0 else coarse_alpha >= skip_empty
        fine, fine_alpha, fine_depth = coarse.clone(), coarse_alpha.clone(), far.clone()
        proposed = weights.clone() if propose else None
        if busy.any():
            # a slice when every ray is busy (always so in training) avoids copying the ray tensors
            sel = slice(None) if bool(busy.all()) else busy.nonzero()[:, 0]
            count = proposal_samples if proposal is not None and proposal_samples > 0 else self.fine_samples
            extra = importance_depths(depths[sel], weights[sel], count, jitter)
            fine_depths, order = torch.sort(torch.cat([depths[sel], extra], -1), -1)
            points = origins[sel, None] + directions[sel, None] * fine_depths[..., None]
            keep = None if occupancy is None else occupancy.contains(points)
            if proposal is not None and proposal_empty_below > 0:
                guided = proposed_samples(weights[sel], order, proposal_empty_below)
                keep = guided if keep is None else keep & guided
            cond = condition if condition.dim() == 1 else condition[sel]
            density, rgb = self._trace(self.fine, points, directions[sel], cond, keep, fine_depths, stop_below)
            colour, fine_weights, alpha = composite(density, rgb, fine_depths, background[sel])
            depth = (fine_weights[:, :-1] * fine_depths).sum(-1) + fine_weights[:, -1] * far[sel]
            if isinstance(sel, slice):  # every ray (training): the weights along them, for losses on their shape
                out.update(fine_weights=fine_weights[:, :-1], fine_depths=fine_depths)
            if propose:
                proposed[sel] = binned_weights(fine_weights[:, :-1], fine_depths, depths[sel])
            fine, fine_alpha, fine_depth = (
                whole.index_put((sel,), part) if not isinstance(sel, slice) else part
                for whole, part in ((fine, colour), (fine_alpha, alpha), (fine_depth, depth))
            )
        out.update(fine=fine, fine_alpha=fine_alpha, fine_depth=fine_depth, proposal=proposed)
        return out

"""The canonical head of Local Deformation Fields: a TensoRF radiance field (Chen et al., ECCV 2022, the
vector-matrix decomposition) with the paper's two changes, a per-frame appearance code in the colour
decoder and a ReLU density.

Density and appearance are each a sum over the three axis-aligned planes of products of a plane
component (bilinear in two coordinates) and a line component (linear in the third). Appearance features
go through a linear basis to `appearance_features` values and a small MLP with the viewing direction and
the code. The grid grows during pre-training as TensoRF's does: each component is resampled (bilinearly)
to the larger size, and the optimizer of the next stretch starts afresh. Voxels whose opacity stays below
a threshold are pruned after a growth: their samples skip the colour decoder and count as empty.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ..layers import positional_encoding
from ..volume import cell_occupied

PLANES = ((0, 1), (0, 2), (1, 2))  # the plane of each pair, and the line along the remaining axis
LINES = (2, 1, 0)


def resize_parameter(parameter: nn.Parameter, value: torch.Tensor) -> None:
    """Give a parameter a value of another shape in place: the same Parameter object (which the optimizers
    hold) with new contents and autograd metadata (assigning .data would keep the old shape's gradient
    bookkeeping)."""
    parameter.grad = None
    torch.utils.swap_tensors(parameter, nn.Parameter(value.detach().clone()))


class VectorMatrix(nn.Module):
    """Three plane-line pairs of `components` channels at `size` voxels per side."""

    def __init__(self, components: int, size: int, init_scale: float = 0.1):
        super().__init__()
        self.planes = nn.Parameter(init_scale * torch.randn(3, components, size, size))
        self.lines = nn.Parameter(init_scale * torch.randn(3, components, size, 1))

    @property
    def size(self) -> int:
        return self.planes.shape[-1]

    def read(self, unit_points: torch.Tensor) -> torch.Tensor:
        """Points in [-1, 1]^3 (N, 3) -> per-pair component products (N, 3, components)."""
        plane_xy = torch.stack([unit_points[:, list(p)] for p in PLANES])[:, :, None]  # (3, N, 1, 2)
        line_xy = torch.stack(
            [torch.stack([torch.zeros_like(unit_points[:, a]), unit_points[:, a]], -1) for a in LINES]
        )[:, :, None]
        plane_values = F.grid_sample(self.planes, plane_xy, align_corners=True)[..., 0]  # (3, C, N)
        line_values = F.grid_sample(self.lines, line_xy, align_corners=True)[..., 0]
        return (plane_values * line_values).permute(2, 0, 1)

    @torch.no_grad()
    def resize(self, size: int) -> None:
        """Resample the components to `size` voxels a side."""
        resize_parameter(
            self.planes, F.interpolate(self.planes, size=(size, size), mode="bilinear", align_corners=True)
        )
        resize_parameter(self.lines, F.interpolate(self.lines, size=(size, 1), mode="bilinear", align_corners=True))

    def l1(self) -> torch.Tensor:
        return self.planes.abs().mean() + self.lines.abs().mean()


class CanonicalField(nn.Module):
    """Density (per metre) and colour at canonical points in head space (metres), inside the cube of half
    side `radius` around the head-space origin; zero density outside it."""

    def __init__(
        self,
        radius: float,
        size: int,
        density_components: int,
        appearance_components: int,
        appearance_features: int,
        decoder_width: int,
        code_dim: int,
        prune_size: int = 64,
    ):
        super().__init__()
        self.radius = radius
        self.density = VectorMatrix(density_components, size)
        self.appearance = VectorMatrix(appearance_components, size)
        self.basis = nn.Linear(3 * appearance_components, appearance_features, bias=False)
        decoder_in = appearance_features * (1 + 2 * 2) + 3 * (1 + 2 * 2) + code_dim
        self.decoder = nn.Sequential(
            nn.Linear(decoder_in, decoder_width),
            nn.ReLU(),
            nn.Linear(decoder_width, decoder_width),
            nn.ReLU(),
            nn.Linear(decoder_width, 3),
        )
        nn.init.constant_(self.decoder[-1].bias, 0)
        # TensoRF's density scale: 25 per unit of its normalised box, here per `radius` metres
        self.density_scale = 25.0 / radius
        # occupied voxels of a coarse grid over the cube (all at first); a persistent buffer, so resumes keep it
        self.register_buffer("occupied", torch.ones(prune_size, prune_size, prune_size, dtype=torch.bool))

    @property
    def size(self) -> int:
        return self.density.size

    def unit(self, points: torch.Tensor) -> torch.Tensor:
        return points / self.radius

    def occupancy(self, unit_points: torch.Tensor) -> torch.Tensor:
        """Which points (in [-1, 1]^3) lie in the box and in an occupied voxel."""
        return (unit_points.abs() <= 1).all(-1) & cell_occupied(self.occupied, unit_points)

    def sigma(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Density per metre (N,) and which points are in occupied space (N,)."""
        unit = self.unit(points)
        keep = self.occupancy(unit)
        density = points.new_zeros(len(points))
        if keep.any():
            raw = self.density.read(unit[keep]).sum((1, 2))
            density = density.index_put((keep.nonzero()[:, 0],), torch.relu(raw) * self.density_scale)
        return density, keep

    def colour(self, points: torch.Tensor, directions: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
        """RGB in [0, 1] (N, 3) at points with their ray directions (N, 3) and the frame's code (D,)."""
        features = self.basis(self.appearance.read(self.unit(points)).flatten(1))
        inputs = torch.cat([positional_encoding(features, 2), positional_encoding(directions, 2)], -1)
        # the code is the same for every point: its part of the first layer joins the bias (one product, where
        # copying it beside every point's inputs cost as much as the layer)
        first, *rest = self.decoder
        per_point = inputs.shape[1]
        bias = first.bias + first.weight[:, per_point:] @ code
        hidden = F.linear(inputs, first.weight[:, :per_point].contiguous(), bias)
        for layer in rest:
            hidden = layer(hidden)
        return torch.sigmoid(hidden)

    def forward(self, points: torch.Tensor, directions: torch.Tensor, code: torch.Tensor):
        """Density per metre (N,) and colour (N, 3); the colour is only computed where density is positive."""
        density, _ = self.sigma(points)
        rgb = points.new_zeros(len(points), 3)
        busy = density > 0
        if busy.any():
            index = busy.nonzero()[:, 0]
            rgb = rgb.index_put((index,), self.colour(points[index], directions[index], code))
        return density, rgb

    def regulariser(self) -> torch.Tensor:
        """TensoRF's L1 sparsity of the density components."""
        return self.density.l1()

    def grow(self, size: int) -> None:
        """The grid grows to `size` voxels a side."""
        self.density.resize(size)
        self.appearance.resize(size)

    @torch.no_grad()
    def prune(self, threshold: float, chunk: int = 65536) -> float:
        """Mark the coarse voxels whose highest density (over a 2x finer set of points inside each) is below
        `threshold` as empty; returns the share kept."""
        cells = self.occupied.shape[0]
        fine = 2 * cells
        axis = -1 + (torch.arange(fine, device=self.occupied.device) + 0.5) * (2 / fine)  # two per voxel and axis
        grid = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3)
        peak = torch.empty(len(grid), device=grid.device)
        for a in range(0, len(grid), chunk):
            part = grid[a : a + chunk]
            peak[a : a + chunk] = torch.relu(self.density.read(part).sum((1, 2))) * self.density_scale
        alpha = 1 - torch.exp(-peak * (2 * self.radius / fine))
        alpha = alpha.reshape(cells, 2, cells, 2, cells, 2).amax((1, 3, 5))
        self.occupied.copy_(alpha >= threshold)
        return float(self.occupied.float().mean())

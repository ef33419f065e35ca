"""The networks of a Neural Head Avatar (Grassal et al. 2022, Appendix A.2), as the paper describes them:
SIREN layers whose sine frequencies and phase shifts come from a mapping network (FiLM conditioning,
after pi-GAN), for the vertex offsets (geometry) and for the surface colour (texture), plus the
convolutional normal encoder of the texture's second head.

Initialisation as pi-GAN / SIREN: hidden layers uniform in +-sqrt(6 / fan_in) / 25, the first layer in
+-1 / fan_in, the mapping network He-initialised for leaky ReLU with its last layer scaled by 0.25; the
mapped frequencies enter as 15 f + 30.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def _siren_init(layer: nn.Module, first: bool = False) -> None:
    fan_in = layer.weight[0].numel()
    bound = 1.0 / fan_in if first else math.sqrt(6.0 / fan_in) / 25.0
    with torch.no_grad():
        layer.weight.uniform_(-bound, bound)


class MappingNetwork(nn.Module):
    """Condition (N, C) -> frequencies and phase shifts (N, D) each: 3 hidden leaky-ReLU layers."""

    def __init__(self, condition_dim: int, width: int, output_dim: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(condition_dim, width),
            nn.LeakyReLU(0.2),
            nn.Linear(width, width),
            nn.LeakyReLU(0.2),
            nn.Linear(width, width),
            nn.LeakyReLU(0.2),
            nn.Linear(width, 2 * output_dim),
        )
        for layer in self.net:
            if isinstance(layer, nn.Linear):
                nn.init.kaiming_normal_(layer.weight, a=0.2, nonlinearity="leaky_relu")
        with torch.no_grad():
            self.net[-1].weight *= 0.25

    def forward(self, condition: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.net(condition)
        frequencies, phases = out.chunk(2, -1)
        return 15.0 * frequencies + 30.0, phases


class FiLMSiren(nn.Module):
    """Linear layers each followed by sin(frequency * x + phase), with per-layer frequencies and phases
    given by a mapping network: (N, D) or (1, D) broadcast over the inputs."""

    def __init__(self, input_dim: int, widths: list[int]):
        super().__init__()
        dims = [input_dim] + list(widths)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        for i, layer in enumerate(self.layers):
            _siren_init(layer, first=i == 0)
        self.widths = list(widths)

    @property
    def film_dim(self) -> int:
        return sum(self.widths)

    def forward(self, x: torch.Tensor, frequencies: torch.Tensor, phases: torch.Tensor) -> torch.Tensor:
        start = 0
        for layer, width in zip(self.layers, self.widths):
            f, p = frequencies[..., start : start + width], phases[..., start : start + width]
            x = torch.sin(f * layer(x) + p)
            start += width
        return x


class OffsetNetwork(nn.Module):
    """Vertex offsets (metres) from the canonical vertex position (normalised to [-1, 1]) and a learned
    32-d feature per vertex, conditioned on a pose (a flattened rotation matrix): G of the paper."""

    def __init__(self, positions: torch.Tensor, width: int, depth: int, mapping_width: int, feature_dim: int = 32):
        super().__init__()
        self.register_buffer("positions", positions)
        self.features = nn.Parameter(0.02 * torch.randn(len(positions), feature_dim))
        self.siren = FiLMSiren(3 + feature_dim, [width] * depth)
        self.mapping = MappingNetwork(9, mapping_width, self.siren.film_dim)
        self.out = nn.Linear(width, 3)
        nn.init.zeros_(self.out.weight)  # the mesh starts as the tracked model
        nn.init.zeros_(self.out.bias)

    def forward(self, pose: torch.Tensor, vertices: torch.Tensor | None = None) -> torch.Tensor:
        """pose (B, 9) -> offsets (B, V', 3) of the vertices (all, or the index tensor `vertices`)."""
        x = torch.cat([self.positions, self.features], 1)
        if vertices is not None:
            x = x[vertices]
        frequencies, phases = self.mapping(pose)
        hidden = self.siren(x[None], frequencies[:, None], phases[:, None])
        return torch.tanh(self.out(hidden))


class NormalEncoder(nn.Module):
    """Local geometry features from a patch of the rendered normal map: 3x3 convolutions with sine
    activations (learned per-channel frequency and phase: FiLM with a constant condition)."""

    def __init__(self, width: int, layers: int, output_dim: int):
        super().__init__()
        dims = [3] + [width] * layers
        self.convs = nn.ModuleList(
            nn.Conv2d(a, b, 3, padding=1, padding_mode="replicate") for a, b in zip(dims[:-1], dims[1:])
        )
        for i, conv in enumerate(self.convs):
            _siren_init(conv, first=i == 0)
        self.frequencies = nn.Parameter(torch.full((layers, width), 30.0))
        self.phases = nn.Parameter(torch.zeros(layers, width))
        self.out = nn.Conv2d(width, output_dim, 3, padding=1, padding_mode="replicate")
        _siren_init(self.out)

    def forward(self, normals: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, output_dim, H, W)"""
        x = normals
        for i, conv in enumerate(self.convs):
            x = torch.sin(self.frequencies[i, :, None, None] * conv(x) + self.phases[i, :, None, None])
        return self.out(x)


class TextureNetwork(nn.Module):
    """Colour of a surface point: T of the paper. Inputs: the canonical position (normalised) and the
    features of the point's texel in its chart's UV feature grid; FiLM conditioning from the mouth
    features where the point lies in the mouth (zero elsewhere); a second head on the normal encoding.
    Returns colours in [-1, 1] (the tanh of the two heads' sum)."""

    def __init__(
        self,
        chart_resolutions: tuple[int, ...],
        feature_dim: int,
        width: int,
        depth: int,
        last_width: int,
        dynamic_width: int,
        normal_dim: int,
        condition_dim: int,
        mapping_width: int,
    ):
        super().__init__()
        self.grids = nn.ParameterList(nn.Parameter(0.01 * torch.randn(1, feature_dim, r, r)) for r in chart_resolutions)
        self.siren = FiLMSiren(3 + feature_dim, [width] * (depth - 1) + [last_width])
        self.static_head = nn.Linear(last_width, 3)
        _siren_init(self.static_head)
        self.dynamic = FiLMSiren(last_width + normal_dim, [dynamic_width])
        self.dynamic_head = nn.Linear(dynamic_width, 3)
        _siren_init(self.dynamic_head)
        self.mapping = MappingNetwork(condition_dim, mapping_width, self.siren.film_dim + self.dynamic.film_dim)
        self.condition_dim = condition_dim

    def texel_features(self, uv: torch.Tensor, chart: torch.Tensor) -> torch.Tensor:
        """(P, 2) texture coordinates in [0, 1] of charts (P,) -> (P, feature_dim), bilinear."""
        out = uv.new_zeros(len(uv), self.grids[0].shape[1])
        for index, grid in enumerate(self.grids):
            sel = (chart == index).nonzero()[:, 0]
            if len(sel):
                where = (uv[sel] * 2 - 1).view(1, 1, -1, 2)  # grid_sample's x, y in [-1, 1]
                read = torch.nn.functional.grid_sample(grid, where, align_corners=False, padding_mode="border")
                out = out.index_put((sel,), read[0, :, 0].T)
        return out

    def forward(self, positions, uv, chart, normal_features, condition: torch.Tensor) -> torch.Tensor:
        """positions (P, 3), uv (P, 2), chart (P,), normal_features (P, N), condition (P, C) or (1, C)."""
        frequencies, phases = self.mapping(condition)
        split = self.siren.film_dim
        x = torch.cat([positions, self.texel_features(uv, chart)], 1)
        latent = self.siren(x, frequencies[:, :split], phases[:, :split])
        dynamic = self.dynamic(torch.cat([latent, normal_features], 1), frequencies[:, split:], phases[:, split:])
        return torch.tanh(self.static_head(latent) + self.dynamic_head(dynamic))

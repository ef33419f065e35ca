"""The deformation of Local Deformation Fields: from a point seen in a frame to the canonical head.

t(x) = sum_l W(x - c_l) t_l(x), t_l = D_l(gamma(x - c_l), e * A_l, p, omega^p) + (landmark l's own
deformation), W(d) = max(exp(-|d|^2 / 2R^2) - tau, 0) s (paper Eq. 7-10). The paper leaves open whether the
scale s < 1 also shrinks the landmark's own deformation; with s = 0.02 it would shrink a 2 cm jaw drop to
0.4 mm, which no network output could be meant to undo, so here s scales the networks' output only and the
landmarks' own deformations are blended by the same clipped Gaussians normalised to sum to one where they
overlap (and fading to zero at their rim, so the field stays continuous):

    t(x) = sum_l g_l(x) / max(1, sum_k g_k(x)) * (c_l^canonical - c_l) + s * sum_l g_l(x) * D_l(...)

with g_l(x) = max(exp(-|x - c_l|^2 / 2R^2) - tau, 0). A point at a landmark thus moves with the tracked
mesh there, and the networks learn what the mesh does not explain. Lengths are metres at the interface;
the networks see offsets in the paper's units (config.METRES_PER_UNIT).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from ..layers import positional_encoding
from .config import METRES_PER_UNIT

# the supplement's five field centres: the eyes' centres, the mouth corners and the lower lip's midpoint
# (iBUG-68 ids, 0-based; a centre is the mean of its landmarks)
FIVE_CENTRES = ((36, 37, 38, 39, 40, 41), (42, 43, 44, 45, 46, 47), (48,), (54,), (57,))


def field_centres(kind: str, available: np.ndarray) -> list[tuple[int, ...]]:
    """The landmarks (iBUG-68 ids) each field is centred on: "34", every other of the 68 (those the head
    model has: FLAME's static embedding lacks the jaw contour), or "5", the supplement's five."""
    have = {int(i) for i in available}
    if kind == "5":
        missing = [c for c in FIVE_CENTRES if not set(c) <= have]
        if missing:
            raise ValueError(f"the head model lacks the landmarks {missing} of the five field centres")
        return list(FIVE_CENTRES)
    if kind != "34":
        raise ValueError(f"landmarks: {kind!r} (known: '34', '5')")
    return [(i,) for i in range(0, 68, 2) if i in have]


def support_weights(
    points: torch.Tensor, centres: torch.Tensor, support: float, cutoff: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """g_l(x) = max(exp(-|x - c_l|^2 / 2R^2) - tau, 0) for points (N, 3) and centres (L, 3), where it is
    positive: the (field, point) pairs (P, 2), sorted by field, and their g (P,). A point lies in a few supports
    at most (4% of the pairs on a rendered frame), so the exponentials are taken there only: over every pair they
    took a third of an LDF render. No gradient reaches the points or centres (neither is ever optimised)."""
    with torch.no_grad():
        squared = torch.cdist(centres, points).square_()  # (L, N): the pairs come out sorted by field
        pairs = (squared < 2 * support**2 * math.log(1 / cutoff)).nonzero()
        g = squared[pairs[:, 0], pairs[:, 1]]
        return pairs, g.mul_(-0.5 / support**2).exp_().sub_(cutoff).clamp_min_(0)


def support_radius(support: float, cutoff: float) -> float:
    """The distance beyond which g_l vanishes: exp(-d^2 / 2R^2) = tau."""
    return support * math.sqrt(2 * math.log(1 / cutoff))


def attention_masks(landmark_motion: np.ndarray, quantile: float = 0.25, floor: float = 1e-4) -> np.ndarray:
    """Binary attention masks A (L, C) from how far each field centre moves (L, C) when one conditioning
    coefficient is activated alone (paper Sec. 3.3): per coefficient, the centres moving less than the
    `quantile` of that coefficient's motions are masked out. Motions below `floor` metres count as none
    (a blendshape's numerical noise far from where it acts), so a coefficient that moves only the eyes
    reaches the eye fields only, even where most centres do not move at all."""
    threshold = np.maximum(np.quantile(landmark_motion, quantile, axis=0), floor)
    return landmark_motion >= threshold[None]


def windowed_encoding(x: torch.Tensor, frequencies: int, alpha: float) -> torch.Tensor:
    """(..., 3) -> (..., 3 (1 + 2F)): x, then sin and cos of 2^k pi x, frequency k weighted by
    (1 - cos(pi clamp(alpha - k, 0, 1))) / 2 (Nerfies' coarse-to-fine window; alpha grows to F)."""
    encoding = positional_encoding(x, frequencies, math.pi)
    k = torch.arange(frequencies, dtype=x.dtype, device=x.device)
    window = 0.5 * (1 - torch.cos(math.pi * (alpha - k).clamp(0, 1)))
    if bool((window < 1).any()):  # only while the window opens (a trained avatar renders with every weight 1)
        encoding[..., 3:] *= window.repeat_interleave(3).repeat(2)
    return encoding


class LocalFields(nn.Module):
    """L small MLPs (depth hidden layers of `width`, LeakyReLU), one per field centre, each on its encoded
    offset from its centre and its frame condition (the masked expression, the head pose, the per-frame
    deformation code). The condition is constant over a frame, so its part of the first layer is one
    product per field and frame. A field runs only on the points inside its support."""

    def __init__(self, fields: int, condition_dim: int, width: int, depth: int, frequencies: int):
        super().__init__()
        self.fields, self.frequencies = fields, frequencies
        position_dim = 3 * (1 + 2 * frequencies)
        self.position_in = nn.Parameter(torch.empty(fields, position_dim, width))
        self.condition_in = nn.Parameter(torch.empty(fields, condition_dim, width))
        self.bias_in = nn.Parameter(torch.zeros(fields, width))
        self.hidden = nn.ParameterList(nn.Parameter(torch.empty(fields, width, width)) for _ in range(depth - 1))
        self.hidden_bias = nn.ParameterList(nn.Parameter(torch.zeros(fields, width)) for _ in range(depth - 1))
        self.out = nn.Parameter(torch.empty(fields, width, 3))
        self.out_bias = nn.Parameter(torch.zeros(fields, 3))
        gain = nn.init.calculate_gain("leaky_relu", 0.01)
        for weight in (self.position_in, self.condition_in, *self.hidden):
            nn.init.normal_(weight, std=gain / math.sqrt(weight.shape[1]))
        # the fields start at no correction: the landmark term alone deforms until they learn
        nn.init.normal_(self.out, std=1e-4)

    def condition_bias(self, conditions: torch.Tensor) -> torch.Tensor:
        """Per-field conditions (L, C) -> the first layer's per-field offset (L, width)."""
        return torch.einsum("lc,lcw->lw", conditions, self.condition_in) + self.bias_in

    def forward(self, offsets: torch.Tensor, field_ids: torch.Tensor, bias: torch.Tensor, alpha: float):
        """offsets (P, 3) of the (point, field) pairs in paper units, sorted by field_ids -> outputs (P, 3)."""
        encoded = windowed_encoding(offsets, self.frequencies, alpha)
        counts = torch.bincount(field_ids, minlength=self.fields).tolist()
        outputs = []
        for field, part in zip(range(self.fields), encoded.split(counts)):
            if not len(part):
                continue
            h = nn.functional.leaky_relu(part @ self.position_in[field] + bias[field], 0.01)
            for weight, b in zip(self.hidden, self.hidden_bias):
                h = nn.functional.leaky_relu(h @ weight[field] + b[field], 0.01)
            outputs.append(h @ self.out[field] + self.out_bias[field])
        return torch.cat(outputs) if outputs else offsets.new_zeros(0, 3)


class GlobalField(nn.Module):
    """The ablation's single field: one MLP on the encoded position itself and the whole condition, sized to
    about the parameter count of the local fields it replaces."""

    def __init__(self, condition_dim: int, width: int, depth: int, frequencies: int):
        super().__init__()
        self.frequencies = frequencies
        position_dim = 3 * (1 + 2 * frequencies)
        self.position_in = nn.Linear(position_dim, width)
        self.condition_in = nn.Linear(condition_dim, width, bias=False)
        layers: list[nn.Module] = []
        for _ in range(depth - 1):
            layers += [nn.Linear(width, width), nn.LeakyReLU(0.01)]
        self.hidden = nn.Sequential(*layers)
        self.out = nn.Linear(width, 3)
        nn.init.normal_(self.out.weight, std=1e-4)
        nn.init.zeros_(self.out.bias)

    def forward(self, positions: torch.Tensor, condition: torch.Tensor, alpha: float) -> torch.Tensor:
        h = self.position_in(windowed_encoding(positions, self.frequencies, alpha)) + self.condition_in(condition)
        return self.out(self.hidden(nn.functional.leaky_relu(h, 0.01)))


def global_width(fields: int, condition_dim: int, width: int, depth: int, frequencies: int) -> int:
    """The global field's width with about as many parameters as `fields` local fields."""
    position_dim = 3 * (1 + 2 * frequencies)
    per_field = (position_dim + condition_dim + 1) * width + (depth - 1) * (width + 1) * width + (width + 1) * 3
    target = fields * per_field
    # (depth - 1) w^2 + (position + condition + 1 + (depth - 1) + 3) w + 3 = target
    a, b = depth - 1, position_dim + condition_dim + depth + 3
    return max(width, int((-b + math.sqrt(b * b + 4 * max(a, 1) * target)) / (2 * max(a, 1))))


class Deformation(nn.Module):
    """t(x) for the points of one frame, given its field centres (observed and canonical), its per-field
    conditions, and the encoding window. Returns t (N, 3) in metres."""

    def __init__(
        self,
        fields: int,
        condition_dim: int,
        masks: torch.Tensor,
        local: bool,
        support: float,
        cutoff: float,
        scale: float,
        width: int,
        depth: int,
        frequencies: int,
    ):
        super().__init__()
        self.support, self.cutoff, self.scale, self.local = support, cutoff, scale, local
        self.register_buffer("masks", masks.float(), persistent=False)  # (L, C) over the conditioning
        if local:
            self.net = LocalFields(fields, condition_dim, width, depth, frequencies)
        else:
            self.net = GlobalField(
                condition_dim, global_width(fields, condition_dim, width, depth, frequencies), depth, frequencies
            )

    def forward(
        self,
        points: torch.Tensor,
        centres: torch.Tensor,
        canonical_centres: torch.Tensor,
        condition: torch.Tensor,
        extra: torch.Tensor,
        alpha: float,
        learned: bool = True,
    ) -> torch.Tensor:
        """points (N, 3), centres / canonical_centres (L, 3) in head-space metres, condition (C,) the
        frame's expression (and jaw), extra (E,) what every field sees unmasked (head pose, deformation code)."""
        pairs, g = support_weights(points, centres, self.support, self.cutoff)
        field_ids, point_ids = pairs.unbind(1)
        total = points.new_zeros(len(points)).index_add_(0, point_ids, g)
        moved = points.new_zeros(points.shape).index_add_(
            0, point_ids, g[:, None] * (canonical_centres - centres)[field_ids]
        )
        t = moved / total.clamp_min(1.0)[:, None]
        if not learned:
            return t
        if not self.local:
            inside = total > 0  # the global field acts where the local ones would: near the face
            full = torch.cat([condition, extra])
            out = points.new_zeros(points.shape)
            if inside.any():
                out[inside] = self.net(points[inside] / METRES_PER_UNIT, full, alpha)
            return t + self.scale * out
        weighted = self._local(points, pairs, g, centres, condition, extra, alpha)
        return t + self.scale * points.new_zeros(points.shape).index_add(0, point_ids, weighted)

    def _local(self, points, pairs, g, centres, condition, extra, alpha):
        """Each (field, point) pair's weighted network output g_l(x) D_l(...) (P, 3), for the pairs (P, 2) inside
        the fields' supports, sorted by field, and their g (P,)."""
        conditions = torch.cat([condition[None] * self.masks, extra[None].expand(len(self.masks), -1)], 1)
        bias = self.net.condition_bias(conditions)
        field_ids, point_ids = pairs.unbind(1)
        offsets = (points[point_ids] - centres[field_ids]) / METRES_PER_UNIT
        return self.net(offsets, field_ids, bias, alpha) * g[:, None]

    def field_contributions(self, points, centres, condition, extra, alpha) -> torch.Tensor:
        """Each local field's share of the learned deformation at the points, in metres (N, L, 3)."""
        pairs, g = support_weights(points, centres, self.support, self.cutoff)
        weighted = self._local(points, pairs, g, centres, condition, extra, alpha)
        out = points.new_zeros(len(points), len(centres), 3)
        out[pairs[:, 1], pairs[:, 0]] = self.scale * weighted
        return out

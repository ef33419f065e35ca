"""The dense layer of the avatars' bf16 MLPs (a matrix product, its bias and an activation), and the positional
encoding their inputs share.

Rendering in bf16 on a CPU runs the three as one oneDNN kernel (PyTorch's `mkldnn._linear_pointwise`, the
kernel its compiler uses for the same fusion). Run apart, the bias copy, the product and the activation are
each a pass over every sample's activations, and on two cores those passes cost two to five times the
products themselves (a 4-layer, 128-wide bf16 chain over 32768 samples: 7.6 ms apart, 3.3 ms fused). In fp32
the fused kernel gains little and PyTorch's products need no per-shape kernels (below), so fp32 and training
keep PyTorch's operations.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

_FUSED = getattr(torch.ops.mkldnn, "_linear_pointwise", None) if torch.backends.mkldnn.is_available() else None

_ACTIVATIONS = {
    "none": lambda y: y,
    # in place: the product's output is a fresh tensor that nothing else reads (its backward needs its inputs)
    "relu": lambda y: F.relu(y, inplace=True),
    "sigmoid": torch.sigmoid,
}


def positional_encoding(x: torch.Tensor, frequencies: int, scale: float = 1.0) -> torch.Tensor:
    """(..., D) -> (..., D * (1 + 2 * frequencies)): x, then sin and cos of scale 2^k x for k < frequencies
    (NeRF's encoding with scale pi; NeRFace's positions come scaled into the unit ball and take scale 1)."""
    dims = x.shape[-1]
    eye = torch.eye(dims, dtype=x.dtype, device=x.device)
    powers = scale * 2.0 ** torch.arange(frequencies, dtype=torch.float64)
    scaled = torch.kron(powers.to(x.dtype).to(x.device), eye)  # blocks of scale 2^k I
    # one product gives x, the angles scale 2^k x (k-major) and the angles + pi/2, whose sine is the cosine; each
    # column one factor times x, plus zeros (exact), the last ones plus pi/2 (one rounding, under 1e-4 at the
    # largest angles). Fifteen times faster than the angles' broadcast product, and no joining of three tensors.
    # In x's precision, never autocast's
    lift = torch.cat([eye, scaled, scaled], 1)
    shift = torch.cat([torch.zeros(dims * (1 + frequencies)), torch.full((dims * frequencies,), torch.pi / 2)])
    flat = x.reshape(-1, dims)
    with torch.autocast(x.device.type, enabled=False):
        encoding = torch.addmm(shift.to(x), flat, lift).sin()
    encoding[:, :dims] = flat  # x itself, not its sine
    return encoding.view(*x.shape[:-1], encoding.shape[1])


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The precision layers on `x` compute in: autocast's when it is on for x's device, else x's own."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def dense(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, activation: str = "none"
) -> torch.Tensor:
    """activation(x @ weight.T + bias) for x (N, in), weight (out, in); `activation`: none, relu or sigmoid."""
    dtype = compute_dtype(x)
    fused = _FUSED is not None and x.device.type == "cpu" and dtype == torch.bfloat16 and not torch.is_grad_enabled()
    if not fused:
        return _ACTIVATIONS[activation](F.linear(x, weight, bias))
    # a strided weight (a slice of a wider layer's) sends oneDNN to its reference kernel: 700 ms instead of 1
    weight = weight.to(dtype).contiguous()
    bias = None if bias is None else bias.to(dtype)
    rows, size = len(x), bucket(len(x))
    if size == rows:
        return _FUSED(x.to(dtype), weight, bias, activation, [], "")
    # oneDNN builds a kernel for every new shape (about 1 ms, four times the product of 8192 samples through a
    # 128-wide layer), so the rows are padded to one of eight sizes per octave: at most 12.5% more rows, and the
    # few shapes are built once per process. The padding is zeros: with an odd width the bf16 kernel reads a row's
    # inputs in pairs, the last one paired with the next row's first value (times a zero weight), so a NaN in
    # uninitialised padding turned the last real row into NaN (measured: renders with NaN pixels)
    padded = x.new_zeros(size, x.shape[1], dtype=dtype)
    padded[:rows] = x
    return _FUSED(padded, weight, bias, activation, [], "")[:rows]


def bucket(rows: int) -> int:
    """The smallest of the sizes 64 and k 2^(e-3) (k = 8..16; e >= 6) that holds `rows`."""
    if rows <= 64:
        return 64
    step = 1 << (rows.bit_length() - 4)
    return -(-rows // step) * step

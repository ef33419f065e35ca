"""The rasterizer's compositing as compiled CPU loops (Numba), for when the splats live on the CPU.

Same image model as the tensor path in rasterizer.py (which runs on any device and is the reference these
are tested against), but no list of pairs is ever built: Gaussians are walked in depth order over the
pixels of each row of the ellipse where their alpha can reach ALPHA_MIN, and every pixel keeps its own
state. The forward walk goes front to back, keeping each pixel's light (3DGS stops a pixel before the
Gaussian that would leave less than TRANSMITTANCE_MIN, and the walk skips that pixel from then on) and the
rank of the last Gaussian it took. The backward walk goes back to front from that rank, recovering the
light before each Gaussian by dividing by (1 - alpha), as 3DGS's CUDA kernel does, with each Gaussian's
gradients summed in locals.

The image is cut into bands of rows walked in parallel; each band adds its gradients into its own buffer.
"""

from __future__ import annotations

import math

import numba
import numpy as np
import torch

# more bands than threads: the head covers the middle rows more than the top and bottom ones
BANDS_PER_THREAD = 4
SPAN_MARGIN = 1e-3


@numba.njit(cache=True, nogil=True, inline="always")
def _falloff(conics, g, dx, dy):
    return math.exp(-0.5 * (conics[g, 0] * dx * dx + conics[g, 2] * dy * dy) - conics[g, 1] * dx * dy)


@numba.njit(cache=True, nogil=True, inline="always")
def _row_span(conics, g, reach, u, dy, x0, x1):
    """The pixels of a box row (x0..x1) whose centres lie within the ellipse q <= reach, widened by
    SPAN_MARGIN px (the per-pixel alpha test decides): tilted, thin splats fill a small part of their box."""
    a, b, c = conics[g, 0], conics[g, 1], conics[g, 2]
    room = b * b * dy * dy - a * (c * dy * dy - reach)
    if room < 0.0:
        return x0, x0 - 1
    half = math.sqrt(room) / a
    centre = u - b * dy / a - 0.5
    return max(x0, math.ceil(centre - half - SPAN_MARGIN)), min(x1, math.floor(centre + half + SPAN_MARGIN))


@numba.njit(cache=True, nogil=True, parallel=True)
def forward(order, boxes, centres, conics, opacities, colours, size, bands, alpha_min, alpha_max, light_min):
    """Image (size², C), each pixel's light left (size²) in float64, the rank in `order` of the last
    Gaussian each pixel took (-1: none) and the number of (pixel, Gaussian) pairs composited."""
    pixels, channels = size * size, colours.shape[1]
    image = np.zeros((pixels, channels), colours.dtype)
    light = np.ones(pixels)
    last = np.full(pixels, -1, np.int64)
    done = np.zeros(pixels, np.bool_)
    taken = np.zeros(bands, np.int64)
    rows = (size + bands - 1) // bands
    for band in numba.prange(bands):
        top, bottom = band * rows, min(size, (band + 1) * rows) - 1
        for rank in range(len(order)):
            g = order[rank]
            y0, y1 = max(boxes[g, 2], top), min(boxes[g, 3], bottom)
            u, v, opacity = centres[g, 0], centres[g, 1], opacities[g]
            reach = 2.0 * math.log(max(opacity / alpha_min, 1.0))
            for y in range(y0, y1 + 1):
                dy = y + 0.5 - v
                x0, x1 = _row_span(conics, g, reach, u, dy, boxes[g, 0], boxes[g, 1])
                for x in range(x0, x1 + 1):
                    p = y * size + x
                    if done[p]:
                        continue
                    alpha = opacity * _falloff(conics, g, x + 0.5 - u, dy)
                    if alpha < alpha_min:
                        continue
                    alpha = min(alpha, alpha_max)
                    left = light[p] * (1.0 - alpha)
                    if left < light_min:
                        done[p] = True
                        continue
                    weight = light[p] * alpha
                    for c in range(channels):
                        image[p, c] += weight * colours[g, c]
                    light[p] = left
                    last[p] = rank
                    taken[band] += 1
    return image, light, last, taken.sum()


@numba.njit(cache=True, nogil=True, parallel=True)
def backward(
    order,
    boxes,
    centres,
    conics,
    opacities,
    colours,
    size,
    bands,
    alpha_min,
    alpha_max,
    light_left,
    last,
    grad_image,
    grad_alpha,
):
    """Gradients (N, 6 + C) of centre (2), conic (3), opacity (1) and colour (C) of every Gaussian, from
    those of the image (size², C) and the alpha (size²), given the forward walk's light_left and last."""
    channels = colours.shape[1]
    grads = np.zeros((bands, len(opacities), 6 + channels), colours.dtype)
    light = light_left.copy()  # walking back: the light after the current Gaussian
    behind = np.zeros(size * size)  # colour composited behind it, dotted with the image gradient
    rows = (size + bands - 1) // bands
    for band in numba.prange(bands):
        top, bottom = band * rows, min(size, (band + 1) * rows) - 1
        for rank in range(len(order) - 1, -1, -1):
            g = order[rank]
            y0, y1 = max(boxes[g, 2], top), min(boxes[g, 3], bottom)
            if y0 > y1:
                continue
            u, v, opacity = centres[g, 0], centres[g, 1], opacities[g]
            a, b, c_ = conics[g, 0], conics[g, 1], conics[g, 2]
            reach = 2.0 * math.log(max(opacity / alpha_min, 1.0))
            d_u = d_v = d_a = d_b = d_c = d_opacity = 0.0
            for y in range(y0, y1 + 1):
                dy = y + 0.5 - v
                x0, x1 = _row_span(conics, g, reach, u, dy, boxes[g, 0], boxes[g, 1])
                for x in range(x0, x1 + 1):
                    p = y * size + x
                    if rank > last[p]:
                        continue
                    dx = x + 0.5 - u
                    falloff = _falloff(conics, g, dx, dy)
                    raw = opacity * falloff
                    if raw < alpha_min:
                        continue
                    alpha = min(raw, alpha_max)
                    before = light[p] / (1.0 - alpha)
                    light[p] = before
                    shade = 0.0
                    for k in range(channels):
                        shade += colours[g, k] * grad_image[p, k]
                        grads[band, g, 6 + k] += before * alpha * grad_image[p, k]
                    d_alpha = before * shade - (behind[p] - grad_alpha[p] * light_left[p]) / (1.0 - alpha)
                    behind[p] += before * alpha * shade
                    if raw > alpha_max:  # capped: no gradient through alpha
                        continue
                    d_opacity += d_alpha * falloff
                    d_power = d_alpha * raw
                    d_a -= 0.5 * d_power * dx * dx
                    d_b -= d_power * dx * dy
                    d_c -= 0.5 * d_power * dy * dy
                    d_u += d_power * (a * dx + b * dy)
                    d_v += d_power * (c_ * dy + b * dx)
            grads[band, g, 0] += d_u
            grads[band, g, 1] += d_v
            grads[band, g, 2] += d_a
            grads[band, g, 3] += d_b
            grads[band, g, 4] += d_c
            grads[band, g, 5] += d_opacity
    return grads.sum(0)


def bands_for(size: int) -> int:
    """Bands of rows for a size-px image, with Numba's threads set to torch's (the rule's `threads`)."""
    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))
    return max(1, min(size, numba.get_num_threads() * BANDS_PER_THREAD))


class Composite(torch.autograd.Function):
    """forward with backward as its gradient: (centres (N, 2), conics (N, 3), opacities (N,), colours
    (N, C)) -> (image (size², C), alpha (size²)); `order` (Gaussians front to back) and `boxes` (N, 4:
    x0, x1, y0, y1 inclusive) say where to walk; the number of pairs composited goes into stats["pairs"]."""

    @staticmethod
    def forward(ctx, centres, conics, opacities, colours, order, boxes, size: int, limits: tuple, stats: dict):
        inputs = [t.detach().contiguous() for t in (centres, conics, opacities, colours)]
        bands = bands_for(size)
        image, light, last, pairs = forward(
            order.numpy(), boxes.numpy(), *(t.numpy() for t in inputs), size, bands, *limits
        )
        stats["pairs"] = int(pairs)
        image, light, last = torch.from_numpy(image), torch.from_numpy(light), torch.from_numpy(last)
        ctx.save_for_backward(*inputs, order, boxes, light, last)
        ctx.size, ctx.bands, ctx.limits = size, bands, limits
        return image, (1 - light).to(image.dtype)

    @staticmethod
    def backward(ctx, grad_image, grad_alpha):
        centres, conics, opacities, colours, order, boxes, light, last = ctx.saved_tensors
        grads = backward(
            order.numpy(),
            boxes.numpy(),
            centres.numpy(),
            conics.numpy(),
            opacities.numpy(),
            colours.numpy(),
            ctx.size,
            ctx.bands,
            ctx.limits[0],
            ctx.limits[1],
            light.numpy(),
            last.numpy(),
            grad_image.contiguous().numpy(),
            grad_alpha.contiguous().to(light.dtype).numpy(),
        )
        d_centres, d_conics, d_opacities, d_colours = torch.from_numpy(grads).split((2, 3, 1, colours.shape[1]), 1)
        return d_centres, d_conics, d_opacities[:, 0], d_colours, None, None, None, None, None

"""Image metrics of rendered test frames against the ground truth, one protocol for every avatar method.

All images are RGB float32 in [0, 1], (H, W, 3); masks are bool (H, W). Each metric is computed on the
full frame and inside the head mask (parsing classes other than background and clothing):
- L1: mean absolute error over pixels and channels; PSNR: 10 log10(1 / MSE).
- SSIM (Wang et al. 2004): Gaussian window 11 px, sigma 1.5, K1 0.01, K2 0.03, per channel, averaged;
  the masked value averages the SSIM map inside the mask.
- MS-SSIM (Wang et al. 2003): 5 scales with the paper's weights; images too small for 5 scales (the
  11 px window must fit the coarsest one) use the largest scale count that fits, weights renormalised;
  the scale count is reported.
- CPBD (Narvekar & Karam 2011): no-reference sharpness of the render (and of the ground truth, for
  scale); masked: only edges inside the mask.
- gradient energy: the render's summed squared Sobel gradient of the luma over the real frame's (1: as
  much fine detail as the real frame, below 1: blurrier; above 1: noisier), inside the mask when masked.
- LPIPS (Zhang et al. 2018) with the AlexNet backbone, when its weights are in the torch hub cache;
  otherwise unavailable, with the reason. Inputs scaled to [-1, 1]; masked: the image outside the
  mask is set to black in both images.
- CSIM: cosine similarity of dlib face-recognition embeddings (the optional `csim` extra).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import cv2
import numpy as np

log = logging.getLogger(__name__)

MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
ALEXNET_FILE = "alexnet-owt-7be5be79.pth"
ALEXNET_URL = "https://download.pytorch.org/models/" + ALEXNET_FILE
LPIPS_HINT = (
    f".venv/bin/python -c \"import torch; torch.hub.load_state_dict_from_url('{ALEXNET_URL}')\""
    " (once, with internet; it stores the weights in the torch hub cache)"
)


def l1(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    diff = np.abs(a - b)
    return float(diff[mask].mean() if mask is not None else diff.mean())


def psnr(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    sq = (a - b) ** 2
    mse = float(sq[mask].mean() if mask is not None else sq.mean())
    return -10.0 * math.log10(max(mse, 1e-10))


def _blur(x: np.ndarray) -> np.ndarray:
    return cv2.GaussianBlur(x, (11, 11), 1.5, borderType=cv2.BORDER_REFLECT)


def _ssim_maps(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel SSIM and contrast-structure maps (H, W), averaged over channels."""
    c1, c2 = 0.01**2, 0.03**2
    mu_a, mu_b = _blur(a), _blur(b)
    var_a = _blur(a * a) - mu_a**2
    var_b = _blur(b * b) - mu_b**2
    cov = _blur(a * b) - mu_a * mu_b
    cs = (2 * cov + c2) / (var_a + var_b + c2)
    lum = (2 * mu_a * mu_b + c1) / (mu_a**2 + mu_b**2 + c1)
    ssim_map, cs_map = lum * cs, cs
    if ssim_map.ndim == 3:
        ssim_map, cs_map = ssim_map.mean(-1), cs_map.mean(-1)
    return ssim_map, cs_map


def ssim(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    m, _ = _ssim_maps(a.astype(np.float32), b.astype(np.float32))
    return float(m[mask].mean() if mask is not None else m.mean())


def ms_ssim_scales(size: int) -> int:
    """How many of the 5 scales fit: the coarsest image must be at least the 11 px window."""
    scales = 1
    while scales < 5 and size // (2**scales) >= 11:
        scales += 1
    return scales


def ms_ssim(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    a, b = a.astype(np.float32), b.astype(np.float32)
    scales = ms_ssim_scales(min(a.shape[:2]))
    weights = np.array(MS_SSIM_WEIGHTS[:scales]) / sum(MS_SSIM_WEIGHTS[:scales])
    m = None if mask is None else mask.astype(np.float32)
    value = 1.0
    for s in range(scales):
        ssim_map, cs_map = _ssim_maps(a, b)
        inside = None if m is None else m > 0.5
        if inside is not None and not inside.any():
            inside = None
        term = ssim_map if s == scales - 1 else cs_map
        mean = float(term[inside].mean() if inside is not None else term.mean())
        value *= max(mean, 1e-6) ** weights[s]
        if s < scales - 1:
            a, b = _half(a), _half(b)
            m = None if m is None else _half(m)
    return float(value)


def _half(x: np.ndarray) -> np.ndarray:
    h, w = x.shape[0] // 2 * 2, x.shape[1] // 2 * 2
    x = x[:h, :w]
    return 0.25 * (x[0::2, 0::2] + x[1::2, 0::2] + x[0::2, 1::2] + x[1::2, 1::2])


def gradient_energy(render: np.ndarray, truth: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Sum of the render's squared luma gradients over the real frame's (see the module docstring)."""

    def energy(image):
        gray = cv2.cvtColor(np.clip(image, 0, 1).astype(np.float32), cv2.COLOR_RGB2GRAY).astype(np.float64)
        gx = cv2.Sobel(gray, cv2.CV_64F, 1, 0, ksize=3)
        gy = cv2.Sobel(gray, cv2.CV_64F, 0, 1, ksize=3)
        squared = gx**2 + gy**2
        return float(squared[mask].sum() if mask is not None else squared.sum())

    reference = energy(truth)
    return energy(render) / reference if reference > 0 else float("nan")


def cpbd(image: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Cumulative probability of blur detection (higher = sharper), on the luma of an RGB image.

    Vertical edges (Canny on the image, kept where the horizontal Sobel response dominates) in 64x64
    blocks holding more than 0.2% edge pixels; an edge's width is the distance between the intensity
    extrema on either side of it along the row; its blur probability 1 - exp(-(w / w_JNB)^3.6) with
    w_JNB = 5 in low-contrast blocks (<= 50 grey levels) and 3 otherwise; CPBD is the share of edges
    whose probability is at most 63%."""
    gray = cv2.cvtColor((np.clip(image, 0, 1) * 255).round().astype(np.uint8), cv2.COLOR_RGB2GRAY)
    g = gray.astype(np.float64)
    edges = cv2.Canny(gray, 100, 200) > 0
    gx = cv2.Sobel(g, cv2.CV_64F, 1, 0, ksize=3)
    gy = cv2.Sobel(g, cv2.CV_64F, 0, 1, ksize=3)
    edges &= np.abs(gx) >= np.abs(gy)
    if mask is not None:
        edges &= mask
    h, w = g.shape
    probabilities = []
    block = 64
    for by in range(0, h - h % block or h, block):
        for bx in range(0, w - w % block or w, block):
            sl = (slice(by, by + block), slice(bx, bx + block))
            block_edges = edges[sl]
            if block_edges.sum() <= 0.002 * block_edges.size:
                continue
            contrast = g[sl].max() - g[sl].min()
            w_jnb = 5.0 if contrast <= 50 else 3.0
            for y, x in zip(*np.nonzero(block_edges)):
                y, x = y + by, x + bx
                width = _edge_width(g[y], x, gx[y, x] > 0)
                if width > 0:
                    probabilities.append(1.0 - math.exp(-((width / w_jnb) ** 3.6)))
    if not probabilities:
        return float("nan")
    return float(np.mean(np.array(probabilities) <= 0.63))


def _edge_width(row: np.ndarray, x: int, rising: bool) -> int:
    """Distance between the local extrema on both sides of an edge at column x along one image row."""
    sign = 1.0 if rising else -1.0
    r = sign * row
    left = x
    while left > 0 and r[left - 1] < r[left]:
        left -= 1
    right = x
    while right < len(row) - 1 and r[right + 1] > r[right]:
        right += 1
    return right - left


class Lpips:
    """LPIPS v0.1 with the AlexNet backbone (Zhang et al. 2018): the five ReLU outputs of AlexNet's
    convolutional stack, unit-normalised over channels, squared differences weighted per channel by the
    learned linear layers (shipped in the `lpips` package), averaged over space and summed over layers.

    The AlexNet weights are torchvision's ImageNet checkpoint, read from the torch hub cache; without
    them `available` is False and `reason` says how to get them. torchvision itself is not imported."""

    SHIFT = (-0.030, -0.088, -0.188)  # the LPIPS input scaling layer
    SCALE = (0.458, 0.448, 0.450)
    TAPS = (1, 4, 7, 9, 11)  # indices of the ReLUs after each convolution in AlexNet's `features`

    def __init__(self, device: str = "cpu"):
        import importlib.util

        import torch

        self.model, self.device = None, device
        weights = Path(torch.hub.get_dir()) / "checkpoints" / ALEXNET_FILE
        if not weights.exists():
            self.reason = f"AlexNet weights not found at {weights}; to enable LPIPS run {LPIPS_HINT}"
            return
        spec = importlib.util.find_spec("lpips")
        linear = Path(spec.submodule_search_locations[0]) / "weights" / "v0.1" / "alex.pth" if spec else None
        if linear is None or not linear.exists():
            self.reason = "the lpips package (its linear-layer weights) is missing; reinstall with scripts/setup.sh"
            return
        self.features = _alexnet_features()
        state = torch.load(weights, map_location="cpu", weights_only=True)
        self.features.load_state_dict({k[len("features.") :]: v for k, v in state.items() if k.startswith("features.")})
        lin = torch.load(linear, map_location="cpu", weights_only=True)
        self.linear = [lin[f"lin{k}.model.1.weight"].to(device) for k in range(5)]
        self.model = self.features.to(device).eval()
        self.shift = torch.tensor(self.SHIFT, device=device).view(1, 3, 1, 1)
        self.scale = torch.tensor(self.SCALE, device=device).view(1, 3, 1, 1)
        self.reason = f"AlexNet from {weights}, LPIPS v0.1 linear layers from {linear}"

    @property
    def available(self) -> bool:
        return self.model is not None

    def _taps(self, x):
        out = []
        x = (x - self.shift) / self.scale
        for i, layer in enumerate(self.model):
            x = layer(x)
            if i in self.TAPS:
                out.append(x / (x.pow(2).sum(1, keepdim=True).sqrt() + 1e-10))
        return out

    def distance(self, a, b):
        """The LPIPS distance of (1, 3, H, W) tensors in [-1, 1], differentiable (a training loss)."""
        import torch

        return sum(
            (torch.nn.functional.conv2d((fa - fb) ** 2, w)).mean()
            for fa, fb, w in zip(self._taps(a), self._taps(b), self.linear)
        )

    def __call__(self, a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
        import torch

        if mask is not None:
            a, b = a * mask[..., None], b * mask[..., None]
        ta, tb = (
            torch.as_tensor(x, dtype=torch.float32).permute(2, 0, 1)[None].to(self.device) * 2 - 1 for x in (a, b)
        )
        with torch.no_grad():
            return float(self.distance(ta, tb))


def _alexnet_features():
    """AlexNet's convolutional stack, laid out as torchvision's `features` so its checkpoint loads."""
    from torch import nn

    return nn.Sequential(
        nn.Conv2d(3, 64, 11, stride=4, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(3, 2),
        nn.Conv2d(64, 192, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(3, 2),
        nn.Conv2d(192, 384, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(384, 256, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(256, 256, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(3, 2),
    )


class Csim:
    """Identity similarity through dlib's face-recognition network (the optional `csim` extra)."""

    def __init__(self):
        self.reason, self._models = "", None
        try:
            import dlib
            import face_recognition_models as frm
        except ImportError as e:
            self.reason = (
                f"{e.name} is not installed; install the optional extra: pip install '.[csim]' (dlib compiles, ~7 min)"
            )
            return
        self._models = (
            dlib.get_frontal_face_detector(),
            dlib.shape_predictor(frm.pose_predictor_model_location()),
            dlib.face_recognition_model_v1(frm.face_recognition_model_location()),
        )
        self.reason = "dlib face-recognition ResNet (face_recognition_models)"

    @property
    def available(self) -> bool:
        return self._models is not None

    def embedding(self, image: np.ndarray) -> np.ndarray | None:
        detector, predictor, encoder = self._models
        rgb = (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
        faces = detector(rgb, 1)
        if not faces:
            return None
        shape = predictor(rgb, max(faces, key=lambda r: r.area()))
        return np.array(encoder.compute_face_descriptor(rgb, shape))

    def __call__(self, a: np.ndarray, b: np.ndarray) -> float:
        ea, eb = self.embedding(a), self.embedding(b)
        if ea is None or eb is None:
            return float("nan")
        return float(ea @ eb / (np.linalg.norm(ea) * np.linalg.norm(eb)))


def frame_metrics(
    render: np.ndarray,
    truth: np.ndarray,
    mask: np.ndarray,
    lpips_model: Lpips | None = None,
    csim_model: Csim | None = None,
) -> dict[str, float]:
    """Every metric of one frame, full frame and inside the head mask (`head_` prefix)."""
    out = {}
    for prefix, m in (("", None), ("head_", mask)):
        out[prefix + "l1"] = l1(render, truth, m)
        out[prefix + "psnr"] = psnr(render, truth, m)
        out[prefix + "ssim"] = ssim(render, truth, m)
        out[prefix + "ms_ssim"] = ms_ssim(render, truth, m)
        out[prefix + "cpbd"] = cpbd(render, m)
        out[prefix + "cpbd_truth"] = cpbd(truth, m)
        out[prefix + "gradient_energy"] = gradient_energy(render, truth, m)
        if lpips_model is not None and lpips_model.available:
            out[prefix + "lpips"] = lpips_model(render, truth, m)
    if csim_model is not None and csim_model.available:
        out["csim"] = csim_model(render, truth)
    return out

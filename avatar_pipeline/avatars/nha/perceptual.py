"""The perceptual term of Neural Head Avatars: feature and style (Gram matrix) distances in a face-recognition
network, InsightFace's arcface_torch ResNet-18 ("r18" backbone.pth), as the authors use it.

The weights come from the user (they are not downloadable here); the network below is written to read that
checkpoint's layout (conv1, bn1, prelu, layer1-4 of "improved" residual blocks). A checkpoint of another
network is refused with the keys that do not fit.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ...errors import InputError

HOW_TO_GET = (
    "download the arcface_torch r18 model (backbone.pth, e.g. ms1mv3_arcface_r18) from InsightFace's "
    "model zoo and set perceptual_weights of this avatar to its path, or leave perceptual_weights unset "
    "(the term is then off)"
)


class _Block(nn.Module):
    """BN, 3x3 conv, BN, PReLU, 3x3 conv (strided), BN, plus the (downsampled) input."""

    def __init__(self, inplanes: int, planes: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.conv1 = nn.Conv2d(inplanes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.prelu = nn.PReLU(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x):
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return out + (x if self.downsample is None else self.downsample(x))


class FaceFeatures(nn.Module):
    """The convolutional trunk of arcface_torch's iresnet18; returns the four stages' outputs."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.prelu = nn.PReLU(64)
        widths, inplanes = (64, 128, 256, 512), 64
        for index, planes in enumerate(widths, start=1):
            setattr(self, f"layer{index}", nn.Sequential(_Block(inplanes, planes, 2), _Block(planes, planes, 1)))
            inplanes = planes

    def forward(self, x):
        x = self.prelu(self.bn1(self.conv1(x)))
        outputs = []
        for index in range(1, 5):
            x = getattr(self, f"layer{index}")(x)
            outputs.append(x)
        return outputs


def load_face_features(path: str | Path) -> FaceFeatures:
    path = Path(path)
    if not path.exists():
        raise InputError(str(path), "perceptual_weights file not found", HOW_TO_GET)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated file, a pickle of something else
        raise InputError(
            str(path), f"cannot be read as PyTorch weights ({type(e).__name__}: {e})", HOW_TO_GET
        ) from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    network = FaceFeatures()
    expected = network.state_dict()
    if not isinstance(state, dict):
        raise InputError(str(path), "holds no state dict", HOW_TO_GET)
    missing = [k for k in expected if k not in state]
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or wrong:
        detail = ", ".join((missing + wrong)[:4])
        raise InputError(
            str(path),
            f"is not the arcface_torch r18 backbone ({len(missing)} layers missing, {len(wrong)} of another "
            f"shape: {detail})",
            HOW_TO_GET,
        )
    network.load_state_dict({k: state[k] for k in expected})
    network.eval()
    for p in network.parameters():
        p.requires_grad_(False)
    return network


def _gram(features: torch.Tensor) -> torch.Tensor:
    b, c, h, w = features.shape
    flat = features.reshape(b, c, h * w)
    return flat @ flat.transpose(1, 2) / (c * h * w)


class FaceRecognitionPerceptualLoss(nn.Module):
    """L1 between the second stage's features plus L1 between the Gram matrices of all four stages (images
    (B, 3, H, W) in [-1, 1])."""

    def __init__(self, weights_path: str | Path):
        super().__init__()
        self.network = load_face_features(weights_path)

    def train(self, mode: bool = True):  # the recognition network always runs with its running statistics
        super().train(mode)
        self.network.eval()
        return self

    def forward(self, predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        fake, real = self.network(predicted), self.network(target.detach())
        content = (fake[1] - real[1]).abs().mean()
        style = sum((_gram(a) - _gram(b)).abs().mean() for a, b in zip(fake, real))
        return content + style

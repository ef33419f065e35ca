"""Face parsing with BiSeNet (ResNet-18 context path, feature fusion) for user-given CelebAMask-HQ weights,
e.g. the widely used `79999_iter.pth`. Parameter names follow that checkpoint's layout so it loads
strictly; its 19 output classes are cache.PARSING_CLASSES in the same order."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .config import ParsingConfig
from .errors import InputError

INPUT = 512
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def build_bisenet(num_classes: int = 19):
    import torch
    from torch import nn
    from torch.nn import functional as F

    class ConvBNReLU(nn.Module):
        def __init__(self, cin, cout, ks=3, stride=1, padding=1):
            super().__init__()
            self.conv = nn.Conv2d(cin, cout, ks, stride, padding, bias=False)
            self.bn = nn.BatchNorm2d(cout)

        def forward(self, x):
            return F.relu(self.bn(self.conv(x)))

    class BasicBlock(nn.Module):
        def __init__(self, cin, cout, stride=1):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.downsample = None
            if cin != cout or stride != 1:
                self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x):
            residual = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
            shortcut = x if self.downsample is None else self.downsample(x)
            return F.relu(shortcut + residual)

    class ResNet18(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
            self.bn1 = nn.BatchNorm2d(64)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
            widths = [(64, 64, 1), (64, 128, 2), (128, 256, 2), (256, 512, 2)]
            for i, (cin, cout, stride) in enumerate(widths, start=1):
                setattr(self, f"layer{i}", nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout)))

        def forward(self, x):
            x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
            x = self.layer1(x)
            f8 = self.layer2(x)
            f16 = self.layer3(f8)
            return f8, f16, self.layer4(f16)

    class AttentionRefinement(nn.Module):
        def __init__(self, cin, cout):
            super().__init__()
            self.conv = ConvBNReLU(cin, cout)
            self.conv_atten = nn.Conv2d(cout, cout, 1, bias=False)
            self.bn_atten = nn.BatchNorm2d(cout)

        def forward(self, x):
            feat = self.conv(x)
            return feat * torch.sigmoid(self.bn_atten(self.conv_atten(F.adaptive_avg_pool2d(feat, 1))))

    class ContextPath(nn.Module):
        def __init__(self):
            super().__init__()
            self.resnet = ResNet18()
            self.arm16 = AttentionRefinement(256, 128)
            self.arm32 = AttentionRefinement(512, 128)
            self.conv_head32 = ConvBNReLU(128, 128)
            self.conv_head16 = ConvBNReLU(128, 128)
            self.conv_avg = ConvBNReLU(512, 128, ks=1, padding=0)

        def forward(self, x):
            f8, f16, f32 = self.resnet(x)
            global_context = self.conv_avg(F.adaptive_avg_pool2d(f32, 1))
            up32 = self.conv_head32(F.interpolate(self.arm32(f32) + global_context, f16.shape[2:], mode="nearest"))
            up16 = self.conv_head16(F.interpolate(self.arm16(f16) + up32, f8.shape[2:], mode="nearest"))
            return f8, up16

    class FeatureFusion(nn.Module):
        def __init__(self, cin, cout):
            super().__init__()
            self.convblk = ConvBNReLU(cin, cout, ks=1, padding=0)
            self.conv1 = nn.Conv2d(cout, cout // 4, 1, bias=False)
            self.conv2 = nn.Conv2d(cout // 4, cout, 1, bias=False)

        def forward(self, a, b):
            feat = self.convblk(torch.cat([a, b], 1))
            attention = torch.sigmoid(self.conv2(F.relu(self.conv1(F.adaptive_avg_pool2d(feat, 1)))))
            return feat + feat * attention

    class Head(nn.Module):
        def __init__(self, cin, mid, n):
            super().__init__()
            self.conv = ConvBNReLU(cin, mid)
            self.conv_out = nn.Conv2d(mid, n, 1, bias=False)

        def forward(self, x):
            return self.conv_out(self.conv(x))

    class BiSeNet(nn.Module):
        def __init__(self, n):
            super().__init__()
            self.cp = ContextPath()
            self.ffm = FeatureFusion(256, 256)
            self.conv_out = Head(256, 256, n)
            # auxiliary heads used in training; kept so the checkpoint loads strictly
            self.conv_out16 = Head(128, 64, n)
            self.conv_out32 = Head(128, 64, n)

        def forward(self, x):
            f8, up16 = self.cp(x)
            logits = self.conv_out(self.ffm(f8, up16))
            return F.interpolate(logits, x.shape[2:], mode="bilinear", align_corners=True)

    return BiSeNet(num_classes)


class BiSeNetParser:
    def __init__(self, weights: str | None):
        if not weights:
            raise InputError(
                "parsing.bisenet_weights",
                "the bisenet backend needs a checkpoint",
                "download the CelebAMask-HQ BiSeNet weights (e.g. 79999_iter.pth) once and set "
                "parsing.bisenet_weights to the file; or use parsing.backend: mediapipe",
            )
        if not Path(weights).exists():
            raise InputError(weights, "BiSeNet checkpoint not found", "fix parsing.bisenet_weights")
        import torch

        from .runtime import torch_device

        self.torch, self.device = torch, torch_device()
        self.model = build_bisenet()
        state = torch.load(weights, map_location="cpu", weights_only=True)
        state = {k.removeprefix("module."): v for k, v in state.items()}  # saved from DataParallel
        try:
            self.model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise InputError(
                weights,
                f"not a 19-class CelebAMask-HQ BiSeNet checkpoint ({str(e)[:300]})",
                "use the face-parsing BiSeNet weights (ResNet-18 backbone)",
            ) from None
        self.model.eval().to(self.device)
        self.mean = torch.tensor(MEAN).view(1, 3, 1, 1).to(self.device)
        self.std = torch.tensor(STD).view(1, 3, 1, 1).to(self.device)

    @classmethod
    def from_config(cls, cfg: ParsingConfig) -> "BiSeNetParser":
        return cls(cfg.bisenet_weights)

    def parse(self, rgb: np.ndarray) -> np.ndarray:
        import cv2

        h, w = rgb.shape[:2]
        x = cv2.resize(rgb, (INPUT, INPUT), interpolation=cv2.INTER_LINEAR)
        x = self.torch.from_numpy(x).permute(2, 0, 1)[None].float().div(255).to(self.device)
        with self.torch.no_grad():
            logits = self.model((x - self.mean) / self.std)[0]
        labels = logits.argmax(0).to(self.torch.uint8).cpu().numpy()
        return cv2.resize(labels, (w, h), interpolation=cv2.INTER_NEAREST)

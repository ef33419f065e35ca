"""Training a NeRFace avatar from a subject's cache (frames, background, tracking), with checkpoints that
survive a kill, fixed seeds, a progress bar and a CSV log. Not yet wired into the Snakemake DAG.

Per the paper: per-frame learnable latent codes (32-d) regularised with an l2 penalty (weight 0.05),
Adam at 5e-4, rays sampled 95% inside the head's bounding box, the loss on both coarse and fine colours.
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import logging
import math
import os
from pathlib import Path

import cv2
import numpy as np
import torch

from .. import cache
from ..runtime import progress, torch_device
from ..stages.tracking import camera_to_head_gl
from .nerface import FieldConfig, NeRFaceRenderer, camera_rays

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    size: int = 64  # training resolution (paper: 512)
    steps: int = 2000
    rays: int = 512  # per step (paper: 2048)
    head_fraction: float = 0.95
    coarse_samples: int = 32  # paper: 64 + 64
    fine_samples: int = 32
    learning_rate: float = 5e-4
    latent_weight: float = 0.05
    checkpoint_every: int = 200
    seed: int = 0
    field: FieldConfig = FieldConfig(width=128, depth=4, colour_width=64, colour_depth=1)

    @classmethod
    def from_settings(cls, section: dict) -> "TrainConfig":
        """From the flat `nerface:` config section."""
        field_keys = {"latent_dim", "width", "depth", "colour_width", "colour_depth"}
        field = FieldConfig(**{k: v for k, v in section.items() if k in field_keys})
        return cls(field=field, **{k: v for k, v in section.items() if k not in field_keys})

    def digest(self) -> str:
        """What a checkpoint must match to be resumed (everything but the step budget)."""
        d = dataclasses.asdict(self)
        d.pop("steps")
        d.pop("checkpoint_every")
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


class SubjectRays:
    """The training frames of a subject at the training resolution, and ray sampling from them."""

    def __init__(self, store: cache.SubjectCache, size: int, split: str = "train"):
        data = cache.read_npz(store.stage_dir("tracking") / "tracking.npz", "tracking",
                              ("head_to_camera", "expression", "focal", "fitted", "image_size"))
        crop_size = int(data["image_size"])
        frames = [i for i in store.split()[split] if data["fitted"][i]]
        if not frames:
            raise ValueError(f"{store.root}: no tracked frames in the {split} split")
        self.frames = np.array(frames)
        self.size, self.focal = size, float(data["focal"]) * size / crop_size
        self.images = torch.stack([torch.as_tensor(cv2.resize(store.read_frame(i), (size, size), interpolation=cv2.INTER_AREA),
                                                   dtype=torch.float32) / 255 for i in frames])
        self.background = torch.as_tensor(cv2.resize(store.read_background(), (size, size), interpolation=cv2.INTER_AREA),
                                          dtype=torch.float32) / 255
        self.camera_to_head = torch.as_tensor(camera_to_head_gl(data["head_to_camera"][self.frames]))
        self.expression = torch.as_tensor(data["expression"][self.frames], dtype=torch.float32)
        boxes = [json_frame["bbox"] for json_frame in self._nerface_frames(store, split)]
        self.boxes = np.array(boxes) * size  # y0, y1, x0, x1 in pixels
        distance = self.camera_to_head[:, :3, 3].norm(dim=1)
        self.near, self.far = (distance - 0.35).clamp_min(0.05), distance + 0.35  # a head fits in 0.35 m of its centre

    @staticmethod
    def _nerface_frames(store: cache.SubjectCache, split: str) -> list[dict]:
        meta = cache.read_json(store.stage_dir("tracking") / "nerface" / f"transforms_{split}.json", "tracking")
        return meta["frames"]

    def sample(self, k: int, count: int, head_fraction: float, rng: np.random.Generator):
        """`count` pixels of training frame k, `head_fraction` of them inside the head box."""
        n_head = int(round(count * head_fraction))
        y0, y1, x0, x1 = self.boxes[k]
        head = np.stack([rng.uniform(x0, max(x0 + 1, x1), n_head), rng.uniform(y0, max(y0 + 1, y1), n_head)], 1)
        anywhere = rng.uniform(0, self.size, (count - n_head, 2))
        pixels = torch.as_tensor(np.floor(np.concatenate([head, anywhere])).clip(0, self.size - 1), dtype=torch.float32)
        origins, dirs = camera_rays(self.camera_to_head[k], self.focal, self.size, pixels)
        ix, iy = pixels[:, 0].long(), pixels[:, 1].long()
        return origins, dirs, self.images[k][iy, ix], self.background[iy, ix]


def psnr(mse: float) -> float:
    return -10.0 * math.log10(max(mse, 1e-10))


def train(store: cache.SubjectCache, cfg: TrainConfig, out_dir: Path) -> dict:
    """Train (or resume) into out_dir: checkpoint.pt (atomic), log.csv, done.json when finished."""
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    device = torch_device()
    data = SubjectRays(store, cfg.size)
    renderer = NeRFaceRenderer(dataclasses.replace(cfg.field, expression_dim=data.expression.shape[1]),
                               cfg.coarse_samples, cfg.fine_samples).to(device)
    latents = torch.nn.Embedding(len(data.frames), cfg.field.latent_dim).to(device)
    torch.nn.init.zeros_(latents.weight)
    optimizer = torch.optim.Adam(list(renderer.parameters()) + list(latents.parameters()), lr=cfg.learning_rate)
    checkpoint, step = out_dir / "checkpoint.pt", 0
    if checkpoint.exists():
        state = torch.load(checkpoint, map_location=device, weights_only=False)
        if state["config"] != cfg.digest():
            raise ValueError(f"{checkpoint} was written with other settings; delete it or restore them")
        renderer.load_state_dict(state["renderer"])
        latents.load_state_dict(state["latents"])
        optimizer.load_state_dict(state["optimizer"])
        rng = state["rng"]
        torch.set_rng_state(state["torch_rng"])
        step = state["step"]
        log.info("resuming %s from step %d", checkpoint, step)
    log_path = out_dir / "log.csv"
    new_log = not log_path.exists() or step == 0
    with open(log_path, "w" if new_log else "a", newline="") as f:
        writer = csv.writer(f)
        if new_log:
            writer.writerow(["step", "loss", "psnr_fine"])
        bar = progress(range(step, cfg.steps), cfg.steps - step, "nerface: train")
        bar.unit = "step"
        for step in bar:
            k = int(rng.integers(len(data.frames)))
            origins, dirs, target, background = (t.to(device) for t in data.sample(k, cfg.rays, cfg.head_fraction, rng))
            condition = torch.cat([data.expression[k].to(device), latents.weight[k]])
            near = data.near[k].expand(len(origins)).to(device)
            far = data.far[k].expand(len(origins)).to(device)
            out = renderer(origins, dirs, near, far, condition, background)
            mse_fine = ((out["fine"] - target) ** 2).mean()
            loss = ((out["coarse"] - target) ** 2).mean() + mse_fine + cfg.latent_weight * (latents.weight[k] ** 2).sum()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            writer.writerow([step + 1, f"{loss.item():.6f}", f"{psnr(mse_fine.item()):.3f}"])
            bar.set_postfix(loss=f"{loss.item():.4f}", psnr=f"{psnr(mse_fine.item()):.1f}", refresh=False)
            if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
                f.flush()
                _save(checkpoint, {"config": cfg.digest(), "step": step + 1, "renderer": renderer.state_dict(),
                                   "latents": latents.state_dict(), "optimizer": optimizer.state_dict(),
                                   "rng": rng, "torch_rng": torch.get_rng_state()})
    summary = {"steps": cfg.steps, "frames": len(data.frames), "size": cfg.size}
    cache.write_json(out_dir / "done.json", summary)
    return summary


def _save(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_trained(store: cache.SubjectCache, cfg: TrainConfig, out_dir: Path):
    """The renderer and latent codes of a finished training run."""
    data = SubjectRays(store, cfg.size)
    renderer = NeRFaceRenderer(dataclasses.replace(cfg.field, expression_dim=data.expression.shape[1]),
                               cfg.coarse_samples, cfg.fine_samples)
    state = torch.load(out_dir / "checkpoint.pt", map_location="cpu", weights_only=False)
    if state["config"] != cfg.digest():
        raise ValueError(f"{out_dir / 'checkpoint.pt'} was written with other settings")
    renderer.load_state_dict(state["renderer"])
    latents = torch.nn.Embedding(len(data.frames), cfg.field.latent_dim)
    latents.load_state_dict(state["latents"])
    return renderer.eval(), latents, data


@torch.no_grad()
def render_image(renderer: NeRFaceRenderer, camera_to_head: torch.Tensor, focal: float, size: int,
                 condition: torch.Tensor, background: torch.Tensor, near: float, far: float, chunk: int = 4096):
    """Full image (size, size, 3) and foreground alpha (size, size), rendered in chunks of rays."""
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    pixels = torch.stack([xs.flatten(), ys.flatten()], 1).float()
    origins, dirs = camera_rays(camera_to_head, focal, size, pixels)
    bg = background.reshape(-1, 3)
    colour, alpha = [], []
    for a in range(0, len(pixels), chunk):
        sl = slice(a, a + chunk)
        n = len(pixels[sl])
        out = renderer(origins[sl], dirs[sl], torch.full((n,), near), torch.full((n,), far), condition, bg[sl], jitter=False)
        colour.append(out["fine"])
        alpha.append(out["fine_alpha"])
    return torch.cat(colour).reshape(size, size, 3), torch.cat(alpha).reshape(size, size)


def evaluate_test_frames(store: cache.SubjectCache, cfg: TrainConfig, out_dir: Path) -> dict:
    """Render the held-out test frames with the NeRFace protocol (the latent code of the first training
    frame) and measure L1 and PSNR against them; per-frame CSV, summary JSON, side-by-side images."""
    renderer, latents, train_data = load_trained(store, cfg, out_dir)
    test = SubjectRays(store, cfg.size, split="test")
    latent = latents.weight[0]
    rows = []
    renders = out_dir / "test_renders"
    renders.mkdir(exist_ok=True)
    for k, frame in enumerate(test.frames):
        condition = torch.cat([test.expression[k], latent])
        image, _ = render_image(renderer, test.camera_to_head[k], test.focal, test.size, condition, test.background,
                                float(test.near[k]), float(test.far[k]))
        truth = test.images[k]
        mse = float(((image - truth) ** 2).mean())
        rows.append({"frame": int(frame), "l1": float((image - truth).abs().mean()), "psnr": psnr(mse),
                     "psnr_background_only": psnr(float(((test.background - truth) ** 2).mean()))})
        error = (image - truth).abs().mean(-1, keepdim=True).expand(-1, -1, 3).clamp(0, 1)
        side = torch.cat([truth, image.clamp(0, 1), error], 1)
        cache.write_png(renders / cache.frame_name(int(frame)), (side.numpy() * 255).round().astype(np.uint8))
    with open(out_dir / "test_metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    summary = {"protocol": "latent code of the first training frame (NeRFace)", "frames": len(rows),
               "l1": float(np.mean([r["l1"] for r in rows])), "psnr": float(np.mean([r["psnr"] for r in rows])),
               "psnr_background_only": float(np.mean([r["psnr_background_only"] for r in rows])), "size": cfg.size}
    cache.write_json(out_dir / "test_metrics.json", summary)
    return summary

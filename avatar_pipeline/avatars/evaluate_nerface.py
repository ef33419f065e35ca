"""Evaluating a trained NeRFace avatar: test-frame latent codes, metrics, and renders.

Test-frame latent codes, by protocol (each number in the outputs names the protocol it came from):
- `optimised`: the network frozen, every test frame's latent code (and, with pose_correction, a small
  rigid correction of its tracked pose) is optimised against that frame with the RGB loss and the
  training's l2 prior, all test frames in one batch;
- `first_train_frame`: the latent code of the first training frame for every test frame (NeRFace's
  protocol, Gafni et al. 2021, Sec. 4.4).

Outputs (one staged folder): metrics_<protocol>.csv per frame, metrics.json (summary of every
protocol, the metric definitions, LPIPS/CSIM availability), test/ side-by-side PNGs (ground truth |
render | error) and test.mp4 for the headline protocol, orbit.mp4 (novel poses), sweep.mp4 (one
expression coefficient swept), reenact.mp4 (driven by another subject) when asked.
"""

from __future__ import annotations

import csv
import logging
import math
from pathlib import Path

import numpy as np
import torch

from .. import cache, metrics
from ..errors import InputError
from ..models.flame import axis_angle_to_matrix
from ..runtime import progress, torch_device
from ..stages.tracking import camera_to_head_gl
from ..video import VideoWriter
from .nerface import camera_rays
from .nerface_config import NeRFaceConfig
from .train_nerface import SubjectFrames, build_renderer, frame_conditions, read_tracking, render_image

log = logging.getLogger(__name__)


def load_trained(train_dir: Path, cfg: NeRFaceConfig, condition_dim: int, device: torch.device):
    """The renderer and training latent codes of a finished run; refuses a checkpoint of other settings."""
    path = train_dir / "checkpoint.pt"
    if not path.exists():
        raise InputError(str(path), "no trained checkpoint", "run the avatar_train rule of this avatar first")
    state = torch.load(path, map_location=device, weights_only=False)
    if state.get("config") != cfg.digest():
        raise InputError(
            str(path),
            "was trained with other settings than this avatar's current config",
            "rerun training (Snakemake does so when the settings change) or restore the settings",
        )
    renderer = build_renderer(cfg, condition_dim, device)
    renderer.load_state_dict(state["renderer"])
    latents = state["latents"]["weight"].to(device)
    for p in renderer.parameters():
        p.requires_grad_(False)
    return renderer.eval(), latents


def pose_corrected(camera_to_head: torch.Tensor, correction: torch.Tensor) -> torch.Tensor:
    """camera_to_head (T, 4, 4) moved by per-frame head-space corrections (T, 6): axis-angle, translation."""
    rotation = axis_angle_to_matrix(correction[:, :3])
    out = camera_to_head.clone()
    out[:, :3, :3] = rotation @ camera_to_head[:, :3, :3]
    out[:, :3, 3] = (rotation @ camera_to_head[:, :3, 3:])[..., 0] + correction[:, 3:]
    return out


def optimise_test_latents(renderer, test: SubjectFrames, cfg: NeRFaceConfig, init: torch.Tensor, device):
    """Per-frame latent codes (and pose corrections) fitted to the test frames with the network frozen."""
    count = len(test.frames)
    latents = init.expand(count, -1).clone().to(device).requires_grad_(True)
    correction = torch.zeros(count, 6, device=device, requires_grad=cfg.pose_correction)
    groups = [{"params": [latents]}]
    if cfg.pose_correction:  # a tenth of the step: radians and metres move the image far more than a latent unit
        groups.append({"params": [correction], "lr": 0.1 * cfg.latent_learning_rate})
    optimizer = torch.optim.Adam(groups, lr=cfg.latent_learning_rate)
    rng = np.random.default_rng(cfg.seed + 1)
    size = test.size
    bar = progress(range(cfg.latent_steps), cfg.latent_steps, "nerface: test latents", unit="step")
    for _ in bar:
        c2h = pose_corrected(test.camera_to_head.to(device), correction)
        origins, dirs, target, background, conditions, near, far = [], [], [], [], [], [], []
        for k in range(count):
            pixels = test.sample_pixels(k, cfg.latent_rays, cfg.head_fraction, rng)
            o, d = camera_rays(c2h[k], test.focal, size, pixels.to(device))
            t, b = test.colours(k, pixels)
            origins.append(o)
            dirs.append(d)
            target.append(t.to(device))
            background.append(b.to(device))
            conditions.append(torch.cat([test.conditions[k].to(device), latents[k]]).expand(len(d), -1))
            near.append(test.near[k].expand(len(d)).to(device))
            far.append(test.far[k].expand(len(d)).to(device))
        target = torch.cat(target)
        out = renderer(
            torch.cat(origins),
            torch.cat(dirs),
            torch.cat(near),
            torch.cat(far),
            torch.cat(conditions),
            torch.cat(background),
        )
        mse = ((out["fine"] - target) ** 2).mean()
        loss = ((out["coarse"] - target) ** 2).mean() + mse + cfg.latent_weight * (latents**2).sum(1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        bar.set_postfix(
            loss=f"{loss.item():.4f}", psnr=f"{-10 * math.log10(max(mse.item(), 1e-10)):.1f}", refresh=False
        )
    bar.close()
    return latents.detach(), pose_corrected(test.camera_to_head.to(device), correction.detach()).cpu()


def evaluate(
    store: cache.SubjectCache, cfg: NeRFaceConfig, train_dir: Path, out: Path, driver: cache.SubjectCache | None = None
) -> dict:
    """Everything in the module docstring, written into `out` (a staged folder the caller renames)."""
    device = torch_device()
    size = cfg.render_size
    test = SubjectFrames(store, size, "test", with_masks=True, scene_radius=cfg.scene_radius)
    # the training frames' cameras and conditions only
    train_data = SubjectFrames(store, size, "train", with_images=False, scene_radius=cfg.scene_radius)
    renderer, train_latents = load_trained(train_dir, cfg, test.conditions.shape[1], device)
    lpips_model = metrics.Lpips(str(device)) if cfg.lpips else None
    csim_model = metrics.Csim()
    for name, model in (("LPIPS", lpips_model), ("CSIM", csim_model)):
        if model is not None and not model.available:
            log.warning("%s unavailable: %s", name, model.reason)
    summary: dict = {
        "size": size,
        "test_frames": [int(i) for i in test.frames],
        "protocols": {},
        "headline_protocol": cfg.protocols[0],
        "metrics_doc": metrics.__doc__.strip(),
        "ms_ssim_scales": metrics.ms_ssim_scales(size),
        "lpips": "disabled in config" if lpips_model is None else lpips_model.reason,
        "lpips_available": bool(lpips_model and lpips_model.available),
        "csim": csim_model.reason,
        "csim_available": csim_model.available,
        "precision": renderer.precision,
        "device": str(device),
    }
    for protocol in cfg.protocols:
        cameras = test.camera_to_head
        if protocol == "optimised":
            latents, cameras = optimise_test_latents(renderer, test, cfg, train_latents[0], device)
        else:
            latents = train_latents[0].expand(len(test.frames), -1)
        rows, headline = [], protocol == cfg.protocols[0]
        folder = out / "test"
        folder.mkdir(exist_ok=True)
        video = VideoWriter(out / "test.mp4", 3 * size, size) if headline else None
        for k, frame in enumerate(progress(test.frames, len(test.frames), f"nerface: render test ({protocol})")):
            condition = torch.cat([test.conditions[k].to(device), latents[k]])
            image, _ = render_image(
                renderer,
                cameras[k],
                test.focal,
                size,
                condition,
                test.background,
                float(test.near[k]),
                float(test.far[k]),
            )
            render, truth = image.clamp(0, 1).numpy(), test.images[k].numpy()
            row = {
                "frame": int(frame),
                **metrics.frame_metrics(render, truth, test.head_masks[k], lpips_model, csim_model),
                "psnr_background_only": metrics.psnr(test.background.numpy(), truth),
            }
            rows.append(row)
            if headline:
                side = side_by_side(truth, render)
                if k < cfg.video_frames:
                    video.write(side)
                cache.write_png(folder / cache.frame_name(int(frame)), side)
        if video:
            video.close()
        with open(out / f"metrics_{protocol}.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        summary["protocols"][protocol] = {
            key: float(np.nanmean([r[key] for r in rows])) for key in rows[0] if key != "frame"
        }
        log.info(
            "nerface test (%s latents): PSNR %.2f dB, SSIM %.3f, L1 %.4f over %d frames",
            protocol,
            summary["protocols"][protocol]["psnr"],
            summary["protocols"][protocol]["ssim"],
            summary["protocols"][protocol]["l1"],
            len(rows),
        )
    neutral = torch.cat([train_data.conditions[0].to(device), train_latents[0]])
    if cfg.orbit_frames:
        render_orbit(out / "orbit.mp4", renderer, train_data, neutral, cfg)
    if cfg.sweep_frames:
        summary["sweep"] = render_sweep(out / "sweep.mp4", renderer, train_data, train_latents[0], cfg)
    if driver is not None and driver.subject == store.subject:
        log.info("reenact_from names this subject itself: no reenactment video for it")
    elif driver is not None:
        summary["reenactment"] = render_reenactment(
            out / "reenact.mp4", renderer, train_data, train_latents[0], driver, cfg
        )
    cache.write_json(out / "metrics.json", summary)
    return summary


def side_by_side(truth: np.ndarray, render: np.ndarray) -> np.ndarray:
    """ground truth | render | absolute error (x4, so small errors show), uint8."""
    error = np.clip(np.abs(render - truth).mean(-1, keepdims=True) * 4, 0, 1).repeat(3, -1)
    return (np.concatenate([truth, render, error], 1) * 255).round().astype(np.uint8)


def _write_video(path: Path, frames, size: int, total: int, desc: str) -> None:
    with VideoWriter(path, size, size) as video:
        for image in progress(frames, total, desc):
            video.write((image.clamp(0, 1).numpy() * 255).round().astype(np.uint8))


def render_orbit(path: Path, renderer, data: SubjectFrames, condition, cfg: NeRFaceConfig) -> None:
    """The first training frame's head turned left and right (yaw about the head's vertical axis)."""

    def frames():
        for i in range(cfg.orbit_frames):
            yaw = math.radians(cfg.orbit_degrees) * math.sin(2 * math.pi * i / cfg.orbit_frames)
            turn = torch.eye(4)
            turn[:3, :3] = axis_angle_to_matrix(torch.tensor([[0.0, yaw, 0.0]]))[0]
            image, _ = render_image(
                renderer,
                turn @ data.camera_to_head[0],
                data.focal,
                data.size,
                condition,
                data.background,
                float(data.near[0]),
                float(data.far[0]),
            )
            yield image

    _write_video(path, frames(), data.size, cfg.orbit_frames, "nerface: orbit")


def render_sweep(path: Path, renderer, data: SubjectFrames, latent, cfg: NeRFaceConfig) -> dict:
    """One expression coefficient swept over its training range, everything else as in the first training frame."""
    names = [str(n) for n in data.tracking["expression_names"]]
    name = cfg.sweep_expression if cfg.sweep_expression in names else names[0]
    if name != cfg.sweep_expression:
        log.warning(
            "expression %r is not in the %s model; sweeping %r instead",
            cfg.sweep_expression,
            str(data.tracking["model"]),
            name,
        )
    index = names.index(name)
    low, high = float(data.conditions[:, index].min()), float(data.conditions[:, index].max())

    def frames():
        for i in range(cfg.sweep_frames):
            condition = data.conditions[0].clone()
            condition[index] = low + (high - low) * 0.5 * (1 - math.cos(2 * math.pi * i / cfg.sweep_frames))
            image, _ = render_image(
                renderer,
                data.camera_to_head[0],
                data.focal,
                data.size,
                torch.cat([condition.to(latent.device), latent]),
                data.background,
                float(data.near[0]),
                float(data.far[0]),
            )
            yield image

    _write_video(path, frames(), data.size, cfg.sweep_frames, "nerface: expression sweep")
    return {"expression": name, "range": [low, high]}


def render_reenactment(
    path: Path, renderer, data: SubjectFrames, latent, driver: cache.SubjectCache, cfg: NeRFaceConfig
) -> dict:
    """This avatar driven by another subject's tracked expressions and head poses (same head model needed)."""
    own, theirs = data.tracking, read_tracking(driver)
    same = (
        str(own["model"]) == str(theirs["model"])
        and list(own["expression_names"]) == list(theirs["expression_names"])
        and str(own["model"]) != "builtin"
    )
    if not same:
        raise InputError(
            f"reenact_from: {driver.subject}",
            f"the two subjects were tracked with different expression spaces ({own['model']} vs "
            f"{theirs['model']}; the built-in model is fitted per subject)",
            "track both subjects with the same shared model (model.kind: ict or flame)",
        )
    frames = np.flatnonzero(theirs["fitted"])[: cfg.video_frames]
    conditions = frame_conditions(theirs, frames)
    cameras = torch.as_tensor(camera_to_head_gl(theirs["head_to_camera"][frames]), dtype=torch.float32)
    # keep this subject's camera distance so the head stays the avatar's size in the frame
    cameras[:, :3, 3] *= (data.camera_to_head[0, :3, 3].norm() / cameras[:, :3, 3].norm(dim=1))[:, None]

    def images():
        for k in range(len(frames)):
            image, _ = render_image(
                renderer,
                cameras[k],
                data.focal,
                data.size,
                torch.cat([conditions[k].to(latent.device), latent]),
                data.background,
                float(data.near[0]),
                float(data.far[0]),
            )
            yield image

    _write_video(path, images(), data.size, len(frames), f"nerface: reenactment by {driver.subject}")
    return {"driver": driver.subject, "frames": len(frames)}

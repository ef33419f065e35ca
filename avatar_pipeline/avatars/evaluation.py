"""Evaluating a trained avatar of any method: the metric protocol on the held-out frames, and the renders.

For each of the config's `protocols` (the first is the headline) the method conditions the test frames
its way (NeRFace: optimised or first-training-frame latent codes); every frame is rendered at
`render_size` and measured against the real frame in full and inside the parsing stage's head mask
(metrics.py documents each metric).

Outputs (one staged folder): metrics_<protocol>.csv per frame, metrics.json (summary of every
protocol, the metric definitions, LPIPS/CSIM availability), test/ side-by-side PNGs (ground truth |
render | error) and test.mp4 for the headline protocol, orbit.mp4 (novel poses), sweep.mp4 (one
expression coefficient swept), reenact.mp4 (driven by another subject) when asked, and whatever the
method exports beside them (e.g. meshes).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path

import numpy as np
import torch

from .. import cache, metrics
from ..errors import InputError
from ..geometry import camera_to_head_gl, turned_about_head
from ..runtime import progress, torch_device
from ..video import VideoWriter
from .base import AvatarConfig, AvatarModel, MethodSpec, View
from .data import SubjectFrames, frame_conditions
from .trainer import load_trained

log = logging.getLogger(__name__)


def evaluate(
    spec: MethodSpec,
    store: cache.SubjectCache,
    cfg: AvatarConfig,
    train_dir: Path,
    out: Path,
    driver: cache.SubjectCache | None = None,
) -> dict:
    """Everything in the module docstring, written into `out` (a staged folder the caller renames)."""
    device = torch_device()
    torch.manual_seed(cfg.seed + 1)  # test-time fitting draws samples: the same numbers on every run
    size = cfg.render_size
    test = SubjectFrames(store, size, "test", with_masks=True)
    # the training frames' cameras and conditions only
    train_data = SubjectFrames(store, size, "train", with_images=False)
    model = load_trained(spec, cfg, train_data, train_dir, device)
    unknown = [p for p in cfg.protocols if p not in model.protocols]
    if unknown:
        raise InputError(
            f"protocols: {unknown}",
            f"{spec.name} offers the test protocols {list(model.protocols)}",
            "pick among them in this avatar's section of config.yaml",
        )
    lpips_model = metrics.Lpips(str(device)) if cfg.lpips else None
    csim_model = metrics.Csim()
    for name, metric in (("LPIPS", lpips_model), ("CSIM", csim_model)):
        if metric is not None and not metric.available:
            log.warning("%s unavailable: %s", name, metric.reason)
    summary: dict = {
        "method": spec.name,
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
        "precision": model.precision,
        "device": str(device),
        "rendering": model.rendering_note(),
    }
    if summary["rendering"]:
        log.info("%s renders with %s", spec.name, summary["rendering"])
    headline_views: list[View] = []
    for protocol in cfg.protocols:
        views = model.test_views(protocol, test)
        rows, headline = [], protocol == cfg.protocols[0]
        if headline:
            headline_views = views
        folder = out / "test"
        folder.mkdir(exist_ok=True)
        video = VideoWriter(out / "test.mp4", 3 * size, size) if headline else None
        for k, view in enumerate(progress(views, len(views), f"{spec.name}: render test ({protocol})")):
            image, _ = model.render(view)
            render, truth = image.clamp(0, 1).numpy(), test.images[k].numpy()
            row = {
                "frame": view.frame,
                **metrics.frame_metrics(render, truth, test.head_masks[k], lpips_model, csim_model),
                "psnr_background_only": metrics.psnr(test.background.numpy(), truth),
            }
            rows.append(row)
            if headline:
                side = side_by_side(truth, render)
                if k < cfg.video_frames:
                    video.write(side)
                cache.write_png(folder / cache.frame_name(view.frame), side)
        if video:
            video.close()
        cache.write_frame_metrics(out / f"metrics_{protocol}.csv", rows)
        summary["protocols"][protocol] = {
            key: float(np.nanmean([r[key] for r in rows])) for key in rows[0] if key != "frame"
        }
        log.info(
            "%s test (%s): PSNR %.2f dB, SSIM %.3f, L1 %.4f over %d frames",
            spec.name,
            protocol,
            summary["protocols"][protocol]["psnr"],
            summary["protocols"][protocol]["ssim"],
            summary["protocols"][protocol]["l1"],
            len(rows),
        )
    neutral = model.view(train_data, 0)
    if cfg.orbit_frames:
        render_orbit(out / "orbit.mp4", model, neutral, cfg, spec.name)
    if cfg.sweep_frames:
        summary["sweep"] = render_sweep(out / "sweep.mp4", model, neutral, train_data, cfg, spec.name)
    if driver is not None and driver.subject == store.subject:
        log.info("reenact_from names this subject itself: no reenactment video for it")
    elif driver is not None:
        summary["reenactment"] = render_reenactment(
            out / "reenact.mp4", model, neutral, train_data, driver, cfg, spec.name
        )
    summary.update(model.exports(out, test, headline_views))
    cache.write_evaluation_summary(out, summary)
    return summary


def side_by_side(truth: np.ndarray, render: np.ndarray) -> np.ndarray:
    """ground truth | render | absolute error (x4, so small errors show), uint8."""
    error = np.clip(np.abs(render - truth).mean(-1, keepdims=True) * 4, 0, 1).repeat(3, -1)
    return (np.concatenate([truth, render, error], 1) * 255).round().astype(np.uint8)


def _write_video(path: Path, model: AvatarModel, views, size: int, total: int, desc: str) -> None:
    with VideoWriter(path, size, size) as video:
        for view in progress(views, total, desc):
            image, _ = model.render(view)
            video.write((image.clamp(0, 1).numpy() * 255).round().astype(np.uint8))


def render_orbit(path: Path, model: AvatarModel, neutral: View, cfg: AvatarConfig, name: str) -> None:
    """The first training frame's head turned left and right (yaw about the head's vertical axis)."""
    views = (
        dataclasses.replace(
            neutral,
            camera_to_head=turned_about_head(
                neutral.camera_to_head, math.radians(cfg.orbit_degrees) * math.sin(2 * math.pi * i / cfg.orbit_frames)
            ),
        )
        for i in range(cfg.orbit_frames)
    )
    _write_video(path, model, views, neutral.size, cfg.orbit_frames, f"{name}: orbit")


def render_sweep(
    path: Path, model: AvatarModel, neutral: View, data: SubjectFrames, cfg: AvatarConfig, name: str
) -> dict:
    """One expression coefficient swept over its training range, everything else as in the first training frame."""
    names = [str(n) for n in data.tracking["expression_names"]]
    expression = cfg.sweep_expression if cfg.sweep_expression in names else names[0]
    if expression != cfg.sweep_expression:
        log.warning(
            "expression %r is not in the %s model; sweeping %r instead",
            cfg.sweep_expression,
            str(data.tracking["model"]),
            expression,
        )
    index = names.index(expression)
    low, high = float(data.conditions[:, index].min()), float(data.conditions[:, index].max())

    def views():
        for i in range(cfg.sweep_frames):
            conditions = neutral.conditions.clone()
            conditions[index] = low + (high - low) * 0.5 * (1 - math.cos(2 * math.pi * i / cfg.sweep_frames))
            yield dataclasses.replace(neutral, conditions=conditions)

    _write_video(path, model, views(), neutral.size, cfg.sweep_frames, f"{name}: expression sweep")
    return {"expression": expression, "range": [low, high]}


def render_reenactment(
    path: Path,
    model: AvatarModel,
    neutral: View,
    data: SubjectFrames,
    driver: cache.SubjectCache,
    cfg: AvatarConfig,
    name: str,
) -> dict:
    """This avatar driven by another subject's tracked expressions and head poses (same head model needed)."""
    own, theirs = data.tracking, driver.tracking()
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
    cameras[:, :3, 3] *= (neutral.camera_to_head[:3, 3].norm() / cameras[:, :3, 3].norm(dim=1))[:, None]
    views = (
        dataclasses.replace(neutral, camera_to_head=cameras[k], conditions=conditions[k], frame=None)
        for k in range(len(frames))
    )
    _write_video(path, model, views, neutral.size, len(frames), f"{name}: reenactment by {driver.subject}")
    return {"driver": driver.subject, "frames": len(frames)}

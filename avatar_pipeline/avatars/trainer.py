"""The one training loop of every avatar method: phases with their own optimizers, fixed seeds, atomic
checkpoints that survive a kill, resume (refused, and set aside, when the settings changed), the time
budget, a progress bar with loss and PSNR, log.csv, validation renders, and clear stops on running out
of memory or on a loss that is no longer a number.

A time budget (`max_minutes`) is shared among the phases in proportion to their steps; a phase that
ends early leaves its time to the next. Each phase's learning rates decay over whichever of its steps
and its share of the budget runs out first, so a slower CPU still reaches the final rates.
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path

import numpy as np
import torch

from .. import cache
from ..errors import CacheError, InputError, PipelineError
from ..runtime import clock, cpu_info, matmul_gflops, progress, torch_device
from .base import AvatarConfig, AvatarModel, MethodSpec
from .data import SubjectFrames, psnr

log = logging.getLogger(__name__)


class TrainingDiverged(PipelineError):
    """A loss became NaN or infinite: training stops, the last good checkpoint stays."""


def build_model(spec: MethodSpec, cfg: AvatarConfig, train: SubjectFrames, device: torch.device) -> AvatarModel:
    return spec.model_class()(cfg, train, device)


def validation_frames(store: cache.SubjectCache, size: int, with_masks: bool = False) -> SubjectFrames:
    """The validation split, or without one the held-out test frames (as NeRFace shows at test time)."""
    try:
        return SubjectFrames(store, size, "val", with_masks=with_masks)
    except CacheError:
        return SubjectFrames(store, size, "test", with_masks=with_masks)


def train(spec: MethodSpec, store: cache.SubjectCache, cfg: AvatarConfig, out_dir: Path) -> dict:
    """Train (or resume) into out_dir: checkpoint.pt (atomic), log.csv, validation/, done.json when finished."""
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    device = torch_device()
    model = build_model(spec, cfg, SubjectFrames(store, cfg.size, **spec.model_class().training_data(cfg)), device)
    # the head mask comes from the parsing: a method that reads it gets the held-out PSNR inside the head too
    val = validation_frames(store, cfg.size, with_masks="parsing" in spec.needs)
    phases = model.phases()
    total_steps = sum(p.steps for p in phases)
    checkpoint = out_dir / "checkpoint.pt"
    position = {"step": 0, "phase": 0, "phase_step": 0, "phase_started": 0.0, "seconds": 0.0}
    if checkpoint.exists():
        state = torch.load(checkpoint, map_location=device, weights_only=False)
        if state.get("config") != cfg.digest():
            # the settings changed (that is why Snakemake reran this job): keep the old run aside, start afresh
            aside = out_dir / f"checkpoint-{state.get('config', 'unknown')}.pt"
            os.replace(checkpoint, aside)
            log.warning(
                "%s was trained with other settings; moved it to %s and training starts from step 0",
                checkpoint,
                aside.name,
            )
        else:
            model.load_state_dict(state["model"])
            for phase, optimizer_state in zip(phases, state["optimizers"]):
                phase.optimizer.load_state_dict(optimizer_state)
            model.load_extra_state(state["extra"])
            rng = state["rng"]
            torch.set_rng_state(state["torch_rng"])
            position = {k: state[k] for k in position}
            log.info(
                "resuming %s from step %d (phase %s)", checkpoint, position["step"], phases[position["phase"]].name
            )
    log.info(
        "%s: %d training frames at %d px on %s (%s); phases %s; %s",
        spec.name,
        len(model.train_frames.frames),
        cfg.size,
        device,
        model.precision,
        ", ".join(f"{p.name} {p.steps} steps" for p in phases),
        model.describe(),
    )
    budget = None if cfg.max_minutes is None else 60.0 * cfg.max_minutes
    # the end of each phase's share of the budget, in seconds of training
    deadlines = (
        None
        if budget is None
        else [budget * sum(p.steps for p in phases[: i + 1]) / total_steps for i in range(len(phases))]
    )
    started = time.perf_counter() - position["seconds"]

    def elapsed() -> float:
        return time.perf_counter() - started

    def save() -> None:
        cache_state = {
            "config": cfg.digest(),
            **{**position, "seconds": elapsed()},
            "model": model.state_dict(),
            "optimizers": [p.optimizer.state_dict() for p in phases],
            "extra": model.extra_state(),
            "rng": rng,
            "torch_rng": torch.get_rng_state(),
            "frames": model.train_frames.frames.tolist(),
        }
        tmp = checkpoint.with_suffix(".tmp")
        torch.save(cache_state, tmp)
        os.replace(tmp, checkpoint)

    log_path = out_dir / "log.csv"
    fields = cache.training_log_fields(model.loss_terms)
    log_file, writer = cache.open_training_log(log_path, fields, position["step"])
    stopped_early = False
    closing = None  # the phase whose closing validation (at its time budget) is done
    bar = progress(range(total_steps), total_steps, f"{spec.name}: train", unit="step", initial=position["step"])
    with log_file:
        while position["phase"] < len(phases):
            index = position["phase"]
            phase = phases[index]
            last_phase = index == len(phases) - 1
            decay = math.log(phase.final_ratio)
            bar.set_description(f"{spec.name}: train ({phase.name})" if len(phases) > 1 else f"{spec.name}: train")
            while position["phase_step"] < phase.steps:
                step = position["step"]
                spent = 0.0
                if deadlines is not None:
                    window = max(1e-9, deadlines[index] - position["phase_started"])
                    spent = (elapsed() - position["phase_started"]) / window
                if spent > 1.0:
                    log.info(
                        "%s: the time budget of phase %s (%.1f of %.1f min) ended at its step %d of %d",
                        spec.name,
                        phase.name,
                        deadlines[index] / 60,
                        cfg.max_minutes,
                        position["phase_step"],
                        phase.steps,
                    )
                    stopped_early = True
                    break
                # the decay follows whichever runs out first, the phase's steps or its share of the budget
                done = max(position["phase_step"] / max(1, phase.steps - 1), spent)
                phase.progress = done
                factor = math.exp(decay * done)
                for group in phase.optimizer.param_groups:
                    group["lr"] = group.setdefault("initial_lr", group["lr"]) * factor
                try:
                    terms, step_psnr = model.training_step(phase, rng)
                    loss = sum(terms[name] for name in model.loss_terms if name in terms)
                    if not torch.isfinite(loss):
                        raise TrainingDiverged(
                            f"{spec.name}: the loss became {loss.item()} at step {step + 1} (phase {phase.name}, its "
                            f"step {position['phase_step'] + 1}); terms: "
                            + ", ".join(f"{k} {v.item():.4g}" for k, v in terms.items())
                            + f". Training stopped; {checkpoint} keeps the last good state. Lower this phase's "
                            "learning rates (or change `seed`) and rerun"
                        )
                    phase.optimizer.zero_grad()
                    loss.backward()
                except RuntimeError as e:
                    if is_out_of_memory(e):
                        raise InputError(
                            "avatar settings",
                            f"training ran out of memory in phase {phase.name} on {device}",
                            model.memory_hint(),
                        ) from e
                    raise
                phase.optimizer.step()
                position["step"] += 1
                position["phase_step"] += 1
                val_psnr = val_head_psnr = ""
                # the phase's last step validates: its last step, or the first step that ends within a second
                # of its share of the budget (once: fast steps put several in that second)
                phase_ends = position["phase_step"] == phase.steps
                if deadlines is not None and elapsed() > deadlines[index] - 1.0 and closing != index:
                    phase_ends, closing = True, index
                if position["step"] % cfg.validate_every == 0 or phase_ends:
                    whole, head = validate(model, val, out_dir / "validation", position["step"])
                    val_psnr, val_head_psnr = f"{whole:.3f}", "" if head is None else f"{head:.3f}"
                lr = phase.optimizer.param_groups[0]["lr"]
                writer.writerow(
                    [
                        position["step"],
                        phase.name,
                        f"{loss.item():.6f}",
                        f"{step_psnr:.3f}",
                        f"{lr:.3g}",
                        f"{elapsed():.2f}",
                        val_psnr,
                        val_head_psnr,
                    ]
                    + [f"{terms[name].item():.6f}" if name in terms else "" for name in model.loss_terms]
                )
                left = {} if budget is None else {"budget": clock(budget - elapsed())}
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.4f}", psnr=f"{step_psnr:.1f}", **left, refresh=False)
                if position["step"] % cfg.checkpoint_every == 0 or (
                    last_phase and position["phase_step"] == phase.steps
                ):
                    log_file.flush()  # the log never lags behind a checkpoint
                    save()
            if last_phase:
                if stopped_early:
                    log_file.flush()
                    save()
                break
            position.update(phase=index + 1, phase_step=0, phase_started=elapsed())
            log_file.flush()
            save()
        bar.close()
    rows = cache.read_training_log(log_path)
    summary = {
        "method": spec.name,
        "steps": int(rows[-1]["step"]) if rows else 0,
        "planned_steps": total_steps,
        "stopped_by_time_budget": stopped_early,
        "phases": {
            p.name: {"planned_steps": p.steps, "steps": sum(1 for r in rows if r["phase"] == p.name)} for p in phases
        },
        "frames": len(model.train_frames.frames),
        "size": cfg.size,
        "device": str(device),
        "cpu": cpu_info()["model"],
        # beside the wall time: the same settings take 2x longer on some of these machines than others
        "matmul_gflops": None
        if device.type != "cpu"
        else round(matmul_gflops(torch.bfloat16 if model.precision == "bf16" else torch.float32), 1),
        "precision": model.precision,
        "seconds": float(rows[-1]["seconds"]) if rows else 0.0,
        # the last 100 steps that rendered colours (a geometry-only phase logs none)
        "final_train_psnr": _recent_mean([float(r["psnr"]) for r in rows if r["psnr"] not in ("", "nan")]),
        "settings": cfg.training_settings(),
    }
    cache.write_training_summary(out_dir, summary)
    return summary


def _recent_mean(values: list[float], count: int = 100) -> float | None:
    return float(np.mean(values[-count:])) if values else None


def load_trained(spec: MethodSpec, cfg: AvatarConfig, train: SubjectFrames, train_dir: Path, device) -> AvatarModel:
    """The model of a finished run, frozen; refuses a checkpoint of other settings."""
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
    model = build_model(spec, cfg, train, device)
    model.load_state_dict(state["model"])
    model.load_extra_state(state["extra"])
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


@torch.no_grad()
def validate(model: AvatarModel, val: SubjectFrames, folder: Path, step: int) -> tuple[float, float | None]:
    """Render the first validation frame as the model renders without test-time fitting: ground truth | render.
    Its PSNR over the frame and inside the head mask (None without masks)."""
    model.eval()
    image, _ = model.render(model.view(val, 0))
    model.train()
    folder.mkdir(exist_ok=True)
    side = torch.cat([val.images[0], image.clamp(0, 1)], 1)
    cache.write_png(folder / f"step_{step:07d}.png", (side.numpy() * 255).round().astype(np.uint8))
    squared = ((image - val.images[0]) ** 2).mean(-1)
    head = None if val.head_masks is None else psnr(float(squared[torch.as_tensor(val.head_masks[0])].mean()))
    return psnr(float(squared.mean())), head


def is_out_of_memory(error: RuntimeError) -> bool:
    text = str(error).lower()
    return "out of memory" in text or "can't allocate memory" in text or "not enough memory" in text

"""Training a NeRFace avatar from a subject's cache (frames, background, tracking): checkpoints that
survive a kill, fixed seeds, a progress bar with loss and PSNR, a CSV log, validation renders.

Per the paper: per-frame learnable latent codes (32-d) regularised with an l2 penalty (weight 0.05),
Adam, rays sampled 95% inside the head's bounding box, the loss on both coarse and fine colours.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from .. import cache
from ..errors import CacheError, InputError
from ..runtime import clock, cpu_info, matmul_gflops, progress, torch_device
from ..stages.tracking import camera_to_head_gl
from .nerface import NeRFaceRenderer, camera_rays
from .nerface_config import NeRFaceConfig

log = logging.getLogger(__name__)

LOG_FIELDS = ["step", "loss", "psnr_fine", "learning_rate", "seconds", "val_psnr"]
# rendering: rays whose coarse foreground alpha is below this show the background; the fine pass skips them
SKIP_EMPTY = 1e-4


def frame_conditions(data: dict, frames: np.ndarray) -> torch.Tensor:
    """What the field is conditioned on besides the latent code: the expression coefficients, plus the jaw
    rotation for models whose jaw is a joint (FLAME)."""
    parts = [data["expression"][frames]]
    if "joint_rotations" in data:
        parts.append(data["joint_rotations"][frames].reshape(len(frames), -1))
    return torch.as_tensor(np.concatenate(parts, 1), dtype=torch.float32)


def read_tracking(store: cache.SubjectCache) -> dict:
    return cache.read_npz(
        store.stage_dir("tracking") / "tracking.npz",
        "tracking",
        ("head_to_camera", "expression", "focal", "fitted", "image_size", "expression_names", "model"),
    )


class SubjectFrames:
    """One split of a subject at a given resolution: images, background, cameras, conditions, head boxes."""

    def __init__(
        self,
        store: cache.SubjectCache,
        size: int,
        split: str = "train",
        with_masks: bool = False,
        with_images: bool = True,
        scene_radius: float = NeRFaceConfig.scene_radius,
        with_mattes: bool = False,
    ):
        data = read_tracking(store)
        self.tracking = data
        crop_size = int(data["image_size"])
        splits = store.split()
        frames = [i for i in splits[split] if data["fitted"][i]]
        if not frames:
            raise CacheError(
                store.stage_dir("tracking") / "tracking.npz",
                f"no successfully tracked frame in the {split} split",
                "tracking",
            )
        minimum = splits.get("minimums", {}).get(split, 1)
        if len(frames) < minimum:
            raise InputError(
                f"subject {store.subject}",
                f"only {len(frames)} of the {len(splits[split])} {split} "
                f"frames were tracked; an avatar needs at least {minimum}",
                "see the tracking log and overlay for the frames that failed; use a longer clip or "
                f"lower crop.min_{split}_frames",
            )
        self.frames = np.array(frames)
        self.size, self.focal = size, float(data["focal"]) * size / crop_size
        self.images = torch.stack([_load_rgb(store.read_frame(i), size) for i in frames]) if with_images else None
        background = store.read_background()
        if background.shape[:2] != (crop_size, crop_size):
            raise InputError(
                str(store.stage_dir("background") / "background.png"),
                f"is {background.shape[1]}x{background.shape[0]} but the frames are {crop_size}x{crop_size}",
                "rerun the background rule (or give a background plate of the video's size)",
            )
        self.background = _load_rgb(background, size)
        self.camera_to_head = torch.as_tensor(
            camera_to_head_gl(data["head_to_camera"][self.frames]), dtype=torch.float32
        )
        self.conditions = frame_conditions(data, self.frames)
        meta = cache.read_json(store.stage_dir("tracking") / "nerface" / f"transforms_{split}.json", "tracking")
        boxes = {f["frame_index"]: f["bbox"] for f in meta["frames"]}
        self.boxes = np.array([boxes[i] for i in frames]) * size  # y0, y1, x0, x1 in pixels
        distance = self.camera_to_head[:, :3, 3].norm(dim=1)
        self.near, self.far = (distance - scene_radius).clamp_min(0.05), distance + scene_radius
        # the parsing stage's soft person mattes, what the rendered foreground alpha is compared with
        self.mattes = torch.stack([_resized(store.read_matte(i), size) for i in frames]) if with_mattes else None
        self.head_masks = None
        if with_masks:
            from ..stages.parsing import CLASS_ID

            not_head = [CLASS_ID["background"], CLASS_ID["cloth"]]
            masks = [~np.isin(store.read_labels(i), not_head) for i in frames]
            self.head_masks = np.stack(
                [cv2.resize(m.astype(np.uint8), (size, size), interpolation=cv2.INTER_NEAREST) > 0 for m in masks]
            )

    def sample_pixels(self, k: int, count: int, head_fraction: float, rng: np.random.Generator) -> torch.Tensor:
        """`count` pixels (x, y) of frame k, `head_fraction` of them inside the head box."""
        n_head = int(round(count * head_fraction))
        y0, y1, x0, x1 = self.boxes[k]
        head = np.stack([rng.uniform(x0, max(x0 + 1, x1), n_head), rng.uniform(y0, max(y0 + 1, y1), n_head)], 1)
        anywhere = rng.uniform(0, self.size, (count - n_head, 2))
        return torch.as_tensor(np.floor(np.concatenate([head, anywhere])).clip(0, self.size - 1), dtype=torch.float32)

    def colours(self, k: int, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Frame k's and the background's colours at the pixels."""
        return _at_pixels(self.images[k], pixels), _at_pixels(self.background, pixels)

    def sample(
        self, k: int, count: int, head_fraction: float, rng: np.random.Generator, errors: "ErrorMap | None" = None
    ):
        """Rays through sampled pixels of frame k, their pixels, colours, the background behind them and the
        person matte there (None without mattes). With an error map, its share of the head rays follows it."""
        pixels = self.sample_pixels(k, count, head_fraction, rng)
        if errors is not None:
            guided = int(round(count * head_fraction * errors.share))
            pixels[:guided] = errors.sample(k, self.boxes[k], guided, rng)
        origins, dirs = camera_rays(self.camera_to_head[k], self.focal, self.size, pixels)
        matte = None if self.mattes is None else _at_pixels(self.mattes[k], pixels)
        return (pixels, origins, dirs) + self.colours(k, pixels) + (matte,)


class ErrorMap:
    """A running estimate of every training frame's squared colour error on a grid of cells, from which a
    share of each step's head rays is drawn (cells in proportion to their error, uniformly within a cell):
    the rays go where the avatar is still wrong (eyes, teeth, hair edges) instead of evenly over the box.

    Cells start at an error of 1 (above any real one), so every cell is visited before the map is trusted."""

    CELL = 8  # pixels
    RATE = 0.3  # weight of a new measurement in a cell's running error

    def __init__(self, frames: int, size: int, share: float):
        self.cells, self.share = -(-size // self.CELL), share
        self.size = size
        self.error = np.ones((frames, self.cells, self.cells))

    def sample(self, k: int, box: np.ndarray, count: int, rng: np.random.Generator) -> torch.Tensor:
        """`count` pixels (x, y) of frame k inside the cells that overlap its head box (y0, y1, x0, x1)."""
        y0, y1, x0, x1 = np.clip((np.asarray(box) // self.CELL).astype(int), 0, self.cells - 1)
        errors = self.error[k, y0 : y1 + 1, x0 : x1 + 1]
        chosen = rng.choice(errors.size, count, p=(errors / errors.sum()).ravel())
        cy, cx = np.unravel_index(chosen, errors.shape)
        corner = np.stack([cx + x0, cy + y0], 1) * self.CELL
        pixels = np.floor(corner + rng.uniform(0, self.CELL, (count, 2))).clip(0, self.size - 1)
        return torch.as_tensor(pixels, dtype=torch.float32)

    def update(self, k: int, pixels: torch.Tensor, squared_error: torch.Tensor) -> None:
        """Blend the mean squared error of the rays that fell in each cell into that cell's estimate."""
        index = pixels.numpy().astype(int) // self.CELL
        flat = index[:, 1] * self.cells + index[:, 0]
        sums = np.bincount(flat, squared_error.numpy().astype(np.float64), self.cells**2)
        counts = np.bincount(flat, minlength=self.cells**2)
        seen = counts > 0
        grid = self.error[k].reshape(-1)
        grid[seen] += self.RATE * (sums[seen] / counts[seen] - grid[seen])


def _at_pixels(image: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
    """The image's values at the pixels (N, 2) (x, y)."""
    return image[pixels[:, 1].long(), pixels[:, 0].long()]


def _resized(image: np.ndarray, size: int) -> torch.Tensor:
    if image.shape[:2] != (size, size):
        image = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)
    return torch.as_tensor(image, dtype=torch.float32)


def _load_rgb(image: np.ndarray, size: int) -> torch.Tensor:
    return _resized(image, size) / 255


def psnr(mse: float) -> float:
    return -10.0 * math.log10(max(mse, 1e-10))


def build_renderer(cfg: NeRFaceConfig, condition_dim: int, device: torch.device) -> NeRFaceRenderer:
    renderer = NeRFaceRenderer(
        cfg.field(condition_dim),
        cfg.coarse_samples,
        cfg.fine_samples,
        cfg.resolved_precision(device),
        cfg.chunk_samples,
    )
    return renderer.to(device)


def train(store: cache.SubjectCache, cfg: NeRFaceConfig, out_dir: Path) -> dict:
    """Train (or resume) into out_dir: checkpoint.pt (atomic), log.csv, validation/, done.json when finished."""
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    device = torch_device()
    data = SubjectFrames(store, cfg.size, scene_radius=cfg.scene_radius, with_mattes=cfg.mask_weight > 0)
    try:
        val = SubjectFrames(store, cfg.size, "val", scene_radius=cfg.scene_radius)
    except CacheError:  # no validation split: show the first held-out test frame, as NeRFace does at test time
        val = SubjectFrames(store, cfg.size, "test", scene_radius=cfg.scene_radius)
    renderer = build_renderer(cfg, data.conditions.shape[1], device)
    latents = torch.nn.Embedding(len(data.frames), cfg.latent_dim).to(device)
    torch.nn.init.zeros_(latents.weight)
    errors = ErrorMap(len(data.frames), cfg.size, cfg.error_sampling) if cfg.error_sampling > 0 else None
    optimizer = torch.optim.Adam(list(renderer.parameters()) + list(latents.parameters()), lr=cfg.learning_rate)
    checkpoint, step, seconds = out_dir / "checkpoint.pt", 0, 0.0
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
            renderer.load_state_dict(state["renderer"])
            latents.load_state_dict(state["latents"])
            optimizer.load_state_dict(state["optimizer"])
            rng = state["rng"]
            torch.set_rng_state(state["torch_rng"])
            step, seconds = state["step"], state.get("seconds", 0.0)
            if errors is not None:
                errors.error = state["error_map"]
            log.info("resuming %s from step %d", checkpoint, step)
    log.info(
        "nerface: %d training frames at %d px on %s (%s), %d rays x (%d + %d) samples, %d steps",
        len(data.frames),
        cfg.size,
        device,
        renderer.precision,
        cfg.rays,
        cfg.coarse_samples,
        cfg.fine_samples,
        cfg.steps,
    )

    def checkpoint_state(done_steps: int) -> dict:
        return {
            "config": cfg.digest(),
            "step": done_steps,
            "renderer": renderer.state_dict(),
            "latents": latents.state_dict(),
            "optimizer": optimizer.state_dict(),
            "rng": rng,
            "torch_rng": torch.get_rng_state(),
            "seconds": time.perf_counter() - started,
            "condition_dim": data.conditions.shape[1],
            "frames": data.frames.tolist(),
            "error_map": None if errors is None else errors.error,
        }

    log_path = out_dir / "log.csv"
    _truncate_log(log_path, step)
    decay = math.log(cfg.final_learning_rate / cfg.learning_rate)
    with open(log_path, "a", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        if step == 0:
            writer.writerow(LOG_FIELDS)
        bar = progress(range(step, cfg.steps), cfg.steps - step, "nerface: train", unit="step")
        started = time.perf_counter() - seconds
        stopped_early = False
        for step in bar:
            budget_spent = 0.0 if cfg.max_minutes is None else (time.perf_counter() - started) / (60 * cfg.max_minutes)
            if budget_spent > 1.0:
                log.info("nerface: time budget of %.1f min reached at step %d of %d", cfg.max_minutes, step, cfg.steps)
                stopped_early = True
                f.flush()  # the log never lags behind a checkpoint
                save_checkpoint(checkpoint, checkpoint_state(step))
                break
            # the decay follows whichever runs out first, the steps or the time budget, so a slower CPU
            # still ends its budget at the final learning rate instead of stopping mid-schedule
            done = max(step / max(1, cfg.steps - 1), budget_spent)
            lr = cfg.learning_rate * math.exp(decay * done)
            for group in optimizer.param_groups:
                group["lr"] = lr
            k = int(rng.integers(len(data.frames)))
            pixels, *rays = data.sample(k, cfg.rays, cfg.head_fraction, rng, errors)
            origins, dirs, target, background, matte = (None if t is None else t.to(device) for t in rays)
            condition = torch.cat([data.conditions[k].to(device), latents.weight[k]])
            near = data.near[k].expand(len(origins)).to(device)
            far = data.far[k].expand(len(origins)).to(device)
            try:
                out = renderer(origins, dirs, near, far, condition, background)
                mse_fine = ((out["fine"] - target) ** 2).mean()
                loss = (
                    ((out["coarse"] - target) ** 2).mean()
                    + mse_fine
                    + cfg.latent_weight * (latents.weight[k] ** 2).sum()
                )
                if matte is not None:
                    loss = loss + cfg.mask_weight * (
                        ((out["coarse_alpha"] - matte) ** 2).mean() + ((out["fine_alpha"] - matte) ** 2).mean()
                    )
                optimizer.zero_grad()
                loss.backward()
                if errors is not None:
                    errors.update(k, pixels, ((out["fine"].detach() - target) ** 2).mean(-1).cpu())
            except RuntimeError as e:
                if is_out_of_memory(e):
                    raise InputError(
                        "avatar settings",
                        f"training ran out of memory with {cfg.rays} rays x "
                        f"{cfg.coarse_samples + cfg.fine_samples} samples per step on {device}",
                        "lower `rays` (or the network width) of this avatar in config.yaml",
                    ) from e
                raise
            optimizer.step()
            val_psnr = ""
            if (step + 1) % cfg.validate_every == 0 or step + 1 == cfg.steps or _budget_ends(cfg, started):
                val_psnr = f"{validate(renderer, val, data, latents, out_dir / 'validation', step + 1, device):.3f}"
            writer.writerow(
                [
                    step + 1,
                    f"{loss.item():.6f}",
                    f"{psnr(mse_fine.item()):.3f}",
                    f"{lr:.3g}",
                    f"{time.perf_counter() - started:.2f}",
                    val_psnr,
                ]
            )
            budget = (
                {}
                if cfg.max_minutes is None
                else {"budget": clock(60 * cfg.max_minutes - (time.perf_counter() - started))}
            )  # time left of it
            bar.set_postfix(loss=f"{loss.item():.4f}", psnr=f"{psnr(mse_fine.item()):.1f}", **budget, refresh=False)
            if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
                f.flush()
                save_checkpoint(checkpoint, checkpoint_state(step + 1))
        bar.close()
    rows = _read_log(log_path)
    summary = {
        "method": "nerface",
        "steps": int(rows[-1]["step"]) if rows else 0,
        "planned_steps": cfg.steps,
        "stopped_by_time_budget": stopped_early,
        "frames": len(data.frames),
        "size": cfg.size,
        "device": str(device),
        "cpu": cpu_info()["model"],
        # beside the wall time: the same settings take 2x longer on some of these machines than others
        "matmul_gflops": None
        if device.type != "cpu"
        else round(matmul_gflops(torch.bfloat16 if renderer.precision == "bf16" else torch.float32), 1),
        "precision": renderer.precision,
        "seconds": float(rows[-1]["seconds"]) if rows else 0.0,
        "final_train_psnr": float(np.mean([float(r["psnr_fine"]) for r in rows[-100:]])) if rows else None,
        "settings": cfg.training_settings(),
    }
    cache.write_json(out_dir / "done.json", summary)
    return summary


def _budget_ends(cfg: NeRFaceConfig, started: float) -> bool:
    """Whether the time budget runs out before another step (so the last model gets a validation render)."""
    return cfg.max_minutes is not None and time.perf_counter() - started > 60 * cfg.max_minutes - 1.0


def is_out_of_memory(error: RuntimeError) -> bool:
    text = str(error).lower()
    return "out of memory" in text or "can't allocate memory" in text or "not enough memory" in text


def _read_log(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _truncate_log(path: Path, step: int) -> None:
    """Keep the log rows up to the checkpoint's step: a killed run may have logged steps past it, or
    half a row (rows reach the disk in buffer-sized pieces)."""
    if step == 0 or not path.exists():
        path.unlink(missing_ok=True)
        return
    kept = []
    for row in _read_log(path):
        try:
            complete = int(row["step"]) == len(kept) + 1 and row.get("val_psnr") is not None
        except (TypeError, ValueError):
            complete = False
        if not complete or int(row["step"]) > step:
            break
        kept.append(row)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=LOG_FIELDS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(kept)


def save_checkpoint(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


@torch.no_grad()
def validate(renderer, val: SubjectFrames, data: SubjectFrames, latents, folder: Path, step: int, device) -> float:
    """Render the first validation frame with the first training frame's latent code: ground truth | render."""
    renderer.eval()
    condition = torch.cat([val.conditions[0], latents.weight[0].cpu()]).to(device)
    image, _ = render_image(
        renderer,
        val.camera_to_head[0],
        val.focal,
        val.size,
        condition,
        val.background,
        float(val.near[0]),
        float(val.far[0]),
    )
    renderer.train()
    folder.mkdir(exist_ok=True)
    side = torch.cat([val.images[0], image.clamp(0, 1)], 1)
    cache.write_png(folder / f"step_{step:07d}.png", (side.numpy() * 255).round().astype(np.uint8))
    return psnr(float(((image - val.images[0]) ** 2).mean()))


@torch.no_grad()
def render_image(
    renderer: NeRFaceRenderer,
    camera_to_head: torch.Tensor,
    focal: float,
    size: int,
    condition: torch.Tensor,
    background: torch.Tensor,
    near: float,
    far: float,
    rays_per_call: int = 8192,
):
    """Full image (size, size, 3) and foreground alpha (size, size), on the CPU. Running out of memory
    halves the rays per call (and the renderer's sample chunk) and tries again."""
    device = next(renderer.parameters()).device
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    pixels = torch.stack([xs.flatten(), ys.flatten()], 1).float()
    origins, dirs = camera_rays(camera_to_head, focal, size, pixels)
    bg = background.reshape(-1, 3)
    colour, alpha = [], []
    a = 0
    while a < len(pixels):
        sl = slice(a, a + rays_per_call)
        n = len(pixels[sl])
        try:
            out = renderer(
                origins[sl].to(device),
                dirs[sl].to(device),
                torch.full((n,), near, device=device),
                torch.full((n,), far, device=device),
                condition.to(device),
                bg[sl].to(device),
                jitter=False,
                skip_empty=SKIP_EMPTY,
            )
        except RuntimeError as e:
            if not is_out_of_memory(e) or rays_per_call <= 64:
                raise
            rays_per_call //= 2
            renderer.chunk_samples = max(256, renderer.chunk_samples // 2)
            log.warning(
                "rendering ran out of memory: retrying with %d rays per call and %d samples per chunk",
                rays_per_call,
                renderer.chunk_samples,
            )
            continue
        colour.append(out["fine"].cpu())
        alpha.append(out["fine_alpha"].cpu())
        a += n
    return torch.cat(colour).reshape(size, size, 3), torch.cat(alpha).reshape(size, size)

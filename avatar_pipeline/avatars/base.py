"""What every avatar method is made of, and what it supplies to the shared trainer and evaluation.

A method registers a MethodSpec: its name and description, its typed config (an AvatarConfig subclass)
with presets, the caches it reads, the definition of its section in the config schema, and its model
class. The model class (an AvatarModel) supplies the method's parts only: its parameters and phases,
one training step's named losses, how it renders a view, and how it conditions a held-out frame under
each of its test protocols. Seeds, checkpoints, resume, the time budget, logs, validation renders,
metrics and every video are the core's (trainer.py, evaluation.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
from typing import Any, ClassVar

import numpy as np
import torch

from ..runtime import cpu_info

# bumped when the checkpoint layout changes: a checkpoint of another layout is set aside, not resumed
CHECKPOINT_FORMAT = 2


@dataclasses.dataclass(frozen=True)
class AvatarConfig:
    """Keys every method has. A method's config adds its own; `evaluation_keys` (here and in the subclass)
    only change the evaluation, `resumable_keys` may change without invalidating a checkpoint."""

    size: int = 512
    steps: int = 1000
    seed: int = 0
    checkpoint_every: int = 1000
    validate_every: int = 5000
    max_minutes: float | None = None  # stop training early at this wall time (a budget, e.g. for benchmarks)
    precision: str = "auto"
    # evaluation
    protocols: tuple[str, ...] = ()
    eval_size: int | None = None
    orbit_frames: int = 36
    orbit_degrees: float = 25.0
    sweep_frames: int = 24
    sweep_expression: str = "jawOpen"
    reenact_from: str | None = None
    video_frames: int = 200
    lpips: bool = True

    EVALUATION_KEYS: ClassVar[tuple[str, ...]] = (
        "protocols",
        "eval_size",
        "orbit_frames",
        "orbit_degrees",
        "sweep_frames",
        "sweep_expression",
        "reenact_from",
        "video_frames",
        "lpips",
    )
    RESUMABLE_KEYS: ClassVar[tuple[str, ...]] = (
        "steps",
        "checkpoint_every",
        "validate_every",
        "precision",
        "max_minutes",
    )
    evaluation_keys: ClassVar[tuple[str, ...]] = ()  # the method's own
    resumable_keys: ClassVar[tuple[str, ...]] = ()
    # training settings added after checkpoints existed, each with the value that trains exactly as before
    # it: at that value a key stays out of the digest, so the checkpoints trained before it remain valid
    added_keys: ClassVar[dict[str, object]] = {}

    def training_settings(self) -> dict:
        """The keys that change the trained model (the rest only change the evaluation)."""
        skip = set(self.EVALUATION_KEYS) | set(self.evaluation_keys)
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in skip}

    def digest(self) -> str:
        """What a checkpoint must match to be resumed: the training settings but the step budget and the
        bookkeeping (so raising `steps` continues a finished run), and the checkpoint layout."""
        d = self.training_settings()
        for key in self.RESUMABLE_KEYS + self.resumable_keys:
            d.pop(key)
        for key, before in self.added_keys.items():
            if d[key] == before:
                d.pop(key)
        d["checkpoint_format"] = CHECKPOINT_FORMAT
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    def resolved_precision(self, device: torch.device) -> str:
        """`auto`: bf16 matrix products on a CPU with native bf16 (AVX512-BF16 or AMX), fp32 elsewhere."""
        if self.precision != "auto":
            return self.precision
        return "bf16" if device.type == "cpu" and cpu_info()["native_bf16"] else "fp32"

    @property
    def render_size(self) -> int:
        return self.eval_size or self.size


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    name: str
    description: str
    config: type  # an AvatarConfig subclass
    presets: dict[str, dict]  # preset name -> values; a section's own keys override its preset's
    default_preset: str
    needs: tuple[str, ...]  # the subject's caches training reads (stage names); the rule's inputs
    schema: str  # its definition in config.schema.yaml (the `avatar` dispatch points there)
    model: str  # "module:Class" of its AvatarModel, imported when a run needs it
    smoke_settings: dict  # a run of seconds on a 128 px clip: what the contract test trains

    def config_from(self, section: dict) -> AvatarConfig:
        """Typed config from a validated avatar section: its preset, then its explicit keys."""
        values = dict(self.presets[section.get("preset", self.default_preset)])
        values.update({k: v for k, v in section.items() if k not in ("method", "preset")})
        fields = {f.name: f for f in dataclasses.fields(self.config)}
        for key, value in values.items():  # lists in YAML, tuples in the frozen config
            if isinstance(value, list) and key in fields:
                values[key] = tuple(value)
        return self.config(**values)

    @property
    def model_module(self) -> str:
        return self.model.split(":")[0]

    def model_class(self) -> type["AvatarModel"]:
        module, name = self.model.split(":")
        return getattr(importlib.import_module(module), name)


@dataclasses.dataclass
class View:
    """One image to render: a camera, the frame's tracked conditions and the method's own per-frame code."""

    camera_to_head: torch.Tensor  # (4, 4), OpenGL convention (geometry.py)
    focal: float  # pixels
    size: int
    conditions: torch.Tensor  # (C,) expression coefficients (and joint rotations where the model has them)
    background: torch.Tensor  # (size, size, 3) in [0, 1]
    code: torch.Tensor | None = None  # e.g. NeRFace's latent code
    frame: int | None = None  # the subject's frame index, when it is one


@dataclasses.dataclass
class Phase:
    """A stretch of training with its own optimizer: NeRFace has one, NHA three (geometry, texture, joint).
    Each parameter group's learning rate decays exponentially from its initial value to `final_ratio` of it
    over the phase (1.0: constant)."""

    name: str
    steps: int
    optimizer: torch.optim.Optimizer | CombinedOptimizer
    final_ratio: float = 1.0
    progress: float = 0.0  # share of the phase done (of its steps or its time), set by the trainer each step


class CombinedOptimizer:
    """Several optimizers stepped as one (a phase may fit per-frame parameters by SGD and networks by Adam)."""

    def __init__(self, *optimizers: torch.optim.Optimizer):
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict]:
        return [group for optimizer in self.optimizers for group in optimizer.param_groups]

    def zero_grad(self) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad()

    def step(self) -> None:
        for optimizer in self.optimizers:
            optimizer.step()

    def state_dict(self) -> list[dict]:
        return [optimizer.state_dict() for optimizer in self.optimizers]

    def load_state_dict(self, states: list[dict]) -> None:
        for optimizer, state in zip(self.optimizers, states):
            optimizer.load_state_dict(state)


class AvatarModel(torch.nn.Module):
    """The parts a method supplies. Built from its config, the subject's training frames and the device;
    its state_dict and extra_state() are what a checkpoint keeps."""

    loss_terms: ClassVar[tuple[str, ...]] = ()  # names of the losses training_step returns, in this order
    # the test-frame conditionings it offers (the config's `protocols` picks among them)
    protocols: ClassVar[tuple[str, ...]] = ()
    precision: str = "fp32"
    train_frames: Any  # the SubjectFrames it was built from

    @classmethod
    def training_data(cls, cfg: AvatarConfig) -> dict:
        """What training loads beside the images (SubjectFrames keyword arguments, e.g. with_mattes)."""
        return {}

    def describe(self) -> str:
        """One line for the training log: what a step does."""
        return ""

    def phases(self) -> list[Phase]:
        raise NotImplementedError

    def training_step(self, phase: Phase, rng: np.random.Generator) -> tuple[dict[str, torch.Tensor], float]:
        """One step's weighted loss terms (summed by the trainer, in loss_terms order) and its colour PSNR."""
        raise NotImplementedError

    def view(self, frames: Any, k: int) -> View:
        """Frame k of a SubjectFrames as the model renders it without test-time fitting (for validation,
        orbits and sweeps): its tracked camera and conditions, and the code of `untested_code`."""
        return View(
            frames.camera_to_head[k],
            frames.focal,
            frames.size,
            frames.conditions[k],
            frames.background,
            self.untested_code(),
            int(frames.frames[k]),
        )

    def untested_code(self) -> torch.Tensor | None:
        """The method's per-frame code for a frame it was not trained or fitted on (NeRFace: the first
        training frame's latent code); None for methods without one."""
        return None

    def render(self, view: View) -> tuple[torch.Tensor, torch.Tensor]:
        """Image (size, size, 3) and foreground alpha (size, size) on the CPU, without gradients."""
        raise NotImplementedError

    def rendering_note(self) -> str:
        """What `render` approximates, if anything ("" when it renders exactly); evaluations log it, write it into
        their summary and the report shows it."""
        return ""

    def test_views(self, protocol: str, test: Any) -> list[View]:
        """The held-out frames conditioned under `protocol` (may optimise per-frame codes)."""
        raise NotImplementedError

    def memory_hint(self) -> str:
        """What to lower when a step runs out of memory."""
        return "lower `size` of this avatar in config.yaml"

    def extra_state(self) -> dict:
        """State beside the parameters that a resumed run needs (e.g. a sampling map)."""
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass

    def exports(self, folder, test: Any, views: list[View]) -> dict:
        """Method-specific outputs of the evaluation (e.g. meshes) from the test frames (a SubjectFrames, with
        images) and their views under the headline protocol; returns what metrics.json records of them."""
        return {}

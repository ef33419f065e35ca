"""Avatar methods, by the name a config's `avatars.<name>.method` gives: each has one typed config (built
from the validated section, preset first), a training function and an evaluation function, all reading
the subject's shared preprocessing and tracking caches."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

from .. import cache


@dataclasses.dataclass(frozen=True)
class AvatarMethod:
    name: str
    config: Callable[[dict], Any]  # validated section -> typed config
    train: Callable[[cache.SubjectCache, Any, Path], dict]
    evaluate: Callable[..., dict]  # (store, cfg, train_dir, out_dir, driver) -> summary
    train_module: str  # whose source (and the package modules it uses) reruns training when edited
    eval_module: str


def _nerface() -> AvatarMethod:
    from .evaluate_nerface import evaluate
    from .nerface_config import nerface_config
    from .train_nerface import train

    return AvatarMethod(
        "nerface", nerface_config, train, evaluate, f"{__name__}.train_nerface", f"{__name__}.evaluate_nerface"
    )


METHODS: dict[str, Callable[[], AvatarMethod]] = {"nerface": _nerface}


def avatar_method(section: dict) -> tuple[AvatarMethod, Any]:
    """The method of a validated avatar section and its typed config."""
    method = METHODS[section.get("method", "nerface")]()
    return method, method.config(section)

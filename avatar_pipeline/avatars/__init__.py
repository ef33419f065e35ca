"""The avatar methods, by the name a config's `avatars.<name>.method` gives.

Each method is a package under avatars/ that registers one MethodSpec (base.py) when imported: its typed
config with presets, the caches it reads, its part of the config schema, and the model class that the
shared trainer (trainer.py) and evaluation (evaluation.py) drive. Adding a method: a package with those,
its name in BUILT_IN below, and its branch in the schema's `avatar` dispatch; tests/test_avatar_contract.py
then runs it through training, a kill and resume, evaluation and the report.
"""

from __future__ import annotations

import importlib
from typing import Any

from .base import MethodSpec

BUILT_IN = ("nerface", "nha", "ldf", "gaussians")  # packages under avatars/ that register a method on import
_REGISTRY: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    if spec.name in _REGISTRY and _REGISTRY[spec.name] is not spec:
        raise ValueError(f"avatar method {spec.name!r} is registered twice")
    _REGISTRY[spec.name] = spec
    return spec


def methods() -> dict[str, MethodSpec]:
    """Every registered method, the built-in ones imported first."""
    for name in BUILT_IN:
        importlib.import_module(f"{__name__}.{name}")
    return dict(_REGISTRY)


def find(name: str) -> MethodSpec:
    registered = methods()
    if name not in registered:
        raise KeyError(f"unknown avatar method {name!r}; registered: {', '.join(sorted(registered))}")
    return registered[name]


def avatar_method(section: dict) -> tuple[MethodSpec, Any]:
    """The method of a validated avatar section and its typed config."""
    spec = find(section.get("method", "nerface"))
    return spec, spec.config_from(section)

"""The stages, in DAG order (cache.STAGES); each module has `run(store, cfg, ...)`.

Imported on demand: a stage's process then loads only what it uses (the tracking stage's torch alone takes
seconds to import, which every preprocessing stage paid when this package imported them all)."""

from __future__ import annotations

import importlib
from types import ModuleType

from ..cache import STAGES


def stage_module(name: str) -> ModuleType:
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; the stages are {', '.join(STAGES)}")
    return importlib.import_module(f".{name}", __name__)

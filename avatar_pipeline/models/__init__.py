"""Registry of morphable models: `kind` -> how to obtain it (see base.MorphableModel for the interface)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from ..cache import write_json
from ..config import ModelConfig
from ..errors import InputError
from .base import MorphableModel

log = logging.getLogger(__name__)

KINDS = ("auto", "ict", "flame", "builtin")


def prepare_ict(cfg: ModelConfig, out_dir: Path) -> dict:
    """Get ICT FaceKit (the configured folder/archive, else a download), convert it once to
    `out_dir/ict.npz`, and record the outcome in `out_dir/ict.json`. With `kind: auto` a failure is
    recorded (the tracker then falls back to the built-in model, loudly) instead of raised."""
    from . import ict

    out_dir.mkdir(parents=True, exist_ok=True)
    npz = out_dir / "ict.npz"
    try:
        source = (
            Path(cfg.ict_path) if cfg.ict_path else ict.download(out_dir / f"ICT-FaceKit-{ict.RELEASE_COMMIT}.tar.gz")
        )
        tmp = out_dir / "ict.partial.npz"
        if source.suffix == ".npz":  # an earlier run's ict.npz: checked and copied, not converted again
            ict.check_converted(source)
            shutil.copyfile(source, tmp)
        else:
            ict.convert(source).save(tmp)
        tmp.replace(npz)
        status = {"available": True, "model": str(npz), "source": str(source)}
    except InputError as e:
        if cfg.kind != "auto":
            raise
        status = {"available": False, "reason": str(e)}
        log.warning("ICT FaceKit is not available (%s); tracking will use the built-in model", e)
    write_json(out_dir / "ict.json", status)
    return status


def load_model(cfg: ModelConfig, ict_status: Path | None, landmarks=None) -> tuple[MorphableModel, list[str]]:
    """The configured model and any warnings (e.g. a fallback) to show in logs and reports.

    `landmarks` (the subject's landmarks.npz arrays) is needed by the built-in model, which is
    learned per subject."""
    warnings: list[str] = []
    kind = cfg.kind
    if kind == "flame":
        from . import flame

        if not cfg.flame_path or not cfg.flame_landmarks:
            raise InputError(
                "model.kind: flame",
                "needs model.flame_path and model.flame_landmarks",
                "download FLAME (registration required) and set both paths, or use model.kind: auto",
            )
        return flame.load(cfg.flame_path, cfg.flame_landmarks, uv_path=cfg.flame_uvs), warnings
    if kind in ("auto", "ict"):
        status = (
            json.loads(ict_status.read_text())
            if ict_status and ict_status.exists()
            else {"available": False, "reason": "the ict_model step did not run"}
        )
        if status["available"]:
            return MorphableModel.load(status["model"]), warnings
        if kind == "ict":
            raise InputError(
                "model.kind: ict", status["reason"], "set model.ict_path to the ICT-FaceKit folder or archive"
            )
        warnings.append(
            f"FALLBACK: ICT FaceKit unavailable ({status['reason'].splitlines()[0]}); "
            "using the built-in face-only model learned from this subject's landmarks. To use ICT, set "
            "model.ict_path or rerun with `-- --forcerun ict_model` once online"
        )
    from . import builtin

    if landmarks is None:
        raise ValueError("the built-in model needs the subject's landmarks")
    return builtin.learn(landmarks["mp478"], landmarks["valid"]), warnings

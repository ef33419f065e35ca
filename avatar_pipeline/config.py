"""Configuration: one typed config per stage, validated against the JSON schema that Snakemake uses too.

The schema (resources/config.schema.yaml, linked as workflow/schemas/config.schema.yaml) is the single
source of keys, types and defaults; the dataclasses below mirror it so that stage code is typed
(a test checks the two agree).
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import re
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from .errors import InputError

SCHEMA_PATH = Path(__file__).parent / "resources" / "config.schema.yaml"


class ConfigLoader(yaml.SafeLoader):
    """YAML 1.1 reads `1e-5` (no dot) as a string; configs write learning rates that way, so floats are read
    as YAML 1.2 and JSON read them."""


ConfigLoader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def read_yaml(stream) -> Any:
    """A config file's contents (YAML or JSON), exponent floats included."""
    return yaml.load(stream, Loader=ConfigLoader)


@dataclasses.dataclass(frozen=True)
class CropConfig:
    size: int = 512
    scale: float = 2.2
    margin: float = 0.15
    vertical_shift: float = -0.15
    detect_max_side: int = 640
    min_face_confidence: float = 0.5
    fps: float | None = None
    every_nth: int = 1
    start: int = 0
    end: int | None = None
    max_frames: int | None = None
    test_fraction: float = 0.2
    val_fraction: float = 0.0
    min_train_frames: int = 10
    min_test_frames: int = 2
    rotate: str | int = "auto"
    png_compression: int = 1


@dataclasses.dataclass(frozen=True)
class LandmarksConfig:
    backend: str = "mediapipe"
    min_confidence: float = 0.5
    smoothing_sigma: float = 0.0
    fan_weights_dir: str | None = None


@dataclasses.dataclass(frozen=True)
class ParsingConfig:
    backend: str = "mediapipe"
    matte_model: str = "general"
    bisenet_weights: str | None = None


@dataclasses.dataclass(frozen=True)
class BackgroundConfig:
    dilate: float = 0.04
    matte_threshold: float = 0.1
    max_frames: int = 120
    min_samples: int = 1


@dataclasses.dataclass(frozen=True)
class NormalsConfig:
    backend: str = "mesh"
    network_weights: str | None = None


@dataclasses.dataclass(frozen=True)
class QAConfig:
    sheet_frames: int = 8
    video_frames: int = 150


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    kind: str = "auto"
    ict_path: str | None = None
    flame_path: str | None = None
    flame_landmarks: str | None = None
    flame_uvs: str | None = None


@dataclasses.dataclass(frozen=True)
class TrackingConfig:
    rigid_iterations: int = 150
    iterations: int = 400
    learning_rate: float = 0.02
    num_identity: int = 40
    num_expression: int = 53
    identity_weight: float = 0.001
    expression_weight: float = 0.0001
    smooth_pose_weight: float = 10.0
    smooth_expression_weight: float = 0.01
    focal_prior_weight: float = 0.001
    focal_init: float = 2.0  # image widths (a 28 degree field of view)
    focal: float | None = None  # known focal length in image widths: fixed instead of estimated
    robust_scale: float = 0.03  # residuals beyond this fraction of the face size count less
    fit_points: str = "mediapipe"  # or "ibug68"
    jaw_line_weight: float = 0.5
    max_error: float = 0.1
    refine: str = "none"
    refine_iterations: int = 100
    refine_size: int = 128
    refine_batch: int = 4
    refine_learning_rate: float = 0.003
    rasterizer: str = "auto"  # of the refinement: PyTorch3D when installed, else the project's own ("own")
    photometric_weight: float = 1.0
    silhouette_weight: float = 0.1
    overlay_frames: int = 100
    export_meshes: bool = False


# stage name -> its typed config; the name is also the config.yaml section
STAGE_CONFIGS: dict[str, type] = {
    "crop": CropConfig,
    "landmarks": LandmarksConfig,
    "parsing": ParsingConfig,
    "background": BackgroundConfig,
    "normals": NormalsConfig,
    "qa": QAConfig,
    "model": ModelConfig,
    "tracking": TrackingConfig,
}


@dataclasses.dataclass(frozen=True)
class Subject:
    name: str
    video: str
    background: str | None = None
    train: tuple[int, int] | None = None
    val: tuple[int, int] | None = None
    test: tuple[int, int] | None = None


def load_schema() -> dict:
    with open(SCHEMA_PATH) as f:
        return yaml.safe_load(f)


def _validator_with_defaults(schema: dict):
    """A Draft 2020-12 validator that also fills in `default` values (the recipe from jsonschema's FAQ)."""
    base = jsonschema.Draft202012Validator
    validate_properties = base.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema_):
        if isinstance(instance, dict):
            for key, sub in properties.items():
                if "default" in sub and key not in instance:
                    instance[key] = copy.deepcopy(sub["default"])
        yield from validate_properties(validator, properties, instance, schema_)

    return jsonschema.validators.extend(base, {"properties": set_defaults})(schema)


def _describe(error: jsonschema.ValidationError) -> str:
    where = ".".join(str(p) for p in error.absolute_path) or "(top level)"
    if error.validator == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        extra = sorted(set(error.instance) - set(allowed))
        if allowed:
            return f"{where}: unknown key(s) {', '.join(map(repr, extra))}; allowed keys: {', '.join(allowed)}"
    return f"{where}: {error.message}"


def validate_config(config: dict, source: str = "config.yaml") -> dict:
    """Validate and fill defaults in place; raise InputError naming every bad key."""
    validator = _validator_with_defaults(load_schema())
    errors = sorted(validator.iter_errors(config), key=lambda e: list(map(str, e.absolute_path)))
    if errors:
        lines = "\n    ".join(_describe(e) for e in errors)
        raise InputError(
            source,
            f"invalid configuration:\n    {lines}",
            "fix or remove the named keys (see workflow/schemas/config.schema.yaml for every key)",
        )
    return config


def load_config(path: str | Path | None = None, overrides: dict | None = None) -> dict:
    """Read a config file (or start empty), apply overrides, validate, fill defaults."""
    config: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise InputError(str(path), "config file does not exist", "pass an existing YAML file")
        with open(path) as f:
            config = read_yaml(f) or {}
        if not isinstance(config, dict):
            raise InputError(str(path), "top level must be a mapping of keys", "see config.yaml in the repository")
    if overrides:
        config = deep_merge(config, overrides)
    return validate_config(config, str(path) if path else "configuration")


def deep_merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def stage_config(config: dict, stage: str):
    """The typed config of one stage from a validated config dict."""
    return STAGE_CONFIGS[stage](**config.get(stage, {}))


def stage_config_from_settings(stage: str, settings: dict):
    """Typed config from a stage section alone (what a Snakemake rule passes as params)."""
    section = validate_config({stage: dict(settings)}, f"settings of stage {stage}")[stage]
    return STAGE_CONFIGS[stage](**section)


def parse_range(text: str | None, where: str) -> tuple[int, int] | None:
    """A frame range written FIRST-END (end exclusive); None for an empty field."""
    text = (text or "").strip()
    if not text:
        return None
    try:
        a, b = (int(x) for x in text.split("-"))
    except ValueError:
        raise InputError(where, f"frame range {text!r} is not of the form FIRST-END", "write e.g. 0-80") from None
    return a, b


def load_subjects(config: dict, base_dir: str | Path = ".") -> dict[str, Subject]:
    """Subjects from `subjects` and the optional TSV `subjects_sheet`, keyed by name."""
    subjects: dict[str, Subject] = {}
    for name, entry in (config.get("subjects") or {}).items():
        ranges = {k: tuple(entry[k]) if entry.get(k) else None for k in ("train", "val", "test")}
        subjects[name] = Subject(name, entry["video"], entry.get("background"), **ranges)
    sheet = config.get("subjects_sheet")
    if sheet:
        sheet_path = Path(base_dir) / sheet
        if not sheet_path.exists():
            raise InputError(str(sheet_path), "subjects sheet does not exist", "fix subjects_sheet in config.yaml")
        with open(sheet_path, newline="") as f:
            rows = list(csv.DictReader(f, delimiter="\t"))
        for i, row in enumerate(rows, start=2):
            where = f"{sheet_path} line {i}"
            name, video = (row.get("subject") or "").strip(), (row.get("video") or "").strip()
            if not name or not video:
                raise InputError(
                    where,
                    "needs both 'subject' and 'video' columns filled",
                    "use a tab-separated header: subject<TAB>video[<TAB>background<TAB>train<TAB>val<TAB>test]",
                )
            if name in subjects:
                raise InputError(where, f"subject {name!r} is listed twice", "give every subject a unique name")
            validate_config({"subjects": {name: {"video": video}}}, where)
            subjects[name] = Subject(
                name,
                video,
                (row.get("background") or "").strip() or None,
                *(parse_range(row.get(k, ""), where) for k in ("train", "val", "test")),
            )
    return subjects

import dataclasses

import pytest

from avatar_pipeline.config import (
    STAGE_CONFIGS,
    load_config,
    load_schema,
    load_subjects,
    stage_config,
    stage_config_from_settings,
)
from avatar_pipeline.errors import InputError

from .conftest import REPO


def test_every_stage_dataclass_mirrors_its_schema_section():
    schema = load_schema()["properties"]
    for stage, cls in STAGE_CONFIGS.items():
        props = schema[stage]["properties"]
        fields = {f.name: f.default for f in dataclasses.fields(cls)}
        assert set(fields) == set(props), stage
        for name, default in fields.items():
            assert props[name]["default"] == default, f"{stage}.{name}"


def test_repository_config_is_valid_and_fills_defaults():
    config = load_config(REPO / "config.yaml")
    assert config["crop"]["size"] == 512
    assert config["background"]["dilate"] == 0.04  # not in the file: filled from the schema
    assert stage_config(config, "landmarks").backend == "mediapipe"


def test_unknown_key_is_named_with_the_allowed_ones(tmp_path):
    bad = tmp_path / "c.yaml"
    bad.write_text("crop:\n  sise: 256\n")
    with pytest.raises(InputError) as err:
        load_config(bad)
    msg = str(err.value)
    assert "crop" in msg and "'sise'" in msg and "size" in msg and str(bad) in msg


def test_wrong_type_is_named(tmp_path):
    bad = tmp_path / "c.yaml"
    bad.write_text("crop:\n  size: large\n")
    with pytest.raises(InputError, match=r"crop\.size"):
        load_config(bad)


def test_exponent_floats_are_numbers_as_in_json(tmp_path):
    # plain YAML 1.1 reads 1e-5 as the string "1e-05" and the schema would refuse it
    path = tmp_path / "c.yaml"
    path.write_text("avatars:\n  a: {method: nha, preset: fast, offset_lr: [1e-4, 1e-5, 2E-6]}\n")
    assert load_config(path)["avatars"]["a"]["offset_lr"] == [1e-4, 1e-5, 2e-6]


def test_unknown_top_level_key(tmp_path):
    bad = tmp_path / "c.yaml"
    bad.write_text("tracking_typo: 1\n")
    with pytest.raises(InputError, match="tracking_typo"):
        load_config(bad)


def test_stage_settings_are_validated_too():
    assert stage_config_from_settings("crop", {"size": 64}).size == 64
    with pytest.raises(InputError, match="nonsense"):
        stage_config_from_settings("crop", {"nonsense": 1})


def test_subjects_from_config_and_sheet(tmp_path):
    sheet = tmp_path / "subjects.tsv"
    sheet.write_text(
        "subject\tvideo\tbackground\ttrain\tval\ttest\n"
        "bob\tvids/bob one.mp4\t\t0-80\t\t90-100\n"
        "carl\tcarl.mov\tplate.png\t\t\t\n"
    )
    config = load_config(
        overrides={"subjects": {"alice": {"video": "a.mp4", "test": [10, 20]}}, "subjects_sheet": "subjects.tsv"}
    )
    subjects = load_subjects(config, tmp_path)
    assert set(subjects) == {"alice", "bob", "carl"}
    assert subjects["alice"].test == (10, 20)
    assert subjects["bob"].video == "vids/bob one.mp4" and subjects["bob"].train == (0, 80)
    assert subjects["bob"].val is None and subjects["bob"].test == (90, 100)
    assert subjects["carl"].background == "plate.png"


def test_sheet_errors_name_the_line(tmp_path):
    sheet = tmp_path / "s.tsv"
    sheet.write_text("subject\tvideo\nbob\t\n")
    config = load_config(overrides={"subjects_sheet": "s.tsv"})
    with pytest.raises(InputError, match="line 2"):
        load_subjects(config, tmp_path)


def test_bad_subject_name_rejected():
    with pytest.raises(InputError, match="subjects"):
        load_config(overrides={"subjects": {"bad name/..": {"video": "x.mp4"}}})


def test_every_method_has_a_schema_branch_listing_exactly_its_typed_config_keys():
    import dataclasses

    from avatar_pipeline.avatars import methods
    from avatar_pipeline.config import load_schema

    schema = load_schema()["definitions"]
    dispatch = {b["if"]["properties"]["method"]["const"]: b["then"]["$ref"] for b in schema["avatar"]["allOf"]}
    assert set(schema["avatar"]["properties"]["method"]["enum"]) == set(methods()) == set(dispatch)
    for name, spec in methods().items():
        assert dispatch[name] == f"#/definitions/{spec.schema}"
        schema_keys = set(schema[spec.schema]["properties"]) - {"method", "preset"}
        assert schema_keys == {f.name for f in dataclasses.fields(spec.config)}, name
        assert set(schema[spec.schema]["properties"]["preset"]["enum"]) == set(spec.presets), name


def test_an_avatar_section_is_validated_against_its_own_method_only():
    with pytest.raises(InputError, match="avatars.a.method: 'mesh_only' is not one of"):
        load_config(overrides={"avatars": {"a": {"method": "mesh_only"}}})
    with pytest.raises(InputError, match="avatars.a: unknown key.*'rayz'"):
        load_config(overrides={"avatars": {"a": {"method": "nerface", "rayz": 3}}})
    # no method written: NeRFace, and no other branch wrote its defaults into the section
    assert load_config(overrides={"avatars": {"a": {"rays": 64}}})["avatars"]["a"] == {
        "method": "nerface",
        "preset": "fast",
        "rays": 64,
    }


def test_presets_fill_every_key_and_explicit_keys_win():
    from avatar_pipeline.avatars import avatar_method

    config = load_config(overrides={"avatars": {"a": {"preset": "fast", "steps": 7}, "b": {"preset": "paper"}}})
    method, fast = avatar_method(config["avatars"]["a"])
    _, paper = avatar_method(config["avatars"]["b"])
    assert method.name == "nerface" and fast.steps == 7 and fast.size == 256 and fast.width == 128
    assert fast.plane_resolutions == (64, 256) and fast.error_sampling == 0.5
    # the paper preset is Gafni et al. 2021 as written
    assert (paper.size, paper.steps, paper.rays, paper.coarse_samples, paper.fine_samples) == (
        512,
        400000,
        2048,
        64,
        64,
    )
    assert (paper.width, paper.depth, paper.colour_width, paper.colour_depth) == (256, 8, 128, 4)
    assert (paper.learning_rate, paper.final_learning_rate, paper.latent_dim, paper.latent_weight) == (
        5e-4,
        5e-4,
        32,
        0.05,
    )
    assert paper.head_fraction == 0.95 and paper.protocols[1] == "first_train_frame"
    # none of our additions: uniform ray draws, no feature planes, no mask loss
    assert (paper.error_sampling, paper.plane_resolutions, paper.mask_weight) == (0.0, (), 0.0)
    # YAML lists become the frozen config's tuples
    _, planes = avatar_method(
        load_config(overrides={"avatars": {"c": {"plane_resolutions": [16, 32]}}})["avatars"]["c"]
    )
    assert planes.plane_resolutions == (16, 32) and planes.field(53).plane_resolutions == (16, 32)


def test_default_config_has_one_fast_avatar():
    assert load_config()["avatars"] == {"nerface_fast": {"method": "nerface", "preset": "fast"}}


def test_training_digest_ignores_the_step_budget_but_not_the_network():
    from avatar_pipeline.avatars import find

    config = find("nerface").config_from
    base = config({"preset": "fast"})
    assert config({"preset": "fast", "steps": 99}).digest() == base.digest()
    assert config({"preset": "fast", "width": 64}).digest() != base.digest()
    assert config({"preset": "fast", "orbit_frames": 3}).training_settings() == base.training_settings()
    assert config({"preset": "fast", "latent_steps": 3}).training_settings() == base.training_settings()
    # a setting added later leaves the digest of its old behaviour alone, so earlier checkpoints stay valid
    assert config({"preset": "fast", "train_occupancy_cells": 64}).digest() != base.digest()
    assert "train_occupancy_cells" in base.training_settings() and base.added_keys["train_occupancy_cells"] == 0


def test_unknown_avatar_key_is_named():
    with pytest.raises(InputError, match="widht"):
        load_config(overrides={"avatars": {"a": {"preset": "fast", "widht": 3}}})

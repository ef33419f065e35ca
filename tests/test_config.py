import dataclasses

import pytest

from avatar_pipeline.config import (STAGE_CONFIGS, load_config, load_schema, load_subjects, stage_config,
                                    stage_config_from_settings)
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
    sheet.write_text("subject\tvideo\tbackground\ttrain\tval\ttest\n"
                     "bob\tvids/bob one.mp4\t\t0-80\t\t90-100\n"
                     "carl\tcarl.mov\tplate.png\t\t\t\n")
    config = load_config(overrides={"subjects": {"alice": {"video": "a.mp4", "test": [10, 20]}},
                                    "subjects_sheet": "subjects.tsv"})
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


def test_nerface_section_defaults_match_the_trainer():
    from avatar_pipeline.avatars.train_nerface import TrainConfig

    assert TrainConfig.from_settings(load_config()["nerface"]) == TrainConfig()

"""NeRFace training from a real subject's cache: it learns, checkpoints, and resumes after an interruption."""
import csv

import pytest

from avatar_pipeline import cache
from avatar_pipeline.avatars.nerface import FieldConfig
from avatar_pipeline.avatars.train_nerface import TrainConfig, train
from avatar_pipeline.config import ModelConfig, TrackingConfig
from avatar_pipeline.stages import tracking as tracking_stage


@pytest.fixture(scope="module")
def tracked(lp_d18, tmp_path_factory):
    root = tmp_path_factory.mktemp("tracked")
    store = cache.SubjectCache(root, "lp_d18")
    store.root.mkdir(parents=True)
    for stage in ("crop", "landmarks", "parsing", "background"):
        (store.root / stage).symlink_to(lp_d18.stage_dir(stage))
    tracking_stage.run(store, TrackingConfig(iterations=150, overlay_frames=0), ModelConfig(kind="builtin"))
    return store


TINY = TrainConfig(size=32, rays=256, coarse_samples=12, fine_samples=12, learning_rate=5e-3, checkpoint_every=10,
                   field=FieldConfig(width=64, depth=3, colour_width=32, colour_depth=1, latent_dim=8))


def _log(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_training_learns_and_resumes_from_its_checkpoint(tracked, tmp_path):
    import dataclasses

    out = tmp_path / "nerface"
    train(tracked, dataclasses.replace(TINY, steps=20), out)  # stands for a run stopped after step 20
    assert (out / "checkpoint.pt").exists() and len(_log(out / "log.csv")) == 20
    summary = train(tracked, dataclasses.replace(TINY, steps=60), out)
    rows = _log(out / "log.csv")
    assert [int(r["step"]) for r in rows] == list(range(1, 61))  # continued at 21, not from scratch
    assert summary["steps"] == 60 and (out / "done.json").exists()
    first = sum(float(r["loss"]) for r in rows[:10]) / 10
    last = sum(float(r["loss"]) for r in rows[-10:]) / 10
    assert last < 0.7 * first, (first, last)
    with pytest.raises(ValueError, match="other settings"):
        train(tracked, dataclasses.replace(TINY, steps=70, rays=128), out)


def test_test_frames_are_rendered_and_measured(tracked, tmp_path):
    import dataclasses
    import json

    from avatar_pipeline.avatars.train_nerface import evaluate_test_frames

    cfg = dataclasses.replace(TINY, steps=150)
    train(tracked, cfg, tmp_path)
    summary = evaluate_test_frames(tracked, cfg, tmp_path)
    assert summary["frames"] == 12 and json.loads((tmp_path / "test_metrics.json").read_text())["frames"] == 12
    # the avatar explains the held-out frames better than the background alone does
    assert summary["psnr"] > summary["psnr_background_only"] + 1.0, summary
    assert len(list((tmp_path / "test_renders").glob("*.png"))) == 12

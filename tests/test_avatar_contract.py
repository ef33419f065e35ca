"""What every registered avatar method gets from the core, checked on a real clip: training that survives a
kill and resumes exactly where it stopped, an evaluation under each of its protocols with the shared
renders, a refusal to evaluate a checkpoint of other settings, and its section in the report.

A new method is covered by registering: each runs with its MethodSpec.smoke_settings."""

import json
import subprocess
import time

import pytest
import torch

from avatar_pipeline import cache, report
from avatar_pipeline.avatars import avatar_method, methods, trainer
from avatar_pipeline.config import validate_config

from .conftest import CLI


@pytest.fixture(scope="module")
def subject(lp_d18_ict):
    return lp_d18_ict


def _settings(name: str, **overrides) -> dict:
    section = {"method": name, **methods()[name].smoke_settings, **overrides}
    return validate_config({"avatars": {"smoke": section}}, "smoke settings")["avatars"]["smoke"]


def _cli(command: str, store: cache.SubjectCache, settings: dict) -> list[str]:
    avatar = f"smoke_{settings['method']}"
    args = ["--results", str(store.root.parent), "--subject", store.subject, "--avatar", avatar]
    return CLI + [command, *args, "--settings", json.dumps(settings)]


@pytest.mark.parametrize("name", sorted(methods()))
def test_a_method_trains_survives_a_kill_evaluates_and_reports(name, subject, tmp_path):
    settings = _settings(name)
    spec, cfg = avatar_method(settings)
    avatar = f"smoke_{name}"
    train_dir = subject.training_dir(avatar)
    # a training job killed (SIGKILL) after its first checkpoint ...
    job = subprocess.Popen(_cli("avatar-train", subject, settings), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while not (train_dir / "checkpoint.pt").exists() and job.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    job.kill()
    _, stderr = job.communicate()
    assert (train_dir / "checkpoint.pt").exists(), stderr.decode()[-3000:]
    killed_at = torch.load(train_dir / "checkpoint.pt", weights_only=False)["step"]
    assert 0 < killed_at < cfg.steps and not (train_dir / cache.DONE_FILE).exists()
    # ... resumes from it when run again
    rerun = subprocess.run(_cli("avatar-train", subject, settings), capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"from step {killed_at}" in rerun.stderr
    rows = cache.read_training_log(train_dir / "log.csv")
    assert [int(r["step"]) for r in rows] == list(range(1, cfg.steps + 1))
    done = subject.training_summary(avatar)
    assert done["method"] == name and done["steps"] == cfg.steps
    assert all(p["steps"] == p["planned_steps"] for p in done["phases"].values()), done["phases"]
    # and exactly where it stopped: the same losses as a run never interrupted
    straight = trainer.train(spec, subject, cfg, tmp_path / "straight")
    assert straight["steps"] == cfg.steps
    uninterrupted = cache.read_training_log(tmp_path / "straight" / "log.csv")
    assert [r["loss"] for r in rows] == [r["loss"] for r in uninterrupted]
    # the held-out frame is scored over the frame and inside its head mask (every method reads the parsing)
    validated = [r for r in rows if r["val_psnr"]]
    assert validated and all(r["val_head_psnr"] for r in validated)
    assert any(r["val_head_psnr"] != r["val_psnr"] for r in validated)

    evaluation = subprocess.run(_cli("avatar-eval", subject, settings), capture_output=True, text=True, timeout=900)
    assert evaluation.returncode == 0, evaluation.stderr[-3000:]
    summary = subject.evaluation_summary(avatar)
    test_frames = [i for i in subject.split()["test"] if subject.tracking()["fitted"][i]]
    assert summary["method"] == name and summary["test_frames"] == test_frames
    assert list(summary["protocols"]) == list(cfg.protocols)
    for values in summary["protocols"].values():
        assert 0 < values["ssim"] <= 1 and 0 < values["head_ssim"] <= 1
        # even a smoke run explains the held-out frames better than the background plate alone
        assert values["psnr"] > values["psnr_background_only"] + 1.0, values
    out = subject.evaluation_dir(avatar)
    assert len(list((out / "test").glob("*.png"))) == len(test_frames)
    for video in ("test.mp4", "orbit.mp4", "sweep.mp4"):
        assert (out / video).stat().st_size > 0, video
    for protocol in cfg.protocols:
        assert len(cache.read_training_log(out / f"metrics_{protocol}.csv")) == len(test_frames)

    # a checkpoint of other training settings is refused, naming the file
    other = _settings(name, seed=cfg.seed + 1)
    refused = subprocess.run(_cli("avatar-eval", subject, other), capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0 and "other settings" in refused.stderr and "checkpoint.pt" in refused.stderr
    assert subject.evaluation_summary(avatar) == summary  # the earlier evaluation is untouched

    page = report.subject_report(subject, [avatar]).read_text()
    assert f"Avatar {avatar}" in page and f"curve_{avatar}.png" in page, page[:3000]
    assert f"<td>{name}</td>" in page, page[:3000]

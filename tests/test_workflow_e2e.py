"""End to end through Snakemake on real clips at low resolution, as a user runs it."""
import json
import re
import os
import subprocess
import sys

import numpy as np
import pytest
import yaml

from avatar_pipeline import cache

from .conftest import REPO, require_shared

pytestmark = pytest.mark.e2e
CLI = [sys.executable, "-m", "avatar_pipeline"]
TINY = {"crop": {"size": 128, "max_frames": 40}, "qa": {"sheet_frames": 3, "video_frames": 10},
        "background": {"max_frames": 20}}


def _run(args, cwd, **kw):
    return subprocess.run(CLI + args, cwd=cwd, capture_output=True, text=True, timeout=600, **kw)


@pytest.fixture(scope="module")
def workspace(videos_dir, tmp_path_factory):
    """Two subjects, one behind a path with spaces and non-ASCII characters, run by `workflow`."""
    ws = tmp_path_factory.mktemp("ws")
    odd = ws / "clips ü" / "vidéo un.mp4"
    odd.parent.mkdir()
    os.symlink(videos_dir / "dt_M030_front_neutral_level1_001.mp4", odd)
    ict = require_shared("models/ict-facekit-da5f95a.tar.xz")
    config = {**TINY, "model": {"ict_path": str(ict)}, "tracking": {"overlay_frames": 5},
              "nerface": {"size": 32, "steps": 40, "rays": 128, "coarse_samples": 8, "fine_samples": 8, "width": 32,
                          "depth": 2, "colour_width": 16, "checkpoint_every": 20, "learning_rate": 0.005},
              "subjects": {"m030": {"video": str(odd)},
                                   "d18": {"video": str(videos_dir / "lp_d18.mp4"), "test": [30, 40]}}}
    (ws / "config.yaml").write_text(yaml.safe_dump(config, allow_unicode=True))
    proc = _run(["workflow", "--cores", "2"], ws)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return ws


def test_both_subjects_complete_with_logs(workspace):
    for subject in ("m030", "d18"):
        store = cache.SubjectCache(workspace / "results", subject)
        for stage in cache.STAGES:
            assert store.stage_dir(stage).is_dir(), (subject, stage)
            assert store.log_path(stage).exists()
        assert not list(store.root.glob("*.partial-*"))
        tracking = cache.read_json(store.stage_dir("tracking") / "meta.json", "tracking")
        assert tracking["model"] == "ict" and tracking["reprojection_error_px"]["mean"] < 6
        summary = cache.read_json(store.stage_dir("qa") / "summary.json", "qa")
        assert summary["frames"] == 40 and summary["size"] == 128
        lms = store.landmarks()
        assert lms["valid"].mean() > 0.9
        # the face is inside the crop on every frame with landmarks
        pts = lms["mp478"][lms["valid"]][:, :, :2]
        assert np.all((pts > -1) & (pts < 129))
    d18 = cache.SubjectCache(workspace / "results", "d18").split()
    assert d18["test"] == list(range(30, 40))  # explicit range from the config


def test_second_run_does_nothing(workspace):
    proc = _run(["workflow", "--cores", "2"], workspace)
    assert proc.returncode == 0
    assert "Nothing to be done" in proc.stdout + proc.stderr


def _planned_jobs(workspace, config_overrides) -> set[str]:
    config = yaml.safe_load((workspace / "config.yaml").read_text())
    for section, values in config_overrides.items():
        config[section] = {**config.get(section, {}), **values}
    (workspace / "changed.yaml").write_text(yaml.safe_dump(config, allow_unicode=True))
    proc = _run(["workflow", "--config", "changed.yaml", "--cores", "2", "--", "--dry-run", "--quiet", "rules"],
                workspace)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout + proc.stderr
    return {rule for rule in cache.STAGES if f"\n{rule} " in out or f"\n{rule}\t" in out}


def test_changing_a_landmark_setting_reruns_landmarks_and_downstream_only(workspace):
    jobs = _planned_jobs(workspace, {"landmarks": {"smoothing_sigma": 1.0}})
    assert jobs == {"landmarks", "parsing", "background", "normals", "qa", "tracking"}


def test_changing_the_qa_setting_reruns_only_qa(workspace):
    assert _planned_jobs(workspace, {"qa": {"sheet_frames": 2}}) == {"qa"}


def test_changing_a_tracking_setting_reruns_only_tracking(workspace):
    assert _planned_jobs(workspace, {"tracking": {"iterations": 300}}) == {"tracking"}


def test_run_one_video_with_the_cli(videos_dir, tmp_path):
    base = yaml.safe_load((REPO / "config.yaml").read_text())
    base["crop"].update(size=96, max_frames=12)
    (tmp_path / "small.yaml").write_text(yaml.safe_dump(base))
    proc = _run(["run", str(videos_dir / "dt_W009_front_happy_level3_001.mp4"), "--subject", "w9", "--cores", "2",
                 "--config", "small.yaml"], tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    meta = json.loads((tmp_path / "results" / "w9" / "crop" / "meta.json").read_text())
    assert meta["size"] == 96 and len(meta["frames"]) == 12
    assert (tmp_path / "results" / "w9" / "qa" / "report.html").exists()


def test_bad_config_key_stops_before_anything_runs(tmp_path, videos_dir):
    (tmp_path / "config.yaml").write_text("crop:\n  sizee: 128\nsubjects: {}\n")
    proc = _run(["workflow", "--cores", "1"], tmp_path)
    assert proc.returncode != 0
    assert "sizee" in proc.stderr and "allowed keys" in proc.stderr
    assert not (tmp_path / "results" / "x").exists()


def test_missing_video_is_a_clear_cli_error(tmp_path):
    proc = _run(["run", str(tmp_path / "nope.mp4")], tmp_path)
    assert proc.returncode == 2 and "does not exist" in proc.stderr and "nope.mp4" in proc.stderr


def test_a_killed_stage_leaves_nothing_that_looks_complete(videos_dir, tmp_path):
    import signal
    import time

    cmd = CLI + ["crop", "--results", str(tmp_path), "--subject", "k", "--video", str(videos_dir / "lp_d18.mp4"),
                 "--settings", '{"size": 512, "png_compression": 9}']
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        partial = list((tmp_path / "k").glob("crop.partial-*/frames/*.png"))
        if len(partial) >= 5:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the stage finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "k" / "crop").exists()
    assert list((tmp_path / "k").glob("crop.partial-*"))
    # the rerun starts the stage afresh and clears the killed run's leftovers
    rerun = subprocess.run(cmd[:-1] + ['{"size": 64}'], capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert (tmp_path / "k" / "crop" / "meta.json").exists()
    assert not list((tmp_path / "k").glob("crop.partial-*"))


def test_a_failing_subject_does_not_stop_the_others(videos_dir, tmp_path):
    (tmp_path / "broken.mp4").write_text("this is not a video")
    config = {"crop": {"size": 64, "max_frames": 12}, "qa": {"sheet_frames": 2, "video_frames": 4},
              "model": {"kind": "builtin"}, "tracking": {"iterations": 50, "overlay_frames": 0},
              "subjects": {"good": {"video": str(videos_dir / "dt_W009_front_happy_level3_001.mp4")},
                           "bad": {"video": str(tmp_path / "broken.mp4")}}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    proc = _run(["workflow", "--cores", "2"], tmp_path)
    assert proc.returncode != 0
    assert (tmp_path / "results" / "good" / "qa").is_dir() and (tmp_path / "results" / "good" / "tracking").is_dir()
    assert "1 subject(s) did not complete" in proc.stderr
    assert "bad: stage 'crop' failed; log: results/bad/logs/crop.log" in proc.stderr
    assert "not a readable video" in proc.stderr


def _planned(workspace, config_file: str, extra_env: dict | None = None, snakefile: str | None = None) -> set[tuple[str, str]]:
    """(rule, subject) pairs a dry run would execute."""
    env = {**os.environ, **(extra_env or {})}
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", snakefile or str(REPO / "Snakefile"), "--configfile",
           config_file, "--cores", "1", "--dry-run"]
    proc = subprocess.run(cmd, cwd=workspace, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    jobs = re.findall(r"\nrule (\w+):\n(?:    .*\n)*?    wildcards: subject=(\S+)", proc.stdout)
    return set(jobs)


def test_adding_a_subject_runs_only_the_new_subject(workspace, videos_dir):
    config = yaml.safe_load((workspace / "config.yaml").read_text())
    config["subjects"]["w9"] = {"video": str(videos_dir / "dt_W009_front_happy_level3_001.mp4")}
    (workspace / "more.yaml").write_text(yaml.safe_dump(config, allow_unicode=True))
    jobs = _planned(workspace, "more.yaml")
    assert {subject for _, subject in jobs} == {"w9"}
    assert {rule for rule, _ in jobs} == set(cache.STAGES)


def test_changing_a_stage_s_code_reruns_that_stage(workspace, tmp_path):
    """A copy of the code with one edited stage, imported ahead of the installed package."""
    import shutil

    copy = tmp_path / "code"
    shutil.copytree(REPO / "avatar_pipeline", copy / "avatar_pipeline")
    for item in ("Snakefile", "workflow", "envs", "config.yaml"):
        src = REPO / item
        (shutil.copytree if src.is_dir() else shutil.copy)(src, copy / item)
    env = {"PYTHONPATH": str(copy)}
    assert _planned(workspace, "config.yaml", env, str(copy / "Snakefile")) == set()  # identical code: nothing
    with open(copy / "avatar_pipeline" / "stages" / "normals.py", "a") as f:
        f.write("\n# an edit\n")
    jobs = _planned(workspace, "config.yaml", env, str(copy / "Snakefile"))
    assert {rule for rule, _ in jobs} == {"normals", "qa"} and {s for _, s in jobs} == {"m030", "d18"}


def test_nerface_target_trains_and_evaluates(workspace):
    proc = _run(["workflow", "--cores", "2", "--", "results/d18/nerface/test_metrics.json"], workspace)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    metrics = json.loads((workspace / "results" / "d18" / "nerface" / "test_metrics.json").read_text())
    assert metrics["frames"] == 10 and metrics["psnr"] > 0
    assert (workspace / "results" / "d18" / "logs" / "nerface_train.log").exists()

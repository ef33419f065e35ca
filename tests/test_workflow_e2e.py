"""End to end through Snakemake on real clips at low resolution, as a user runs it."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import yaml

from avatar_pipeline import cache

from .conftest import CLI, REPO, TINY_AVATAR, run_cli

pytestmark = pytest.mark.e2e
AVATAR_RULES = ("avatar_train", "avatar_eval", "report", "index")


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


def test_avatars_are_trained_evaluated_and_reported(workspace):
    results = workspace / "results"
    for subject in ("m030", "d18"):
        store = cache.SubjectCache(results, subject)
        avatar = store.avatar_dir("tiny")
        assert json.loads((avatar / "train" / "done.json").read_text())["steps"] == 40
        metrics = json.loads((avatar / "eval" / "metrics.json").read_text())
        assert metrics["headline_protocol"] == "optimised" and metrics["protocols"]["optimised"]["psnr"] > 10
        for video in ("test.mp4", "orbit.mp4", "sweep.mp4"):
            assert (avatar / "eval" / video).stat().st_size > 0
        page = (store.root / "report" / "index.html").read_text()
        assert "Avatar tiny" in page and "test.mp4" in page and "curve_tiny.png" in page
        assert (store.root / "report" / "curve_tiny.png").exists()
        assert store.log_path("avatar_train_tiny").exists() and store.log_path("avatar_eval_tiny").exists()
    assert metrics["test_frames"] == list(range(30, 40))  # d18's explicit test range
    # m030 is driven by d18 (both tracked with ICT FaceKit); d18 is not reenacted by itself
    assert (results / "m030" / "avatars" / "tiny" / "eval" / "reenact.mp4").stat().st_size > 0
    assert not (results / "d18" / "avatars" / "tiny" / "eval" / "reenact.mp4").exists()
    sweep = json.loads((results / "m030" / "avatars" / "tiny" / "eval" / "metrics.json").read_text())["sweep"]
    assert sweep["expression"] == "jawOpen"
    rows = (results / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("subject,avatar,protocol") and len(rows) == 3
    assert "m030/report/index.html" in (results / "index.html").read_text()


def test_second_run_does_nothing(workspace):
    proc = run_cli(["workflow", "--cores", "2"], workspace)
    assert proc.returncode == 0
    assert "Nothing to be done" in proc.stdout + proc.stderr


def _planned_jobs(workspace, config_overrides) -> set[str]:
    from avatar_pipeline.config import deep_merge

    config = deep_merge(yaml.safe_load((workspace / "config.yaml").read_text()), config_overrides)
    (workspace / "changed.yaml").write_text(yaml.safe_dump(config, allow_unicode=True))
    proc = run_cli(
        ["workflow", "--config", "changed.yaml", "--cores", "2", "--", "--dry-run", "--quiet", "rules"], workspace
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout + proc.stderr
    return {rule for rule in cache.STAGES + AVATAR_RULES if f"\n{rule} " in out or f"\n{rule}\t" in out}


def test_changing_a_landmark_setting_reruns_landmarks_and_downstream_only(workspace):
    jobs = _planned_jobs(workspace, {"landmarks": {"smoothing_sigma": 1.0}})
    assert jobs == {"landmarks", "parsing", "background", "normals", "qa", "tracking", *AVATAR_RULES}


def test_changing_the_qa_setting_reruns_only_qa_and_the_reports(workspace):
    assert _planned_jobs(workspace, {"qa": {"sheet_frames": 2}}) == {"qa", "report", "index"}


def test_changing_a_tracking_setting_reruns_tracking_and_the_avatars(workspace):
    assert _planned_jobs(workspace, {"tracking": {"iterations": 300}}) == {"tracking", *AVATAR_RULES}


def test_changing_a_parsing_setting_retrains_the_avatars_that_read_it(workspace):
    """NeRFace declares the parsing cache (its mask loss reads the mattes), so training is downstream of it."""
    jobs = _planned_jobs(workspace, {"parsing": {"matte_model": "landscape"}})
    assert jobs == {"parsing", "background", "qa", *AVATAR_RULES}


def test_changing_a_training_setting_reruns_training_and_evaluation_only(workspace):
    assert _planned_jobs(workspace, {"avatars": {"tiny": {"rays": 64}}}) == set(AVATAR_RULES)


def test_changing_an_evaluation_setting_does_not_retrain(workspace):
    assert _planned_jobs(workspace, {"avatars": {"tiny": {"orbit_frames": 3}}}) == {"avatar_eval", "report", "index"}


def test_a_second_avatar_shares_the_preprocessing_caches(workspace):
    config = yaml.safe_load((workspace / "config.yaml").read_text())
    config["avatars"]["wider"] = {**TINY_AVATAR, "width": 48}
    (workspace / "two.yaml").write_text(yaml.safe_dump(config, allow_unicode=True))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "snakemake",
            "--snakefile",
            str(REPO / "Snakefile"),
            "--configfile",
            "two.yaml",
            "--cores",
            "1",
            "--dry-run",
        ],
        cwd=workspace,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    jobs = set(re.findall(r"\nrule (\w+):\n(?:    .*\n)*?    wildcards: subject=([^,\s]+), avatar=(\S+)", proc.stdout))
    assert jobs == {(rule, subject, "wider") for rule in ("avatar_train", "avatar_eval") for subject in ("m030", "d18")}
    planned = set(re.findall(r"\nrule (\w+):", proc.stdout))
    assert planned == {"avatar_train", "avatar_eval", "report", "index", "all"}  # no preprocessing, no tracking


def test_a_killed_training_job_resumes_from_its_checkpoint(workspace):
    """SIGKILL the training process of a Snakemake run; the rerun continues from the last checkpoint."""
    import signal
    import time

    import psutil
    import torch

    config = yaml.safe_load((workspace / "config.yaml").read_text())
    config["avatars"] = {"long": {**TINY_AVATAR, "steps": 400, "checkpoint_every": 10, "validate_every": 1000}}
    config["subjects"] = {"d18": config["subjects"]["d18"]}
    (workspace / "long.yaml").write_text(yaml.safe_dump(config, allow_unicode=True))
    target = "results/d18/avatars/long/train/done.json"
    runner = subprocess.Popen(
        CLI + ["workflow", "--config", "long.yaml", "--cores", "2", "--", target],
        cwd=workspace,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    checkpoint = workspace / "results" / "d18" / "avatars" / "long" / "train" / "checkpoint.pt"
    deadline = time.time() + 300
    while time.time() < deadline and not checkpoint.exists():
        time.sleep(0.2)
    assert checkpoint.exists(), "training never wrote a checkpoint"
    time.sleep(1.0)
    trainers = [
        p for p in psutil.Process(runner.pid).children(recursive=True) if "avatar-train" in " ".join(p.cmdline())
    ]
    assert trainers, "the training process was not found"
    for p in trainers:
        p.send_signal(signal.SIGKILL)
    runner.wait(timeout=120)
    assert runner.returncode != 0 and not (checkpoint.parent / "done.json").exists()
    killed_at = torch.load(checkpoint, weights_only=False)["step"]
    assert 0 < killed_at < 400
    rerun = run_cli(["workflow", "--config", "long.yaml", "--cores", "2", "--", target], workspace)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    log = (workspace / "results" / "d18" / "logs" / "avatar_train_long.log").read_text()
    assert f"from step {killed_at}" in log
    with open(checkpoint.parent / "log.csv") as f:
        steps = [int(line.split(",")[0]) for line in f.read().splitlines()[1:]]
    assert steps == list(range(1, 401))  # one continuous run, no step lost or repeated
    assert json.loads((checkpoint.parent / "done.json").read_text())["steps"] == 400


def test_run_one_video_with_the_cli(videos_dir, ict_npz, tmp_path):
    base = yaml.safe_load((REPO / "config.yaml").read_text())
    base["crop"].update(size=96, max_frames=12)
    base["model"] = {"kind": "ict", "ict_path": str(ict_npz)}  # no download: tests never use the network
    base["avatars"] = {"nerface_fast": {**TINY_AVATAR, "orbit_frames": 0, "sweep_frames": 0}}
    (tmp_path / "small.yaml").write_text(yaml.safe_dump(base))
    proc = run_cli(
        [
            "run",
            str(videos_dir / "dt_W009_front_happy_level3_001.mp4"),
            "--subject",
            "w9",
            "--cores",
            "2",
            "--config",
            "small.yaml",
            "--progress-every",
            "0.5",
        ],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    # the terminal showed the running jobs' progress and, at the end, where the report is
    assert re.search(
        r"\[progress [\d:]+\] running 1: avatar_train\[w9/nerface_fast\] nerface: train \d+/40", proc.stderr
    )
    assert "Shell command:" not in proc.stderr
    assert proc.stderr.rstrip().endswith(f"file://{tmp_path / 'results' / 'w9' / 'report' / 'index.html'})")
    meta = json.loads((tmp_path / "results" / "w9" / "crop" / "meta.json").read_text())
    assert meta["size"] == 96 and len(meta["frames"]) == 12
    assert (tmp_path / "results" / "w9" / "qa" / "report.html").exists()
    assert (tmp_path / "results" / "w9" / "report" / "index.html").exists()  # the one command goes to the report
    assert json.loads((tmp_path / "results" / "w9" / "tracking" / "meta.json").read_text())["model"] == "ict"


def test_bad_config_key_stops_before_anything_runs(tmp_path, videos_dir):
    (tmp_path / "config.yaml").write_text(
        f"crop:\n  sizee: 128\nsubjects:\n  x: {{video: {videos_dir / 'lp_d18.mp4'}}}\n"
    )
    proc = run_cli(["workflow", "--cores", "1"], tmp_path)
    assert proc.returncode != 0
    assert "sizee" in proc.stderr and "allowed keys" in proc.stderr
    # nothing was written: no results folder, no Snakemake state, only the config itself
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]


def test_missing_video_is_a_clear_cli_error(tmp_path):
    proc = run_cli(["run", str(tmp_path / "nope.mp4")], tmp_path)
    assert proc.returncode == 2 and "does not exist" in proc.stderr and "nope.mp4" in proc.stderr


def test_a_killed_stage_leaves_nothing_that_looks_complete(videos_dir, tmp_path):
    import signal
    import time

    cmd = CLI + [
        "crop",
        "--results",
        str(tmp_path),
        "--subject",
        "k",
        "--video",
        str(videos_dir / "lp_d18.mp4"),
        "--settings",
        '{"size": 512, "png_compression": 9}',
    ]
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
    config = {
        "crop": {"size": 64, "max_frames": 12},
        "qa": {"sheet_frames": 2, "video_frames": 4},
        "model": {"kind": "builtin"},
        "tracking": {"iterations": 50, "overlay_frames": 0},
        "avatars": {},
        "subjects": {
            "good": {"video": str(videos_dir / "dt_W009_front_happy_level3_001.mp4")},
            "bad": {"video": str(tmp_path / "broken.mp4")},
        },
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    proc = run_cli(["workflow", "--cores", "2"], tmp_path)
    assert proc.returncode != 0
    assert (tmp_path / "results" / "good" / "qa").is_dir() and (tmp_path / "results" / "good" / "tracking").is_dir()
    assert "1 subject(s) did not complete" in proc.stderr
    assert "bad: 'crop' failed; log: results/bad/logs/crop.log" in proc.stderr
    assert "not a readable video" in proc.stderr


def _planned(
    workspace, config_file: str, extra_env: dict | None = None, snakefile: str | None = None
) -> set[tuple[str, str]]:
    """(rule, subject) pairs a dry run would execute."""
    env = {**os.environ, **(extra_env or {})}
    cmd = [
        sys.executable,
        "-m",
        "snakemake",
        "--snakefile",
        snakefile or str(REPO / "Snakefile"),
        "--configfile",
        config_file,
        "--cores",
        "1",
        "--dry-run",
    ]
    proc = subprocess.run(cmd, cwd=workspace, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    jobs = re.findall(r"\nrule (\w+):\n(?:    .*\n)*?    wildcards: subject=([^,\s]+)", proc.stdout)
    return set(jobs)


def test_adding_a_subject_runs_only_the_new_subject(workspace, videos_dir):
    config = yaml.safe_load((workspace / "config.yaml").read_text())
    config["subjects"]["w9"] = {"video": str(videos_dir / "dt_W009_front_happy_level3_001.mp4")}
    (workspace / "more.yaml").write_text(yaml.safe_dump(config, allow_unicode=True))
    jobs = _planned(workspace, "more.yaml")
    assert {subject for _, subject in jobs} == {"w9"}
    assert {rule for rule, _ in jobs} == set(cache.STAGES) | {"avatar_train", "avatar_eval", "report"}


def _code_copy(tmp_path):
    """A copy of the package and workflow, and the environment that imports it ahead of the installed one."""
    import shutil

    copy = tmp_path / "code"
    shutil.copytree(REPO / "avatar_pipeline", copy / "avatar_pipeline")
    for item in ("Snakefile", "workflow", "envs", "config.yaml"):
        src = REPO / item
        (shutil.copytree if src.is_dir() else shutil.copy)(src, copy / item)
    return copy, {"PYTHONPATH": str(copy)}


def test_changing_a_stage_s_code_reruns_that_stage(workspace, tmp_path):
    """A copy of the code with one edited stage, imported ahead of the installed package."""
    copy, env = _code_copy(tmp_path)
    assert _planned(workspace, "config.yaml", env, str(copy / "Snakefile")) == set()  # identical code: nothing
    with open(copy / "avatar_pipeline" / "stages" / "normals.py", "a") as f:
        f.write("\n# an edit\n")
    jobs = _planned(workspace, "config.yaml", env, str(copy / "Snakefile"))
    assert {rule for rule, _ in jobs} == {"normals", "qa", "report"} and {s for _, s in jobs} == {"m030", "d18"}


def test_editing_a_module_a_rule_imports_indirectly_reruns_that_rule(workspace, tmp_path):
    """The code version follows imports transitively: the FLAME loader is imported by the model registry,
    which tracking imports; the NeRFace field by the method's model, which the avatar rules run."""
    import shutil

    copy, env = _code_copy(tmp_path)
    with open(copy / "avatar_pipeline" / "models" / "flame.py", "a") as f:
        f.write("\n# an edit\n")
    jobs = {rule for rule, _ in _planned(workspace, "config.yaml", env, str(copy / "Snakefile"))}
    assert jobs == {"tracking", "avatar_train", "avatar_eval", "report"}  # (ict_model too, without a subject)
    shutil.copy(REPO / "avatar_pipeline" / "models" / "flame.py", copy / "avatar_pipeline" / "models" / "flame.py")
    with open(copy / "avatar_pipeline" / "avatars" / "nerface" / "field.py", "a") as f:
        f.write("\n# an edit\n")
    jobs = {rule for rule, _ in _planned(workspace, "config.yaml", env, str(copy / "Snakefile"))}
    assert jobs == {"avatar_train", "avatar_eval", "report"}

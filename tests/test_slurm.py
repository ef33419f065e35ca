"""Two subjects through Snakemake's SLURM executor on a real one-node cluster on localhost."""

import os
import re
import signal
import subprocess
import sys

import pytest
import yaml

from avatar_pipeline import cache

from .conftest import REPO
from .slurm_cluster import local_cluster, missing_requirements

pytestmark = pytest.mark.e2e


def test_two_subjects_run_through_slurm(videos_dir, tmp_path):
    reason = missing_requirements()
    if reason:
        pytest.skip(reason)
    ws = tmp_path / "ws"
    ws.mkdir()
    config = {
        "crop": {"size": 64, "max_frames": 10, "min_train_frames": 5},
        "qa": {"sheet_frames": 2, "video_frames": 4},
        "background": {"max_frames": 10},
        "model": {"kind": "builtin"},
        "tracking": {"iterations": 50, "rigid_iterations": 20, "overlay_frames": 0},
        "avatars": {
            "tiny": {
                "preset": "fast",
                "size": 16,
                "steps": 10,
                "rays": 64,
                "coarse_samples": 4,
                "fine_samples": 4,
                "width": 16,
                "depth": 2,
                "colour_width": 8,
                "validate_every": 10,
                "latent_steps": 2,
                "latent_rays": 16,
                "orbit_frames": 2,
                "sweep_frames": 2,
            }
        },
        "subjects": {
            "w9": {"video": str(videos_dir / "dt_W009_front_happy_level3_001.mp4")},
            "m30": {"video": str(videos_dir / "dt_M030_front_neutral_level1_001.mp4")},
        },
    }
    (ws / "config.yaml").write_text(yaml.safe_dump(config))
    with local_cluster() as env:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "avatar_pipeline",
                "workflow",
                "--profile",
                str(REPO / "workflow/profiles/slurm"),
                "--cores",
                "2",
            ],
            cwd=ws,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        try:
            output, _ = proc.communicate(timeout=900)  # hard limit: Snakemake can wait forever on a lost job
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate()
            pytest.fail(f"the SLURM run did not finish within 15 minutes:\n{output[-3000:]}")
    assert proc.returncode == 0, output[-4000:]
    submitted = re.findall(r"has been submitted with SLURM jobid (\d+) \(log: (\S+)\)", output)
    stages = ("crop", "landmarks", "parsing", "background", "normals", "qa", "tracking")
    per_subject = len(stages) + 3  # + avatar_train, avatar_eval, report
    assert len({job for job, _ in submitted}) == 2 * per_subject + 1  # + index: every job went through sbatch
    for job, log in submitted:
        log = log.rstrip(").")
        assert os.path.exists(log) and log.endswith(f"/{job}.log")
    for subject in ("w9", "m30"):
        store = cache.SubjectCache(ws / "results", subject)
        for stage in stages:
            assert store.stage_dir(stage).is_dir(), (subject, stage)
        assert store.landmarks()["valid"].mean() > 0.9
        assert (
            cache.read_json(store.stage_dir("tracking") / "meta.json", "tracking")["reprojection_error_px"]["mean"] < 3
        )
        assert (store.avatar_dir("tiny") / "eval" / "metrics.json").exists()  # training ran as a SLURM job too
    assert (ws / "results" / "index.html").exists()

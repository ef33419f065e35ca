"""Shared fixtures. Real media are read in place from ../shared (never copied into the repo); where it
is absent the tests that need it skip with the reason, except under CI (CI=true), where that fails."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from avatar_pipeline import cache
from avatar_pipeline.avatars import find
from avatar_pipeline.config import BackgroundConfig, CropConfig, LandmarksConfig, NormalsConfig, ParsingConfig, QAConfig
from avatar_pipeline.video import ffmpeg_tools

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("AVATAR_PIPELINE_SHARED", REPO.parent / "shared"))


def require_shared(relative: str) -> Path:
    path = SHARED / relative
    if not path.exists():
        reason = f"{path} is not available (the real test media live in ../shared)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"under CI ../shared must be present: {reason}")
        pytest.skip(reason)
    return path


@pytest.fixture(scope="session")
def videos_dir() -> Path:
    return require_shared("data/videos")


@pytest.fixture(scope="session")
def images_dir() -> Path:
    return require_shared("data/images")


def ffmpeg(*args: str) -> None:
    """Run the ffmpeg the package uses (to make test inputs)."""
    subprocess.run([ffmpeg_tools().ffmpeg, "-hide_banner", "-loglevel", "error", "-y", *args], check=True)


def image_to_video(image: Path, out: Path, frames: int = 12, fps: int = 10, width: int | None = None) -> Path:
    scale = f"scale={width}:-2" if width else "scale=trunc(iw/2)*2:trunc(ih/2)*2"
    ffmpeg(
        "-loop",
        "1",
        "-i",
        str(image),
        "-frames:v",
        str(frames),
        "-r",
        str(fps),
        "-vf",
        scale,
        "-c:v",
        "libx264",
        "-pix_fmt",
        "yuv420p",
        str(out),
    )
    return out


TINY = dict(size=128, max_frames=40)


def run_preprocessing(
    video: Path, results: Path, subject: str, crop_overrides: dict | None = None, plate: str | None = None
) -> cache.SubjectCache:
    """All preprocessing stages, called directly (no Snakemake), at test resolution."""
    from avatar_pipeline.stages import background, crop, landmarks, normals, parsing, qa

    store = cache.SubjectCache(results, subject)
    crop.run(store, video, CropConfig(**{**TINY, **(crop_overrides or {})}))
    landmarks.run(store, LandmarksConfig())
    parsing.run(store, ParsingConfig())
    background.run(store, BackgroundConfig(), plate=plate)
    normals.run(store, NormalsConfig())
    qa.run(store, QAConfig(sheet_frames=4, video_frames=20))
    return store


@pytest.fixture(scope="session")
def w009(videos_dir, tmp_path_factory) -> cache.SubjectCache:
    """dt_W009 (tight studio face crop) preprocessed at 128 px."""
    return run_preprocessing(videos_dir / "dt_W009_front_happy_level3_001.mp4", tmp_path_factory.mktemp("w009"), "w009")


@pytest.fixture(scope="session")
def lp_d18(videos_dir, tmp_path_factory) -> cache.SubjectCache:
    """lp_d18 (head and shoulders, grey studio, strong expressions) preprocessed at 128 px."""
    return run_preprocessing(videos_dir / "lp_d18.mp4", tmp_path_factory.mktemp("lp_d18"), "lp_d18", {"max_frames": 60})


@pytest.fixture(scope="session")
def lp_d18_ict(lp_d18, ict_status, tmp_path_factory) -> cache.SubjectCache:
    """lp_d18's preprocessing (128 px) tracked with ICT FaceKit (a model with UVs and a mouth interior)."""
    from avatar_pipeline.config import ModelConfig, TrackingConfig
    from avatar_pipeline.stages import tracking

    store = cache.SubjectCache(tmp_path_factory.mktemp("lp_d18_ict"), "lp_d18")
    store.root.mkdir(parents=True)
    for stage in ("crop", "landmarks", "parsing", "background", "normals"):
        (store.root / stage).symlink_to(lp_d18.stage_dir(stage))
    tracking.run(store, TrackingConfig(iterations=150, overlay_frames=0), ModelConfig(kind="ict"), ict_status)
    return store


@pytest.fixture(scope="session")
def ict_status(tmp_path_factory) -> Path:
    """ICT FaceKit converted once from ../shared/models; the path of the ict.json the tracker reads."""
    from avatar_pipeline.config import ModelConfig
    from avatar_pipeline.models import prepare_ict

    archive = require_shared("models/ict-facekit-da5f95a.tar.xz")
    out = tmp_path_factory.mktemp("models")
    prepare_ict(ModelConfig(kind="ict", ict_path=str(archive)), out)
    return out / "ict.json"


@pytest.fixture(scope="session")
def ict_npz(ict_status) -> Path:
    """The session's converted ICT FaceKit; configs give it as model.ict_path, so nothing converts it again."""
    return ict_status.parent / "ict.npz"


CLI = [sys.executable, "-m", "avatar_pipeline"]
E2E_CONFIG = {
    "crop": {"size": 128, "max_frames": 40},
    "qa": {"sheet_frames": 3, "video_frames": 10},
    "background": {"max_frames": 20},
}
# the avatar of the end-to-end runs: NeRFace's smoke settings (what the contract test runs for every method)
TINY_AVATAR = {"method": "nerface", "preset": "fast", **find("nerface").smoke_settings}


def run_cli(args, cwd, **kw):
    return subprocess.run(CLI + args, cwd=cwd, capture_output=True, text=True, timeout=600, **kw)


@pytest.fixture(scope="session")
def workspace(videos_dir, ict_npz, tmp_path_factory):
    """Two subjects, one behind a path with spaces and non-ASCII characters, run by `workflow` through
    Snakemake with a tiny avatar: the end-to-end tests and the browser test read its results."""
    import yaml

    ws = tmp_path_factory.mktemp("ws")
    odd = ws / "clips ü" / "vidéo un.mp4"
    odd.parent.mkdir()
    os.symlink(videos_dir / "dt_M030_front_neutral_level1_001.mp4", odd)
    config = {
        **E2E_CONFIG,
        "model": {"ict_path": str(ict_npz)},
        "tracking": {"overlay_frames": 5},
        "avatars": {"tiny": {**TINY_AVATAR, "reenact_from": "d18"}},
        "subjects": {"m030": {"video": str(odd)}, "d18": {"video": str(videos_dir / "lp_d18.mp4"), "test": [30, 40]}},
    }
    (ws / "config.yaml").write_text(yaml.safe_dump(config, allow_unicode=True))
    proc = run_cli(["workflow", "--cores", "2"], ws)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return ws


# Chromium's background services try the network at start; this machine has none, so they are switched off
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--autoplay-policy=no-user-gesture-required",
]


def _chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        reason = "Chromium is not installed (scripts/setup.sh --test installs Debian's chromium as root)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"under CI the browser test must run: {reason}")
        pytest.skip(reason)
    return path


@pytest.fixture(scope="session")
def browser():
    executable = _chromium()
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="playwright is a test dependency (pip install -e .[test])"
    )
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield browser
        browser.close()

"""Video I/O through both ffmpeg builds: probing, rotation, variable frame rate, bad files."""

import shutil

import numpy as np
import pytest

from avatar_pipeline import video
from avatar_pipeline.errors import InputError

from .conftest import ffmpeg

BACKENDS = [
    "bundled",
    pytest.param(
        "system",
        marks=pytest.mark.skipif(
            shutil.which("ffmpeg") is None,
            reason="no system ffmpeg on PATH (scripts/setup.sh --test installs it as root)",
        ),
    ),
]


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    monkeypatch.setenv("AVATAR_PIPELINE_FFMPEG", request.param)
    tools = video.ffmpeg_tools()
    assert tools.source == request.param
    if request.param == "bundled":
        assert tools.ffprobe is None  # probing must work without ffprobe
    return request.param


def test_probe_and_decode_real_clip(backend, videos_dir):
    info = video.probe(videos_dir / "lp_d18.mp4")
    assert (info.width, info.height, info.rotation) == (480, 480, 0)
    assert info.fps == pytest.approx(30.0)
    report = video.DecodeReport()
    frames = list(video.iter_frames(info, [("scale", (96, 96))], (96, 96), report))
    assert len(frames) == 216 == len(report.timestamps)
    assert frames[0].shape == (96, 96, 3) and frames[0].dtype == np.uint8
    assert np.allclose(np.diff(report.timestamps), 1 / 30, atol=1e-3)
    assert not report.errors


@pytest.fixture(scope="module")
def rotated_clip(videos_dir, tmp_path_factory):
    """Pixels turned 90 degrees counter-clockwise, plus metadata telling players to turn them back."""
    d = tmp_path_factory.mktemp("rot")
    sideways = d / "sideways.mp4"
    ffmpeg(
        "-i",
        str(videos_dir / "lp_d18.mp4"),
        "-frames:v",
        "20",
        "-vf",
        "crop=480:320:0:80,transpose=2",
        "-c:v",
        "libx264",
        "-pix_fmt",
        "yuv420p",
        str(sideways),
    )
    out = d / "phone rotated.mp4"
    try:  # ffmpeg >= 6 sets the display matrix with an input option
        ffmpeg("-display_rotation", "-90", "-i", str(sideways), "-c", "copy", str(out))
    except Exception:  # older ffmpeg: the legacy rotate tag
        ffmpeg("-i", str(sideways), "-c", "copy", "-metadata:s:v:0", "rotate=90", str(out))
    return out


def test_rotation_metadata_is_honoured(backend, rotated_clip):
    info = video.probe(rotated_clip)
    assert info.rotation in (90, 270)
    assert (info.coded_width, info.coded_height) == (320, 480)
    assert (info.width, info.height) == (480, 320)  # displayed upright
    frame = next(video.iter_frames(info))
    assert frame.shape == (320, 480, 3)


def test_rotated_clip_crops_upright_face(rotated_clip, tmp_path):
    from avatar_pipeline import cache
    from avatar_pipeline.config import CropConfig
    from avatar_pipeline.stages import crop

    meta = crop.run(cache.SubjectCache(tmp_path, "rot"), rotated_clip, CropConfig(size=96))
    # BlazeFace only finds upright faces: found on every frame means the rotation was applied
    assert all(f["face_box"] is not None for f in meta["frames"])
    eyes = np.array([f["face_keypoints"][:2] for f in meta["frames"]])
    assert np.all(np.abs(eyes[:, 0, 1] - eyes[:, 1, 1]) < 0.1 * 96), "eyes should be level in an upright face"


def test_variable_frame_rate_timestamps(backend, videos_dir, tmp_path):
    vfr = tmp_path / "vfr.mkv"
    for encoder_time_base in ("filter", "-1"):  # ffmpeg >= 7 spells it "filter", older "-1"
        try:
            ffmpeg(
                "-i",
                str(videos_dir / "lp_d18.mp4"),
                "-frames:v",
                "40",
                "-vf",
                "settb=1/1000,setpts='if(lt(N,20),N*0.04,0.8+(N-20)*0.1)/TB'",
                "-fps_mode",
                "vfr",
                "-enc_time_base",
                encoder_time_base,
                "-c:v",
                "libx264",
                "-pix_fmt",
                "yuv420p",
                str(vfr),
            )
            break
        except Exception:
            continue
    info = video.probe(vfr)
    report = video.DecodeReport()
    n = sum(1 for _ in video.iter_frames(info, [("scale", (64, 64))], (64, 64), report))
    assert n == 40
    gaps = np.diff(report.timestamps)
    assert np.allclose(gaps[:19], 0.04, atol=2e-3) and np.allclose(gaps[20:], 0.1, atol=2e-3)

    from avatar_pipeline import cache
    from avatar_pipeline.config import CropConfig
    from avatar_pipeline.stages import crop

    meta = crop.run(cache.SubjectCache(tmp_path, "vfr"), vfr, CropConfig(size=64, fps=10))
    times = np.array([f["time"] for f in meta["frames"]])
    ticks = np.floor(times / 0.1 + 1e-3)
    assert np.all(np.diff(ticks) == 1)  # one frame per 0.1 s tick: resampled by timestamps, not by count
    assert len(times) == 8 + 20  # 0.0-0.76 s at 10 fps, then every 0.1 s frame


def _file(path, content: bytes):
    path.write_bytes(content)
    return path


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda d: d / "missing.mp4", "does not exist"),
        (lambda d: d, "is a folder"),
        (lambda d: _file(d / "empty.mp4", b""), "empty"),
        (lambda d: _file(d / "notes.mp4", b"not a video at all"), "not a readable video"),
    ],
)
def test_bad_files_get_clear_errors(backend, tmp_path, make, expected):
    path = make(tmp_path)
    with pytest.raises(InputError) as err:
        video.probe(path)
    assert expected in str(err.value) and str(path) in str(err.value) and "fix:" in str(err.value)


@pytest.mark.parametrize("image", ["photo.jpg", "photo.png"])
def test_a_still_image_named_like_a_video_is_called_an_image(backend, tmp_path, image):
    still = tmp_path / image
    ffmpeg("-f", "lavfi", "-i", "testsrc=size=64x48", "-frames:v", "1", str(still))
    renamed = still.rename(tmp_path / "clip.mp4")
    with pytest.raises(InputError, match=r"clip.mp4: is a still \w+ image \(64x48\), not a video"):
        video.probe(renamed)


def test_audio_only_file_is_not_a_video(backend, tmp_path):
    audio = tmp_path / "voice.m4a"
    ffmpeg("-f", "lavfi", "-i", "sine=frequency=440:duration=1", "-c:a", "aac", str(audio))
    with pytest.raises(InputError, match="not a readable video"):
        video.probe(audio)


def test_truncated_clip_is_reported_as_corrupt(backend, videos_dir, tmp_path):
    faststart = tmp_path / "fs.mp4"
    ffmpeg("-i", str(videos_dir / "lp_d18.mp4"), "-c", "copy", "-movflags", "+faststart", str(faststart))
    data = faststart.read_bytes()
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(data[: int(len(data) * 0.6)])
    info = video.probe(broken)
    report = video.DecodeReport()
    n = sum(1 for _ in video.iter_frames(info, [("scale", (32, 32))], (32, 32), report))
    with pytest.raises(InputError, match="corrupt or truncated mid-stream"):
        video.check_decode(info, report, n)


def test_video_writer_roundtrip(backend, tmp_path):
    out = tmp_path / "w.mp4"
    with video.VideoWriter(out, 64, 48, fps=10) as w:
        for k in range(5):
            w.write(np.full((48, 64, 3), k * 40, np.uint8))
    info = video.probe(out)
    frames = list(video.iter_frames(info))
    assert len(frames) == 5 and abs(int(frames[4].mean()) - 160) < 4


def test_clip_without_decodable_frames(backend, tmp_path):
    """A header that promises a video stream, with the frame data cut off."""
    whole = tmp_path / "one.mp4"
    ffmpeg(
        "-f",
        "lavfi",
        "-i",
        "testsrc=size=64x64:rate=10",
        "-t",
        "1",
        "-c:v",
        "libx264",
        "-pix_fmt",
        "yuv420p",
        "-movflags",
        "+faststart",
        str(whole),
    )
    data = whole.read_bytes()
    empty = tmp_path / "no frames.mp4"
    empty.write_bytes(data[: data.find(b"mdat") + 8])
    from avatar_pipeline import cache
    from avatar_pipeline.config import CropConfig
    from avatar_pipeline.stages import crop

    with pytest.raises(InputError) as err:
        crop.run(cache.SubjectCache(tmp_path, "z"), empty, CropConfig(size=32))
    assert str(empty) in str(err.value)
    assert "zero frames" in str(err.value) or "not a readable video" in str(err.value)
    assert not (tmp_path / "z" / "crop").exists()

"""Video probing, decoding and encoding through ffmpeg-python.

Two ffmpeg builds are supported: the `ffmpeg`/`ffprobe` on PATH (e.g. Debian's package) and,
when there is none, the static ffmpeg shipped by the imageio-ffmpeg wheel, which needs no root
but has no ffprobe; probing then parses `ffmpeg -i`. Set AVATAR_PIPELINE_FFMPEG=system|bundled
to force one (the tests exercise both).

Frames are always streamed: nothing here holds more than one decoded frame.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import shutil
import subprocess
import threading
from fractions import Fraction
from pathlib import Path
from typing import Iterator

import ffmpeg
import numpy as np

from .errors import InputError

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class FfmpegTools:
    ffmpeg: str
    ffprobe: str | None
    source: str  # "system" or "bundled"


def ffmpeg_tools() -> FfmpegTools:
    choice = os.environ.get("AVATAR_PIPELINE_FFMPEG", "auto")
    if choice not in ("auto", "system", "bundled"):
        raise InputError("AVATAR_PIPELINE_FFMPEG", f"unknown value {choice!r}", "use auto, system or bundled")
    system = shutil.which("ffmpeg")
    if choice in ("auto", "system") and system:
        return FfmpegTools(system, shutil.which("ffprobe"), "system")
    if choice == "system":
        raise InputError(
            "ffmpeg", "no ffmpeg on PATH", "install it (apt-get install ffmpeg) or unset AVATAR_PIPELINE_FFMPEG"
        )
    import imageio_ffmpeg

    return FfmpegTools(imageio_ffmpeg.get_ffmpeg_exe(), None, "bundled")


@dataclasses.dataclass(frozen=True)
class VideoInfo:
    """What the container says about the first video stream. width/height are as displayed,
    i.e. after applying the rotation metadata (ffmpeg autorotates when decoding)."""

    path: str
    width: int
    height: int
    rotation: int  # degrees a player rotates the coded frame clockwise (the legacy `rotate` tag), 0/90/180/270
    fps: float  # nominal (average) frame rate
    duration: float | None
    codec: str
    coded_width: int
    coded_height: int
    container: str = ""  # ffmpeg's demuxer name, e.g. "mov,mp4,m4a,3gp,3g2,mj2"; "jpeg_pipe" for a still image
    # clockwise degrees applied after the metadata rotation to turn the face upright (crop's orientation
    # check); width and height above are after it
    upright_rotation: int = 0

    @property
    def expected_frames(self) -> int | None:
        return round(self.duration * self.fps) if self.duration and self.fps else None


def _rotation_from_degrees(deg: float) -> int:
    return int(round(deg)) % 360


def turned(info: VideoInfo, clockwise: int) -> VideoInfo:
    """The same video with every decoded frame turned a further `clockwise` degrees (0/90/180/270)."""
    clockwise %= 360
    width, height = (info.height, info.width) if clockwise in (90, 270) else (info.width, info.height)
    return dataclasses.replace(
        info, width=width, height=height, upright_rotation=(info.upright_rotation + clockwise) % 360
    )


# ffmpeg filters that turn a frame clockwise by 90, 180 and 270 degrees
_TURN_FILTERS = {
    90: [("transpose", {"dir": "clock"})],
    180: [("hflip", {}), ("vflip", {})],
    270: [("transpose", {"dir": "cclock"})],
}
# demuxers of single still images: a photo renamed .mp4 is one of these
_STILL_IMAGE_CONTAINERS = ("image2", "_pipe")


def _check_file(path: Path) -> None:
    if not path.exists():
        raise InputError(str(path), "file does not exist", "check the video path in config.yaml or on the command line")
    if path.is_dir():
        raise InputError(
            str(path), "is a folder, not a video file", "give the path of a video file (mp4, mov, mkv, ...)"
        )
    if path.stat().st_size == 0:
        raise InputError(str(path), "file is empty (0 bytes)", "re-copy or re-export the video")


def probe(path: str | os.PathLike) -> VideoInfo:
    path = Path(path)
    _check_file(path)
    tools = ffmpeg_tools()
    info = _probe_ffprobe(path, tools.ffprobe) if tools.ffprobe else _probe_ffmpeg_stderr(path, tools.ffmpeg)
    if info.container.endswith(_STILL_IMAGE_CONTAINERS):
        raise single_image_error(path, f"a still {info.codec} image ({info.width}x{info.height})")
    return info


def single_image_error(path: Path | str, what: str) -> InputError:
    return InputError(
        str(path),
        f"is {what}, not a video",
        "give a video of the head (at least a few seconds of a talking, moving face; the papers use "
        "1-3 minutes); a single photo cannot train an avatar with this pipeline",
    )


def _not_a_video(path: Path, detail: str) -> InputError:
    lines = [line.strip() for line in detail.splitlines() if line.strip()]
    return InputError(
        str(path),
        f"not a readable video ({' / '.join(lines[-2:])[-300:]})",
        "give a video file ffmpeg can decode (mp4/mov/mkv/avi); re-export it if it is damaged",
    )


def _probe_ffprobe(path: Path, ffprobe_exe: str) -> VideoInfo:
    try:
        data = ffmpeg.probe(str(path), cmd=ffprobe_exe)
    except ffmpeg.Error as e:
        raise _not_a_video(path, e.stderr.decode("utf-8", "replace")) from None
    streams = [
        s
        for s in data.get("streams", [])
        if s.get("codec_type") == "video" and not s.get("disposition", {}).get("attached_pic")
    ]
    if not streams:
        raise _not_a_video(path, "no video stream")
    s = streams[0]
    rotation = 0
    for side in s.get("side_data_list", []) or []:
        if "rotation" in side:
            # ffprobe reports the display matrix's counter-clockwise angle; normalise to clockwise degrees
            rotation = _rotation_from_degrees(-float(side["rotation"]))
    if "rotate" in s.get("tags", {}):
        rotation = _rotation_from_degrees(-float(s["tags"]["rotate"]))
    fps = _parse_rate(s.get("avg_frame_rate")) or _parse_rate(s.get("r_frame_rate"))
    duration = s.get("duration") or data.get("format", {}).get("duration")
    w, h = int(s["width"]), int(s["height"])
    dw, dh = (h, w) if rotation in (90, 270) else (w, h)
    return VideoInfo(
        str(path),
        dw,
        dh,
        rotation,
        fps or 0.0,
        float(duration) if duration else None,
        s.get("codec_name", "?"),
        w,
        h,
        data.get("format", {}).get("format_name", ""),
    )


def _parse_rate(text: str | None) -> float | None:
    if not text or text in ("0/0", "0"):
        return None
    try:
        value = float(Fraction(text))
    except (ValueError, ZeroDivisionError):
        return None
    return value if value > 0 else None


_STREAM_RE = re.compile(r"Stream #\d+:\d+.*?: Video: (\w+).*?, (\d+)x(\d+)")
_FPS_RE = re.compile(r"([\d.]+) fps")
_TBR_RE = re.compile(r"([\d.]+k?) tbr")
_DURATION_RE = re.compile(r"Duration: (\d+):(\d+):([\d.]+)")
_ROTATION_RE = re.compile(r"rotation of (-?[\d.]+) degrees")
_CONTAINER_RE = re.compile(r"Input #0, ([^\s]+), from")


def _probe_ffmpeg_stderr(path: Path, ffmpeg_exe: str) -> VideoInfo:
    """Probe without ffprobe: `ffmpeg -i` prints the stream summary on stderr."""
    proc = subprocess.run([ffmpeg_exe, "-hide_banner", "-i", str(path)], capture_output=True)
    text = proc.stderr.decode("utf-8", "replace")
    lines = [line for line in text.splitlines() if "Video:" in line and "attached pic" not in line]
    m = _STREAM_RE.search(lines[0]) if lines else None
    if not m:
        raise _not_a_video(path, text)
    codec, w, h = m.group(1), int(m.group(2)), int(m.group(3))
    fps_m = _FPS_RE.search(lines[0]) or _TBR_RE.search(lines[0])
    fps = float(fps_m.group(1).replace("k", "e3")) if fps_m else 0.0
    dur_m = _DURATION_RE.search(text)
    duration = (int(dur_m.group(1)) * 3600 + int(dur_m.group(2)) * 60 + float(dur_m.group(3))) if dur_m else None
    rot_m = _ROTATION_RE.search(text)
    rotation = _rotation_from_degrees(-float(rot_m.group(1))) if rot_m else 0
    dw, dh = (h, w) if rotation in (90, 270) else (w, h)
    container_m = _CONTAINER_RE.search(text)
    return VideoInfo(
        str(path), dw, dh, rotation, fps, duration, codec, w, h, container_m.group(1).rstrip(",") if container_m else ""
    )


_SHOWINFO_RE = re.compile(r"\bn:\s*(\d+)\s+pts:\s*(-?\d+)\s+pts_time:\s*(-?[\d.e+-]+)")


@dataclasses.dataclass
class DecodeReport:
    """Filled while decoding: per-frame source timestamps and any decoder errors."""

    timestamps: list[float] = dataclasses.field(default_factory=list)
    errors: list[str] = dataclasses.field(default_factory=list)
    returncode: int | None = None


def iter_frames(
    info: VideoInfo,
    filters: list[tuple[str, dict | tuple]] | None = None,
    out_size: tuple[int, int] | None = None,
    report: DecodeReport | None = None,
) -> Iterator[np.ndarray]:
    """Yield every decoded frame (RGB uint8, HxWx3) of `info.path`, in order, without resampling
    the frame rate (variable frame rate clips keep their true frames; timestamps go to `report`).

    `filters` is a list of (ffmpeg filter name, args) applied after autorotation and the upright turn;
    `out_size` is the (width, height) the filters produce (default: the displayed size).
    """
    tools = ffmpeg_tools()
    report = report if report is not None else DecodeReport()
    width, height = out_size or (info.width, info.height)
    stream = ffmpeg.input(info.path).video.filter("showinfo")
    for name, args in _TURN_FILTERS.get(info.upright_rotation, []) + list(filters or []):
        stream = stream.filter(name, *args) if isinstance(args, tuple) else stream.filter(name, **args)
    out = ffmpeg.output(stream, "pipe:", format="rawvideo", pix_fmt="rgb24", fps_mode="passthrough", an=None)
    cmd = [tools.ffmpeg, "-hide_banner", "-nostdin", "-loglevel", "info"] + ffmpeg.get_args(out)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    drain = threading.Thread(target=_read_stderr, args=(proc.stderr, report), daemon=True)
    drain.start()
    frame_bytes = width * height * 3
    try:
        while True:
            buf = proc.stdout.read(frame_bytes)
            if len(buf) < frame_bytes:
                break
            yield np.frombuffer(buf, np.uint8).reshape(height, width, 3)
    finally:
        if proc.poll() is None:
            proc.stdout.close()
            proc.kill()
        proc.wait()
        drain.join(timeout=5)
        report.returncode = proc.returncode


_IGNORED_STDERR = ("Last message repeated",)


def _read_stderr(pipe, report: DecodeReport) -> None:
    for raw in iter(pipe.readline, b""):
        line = raw.decode("utf-8", "replace").rstrip()
        m = _SHOWINFO_RE.search(line)
        if m:
            report.timestamps.append(float(m.group(3)))
        elif re.search(r"\b(error|invalid|corrupt|truncat)", line, re.I) and not line.startswith(_IGNORED_STDERR):
            report.errors.append(line)


def check_decode(info: VideoInfo, report: DecodeReport, decoded: int) -> None:
    """Raise on a clip that decoded to nothing or stopped early; warn on recoverable decoder noise."""
    if decoded == 0:
        detail = "; ".join(report.errors[:3]) or "ffmpeg produced no frames"
        raise InputError(
            info.path,
            f"zero frames could be decoded ({detail})",
            "check the file plays; re-export it, e.g. ffmpeg -i in.mp4 -c:v libx264 out.mp4",
        )
    expected = info.expected_frames
    if report.errors and expected and decoded < 0.9 * expected:
        raise InputError(
            info.path,
            f"corrupt or truncated mid-stream: decoded {decoded} of about {expected} frames; "
            f"ffmpeg said: {report.errors[0][:200]}",
            "re-export the clip, or trim it before the damage (ffmpeg -i in.mp4 -t SECONDS -c copy out.mp4)",
        )
    if report.errors:
        log.warning(
            "%s: ffmpeg reported %d decoder message(s), first: %s (decoded %d frames, continuing)",
            info.path,
            len(report.errors),
            report.errors[0][:200],
            decoded,
        )


class VideoWriter:
    """Encode RGB frames to an H.264 mp4 (yuv420p so browsers play it)."""

    def __init__(self, path: str | os.PathLike, width: int, height: int, fps: float = 25.0, crf: int = 20):
        self.path = Path(path)
        # yuv420p needs even sizes
        self.width, self.height = width - width % 2, height - height % 2
        tools = ffmpeg_tools()
        stream = ffmpeg.input("pipe:", format="rawvideo", pix_fmt="rgb24", s=f"{width}x{height}", framerate=fps)
        if (self.width, self.height) != (width, height):
            stream = stream.filter("crop", self.width, self.height, 0, 0)
        out = ffmpeg.output(
            stream, str(self.path), vcodec="libx264", pix_fmt="yuv420p", crf=crf, movflags="+faststart", f="mp4"
        )
        cmd = [tools.ffmpeg, "-hide_banner", "-nostdin", "-loglevel", "error", "-y"] + ffmpeg.get_args(out)
        self._proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stderr=subprocess.PIPE)
        self._shape = (height, width, 3)

    def write(self, frame: np.ndarray) -> None:
        if frame.shape != self._shape or frame.dtype != np.uint8:
            raise ValueError(f"frame of shape {frame.shape} {frame.dtype}, expected {self._shape} uint8")
        self._proc.stdin.write(np.ascontiguousarray(frame).tobytes())

    def close(self) -> None:
        self._proc.stdin.close()
        err = self._proc.stderr.read().decode("utf-8", "replace")
        if self._proc.wait() != 0:
            raise RuntimeError(f"ffmpeg failed to write {self.path}: {err[-500:]}")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

"""What a person watching `run`, `demo` or `workflow` sees in the terminal.

Each rule sends its stage's output, progress bars included, to its own log file, so Snakemake alone
shows nothing but `Select jobs to execute...` while a stage works. This module sits between Snakemake
and the terminal: it passes Snakemake's lines through (without the long `Shell command:` lines, which
stay in Snakemake's own log under .snakemake/log), follows which jobs are running and where their logs
are, and shows how far each one is from the last progress bar in its log: stage, subject, counts,
time left, and a training job's loss and PSNR.

On a terminal that is one status line, redrawn every second under Snakemake's output. When the output
is not a terminal (a file, a SLURM batch log) a status line is printed only every `interval` seconds
and only when it changed, so long runs do not flood the output.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import IO

from .runtime import clock

# one tqdm bar as the stages write it to a log file, e.g.
# "nerface: train:  35%|███▌      | 523/1500 [01:40<03:07,  5.20step/s, loss=0.0123, psnr=21.3]"
# "crop: detect faces: 120frame [00:02, 50.1frame/s]"                    (total unknown)
_BAR = re.compile(
    r"(?P<desc>[^\r\n|]*?):\s+(?:\d+%\|[^|\r\n]*\|\s*)?(?P<n>\d+)(?:/(?P<total>\d+))?\s*[a-z]*\s*"
    r"\[(?P<elapsed>[\d:]+)(?:<(?P<left>[\d:?]+))?(?P<rest>[^\]\r\n]*)\]"
)
_RULE_START = re.compile(r"^(?:local)?rule (\w+):$")
_FINISHED = re.compile(r"^Finished jobid: (\d+)")
_ERROR = re.compile(r"^Error in rule (\w+):$")
_TAIL_BYTES = 8192


@dataclasses.dataclass
class Bar:
    """The last state of a progress bar."""

    desc: str
    n: int
    total: int | None
    left: str | None
    postfix: dict[str, str]

    def describe(self) -> str:
        count = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        left = self.left
        budget = self.postfix.get("budget")
        if budget and (left is None or _seconds(budget) < _seconds(left)):
            left = budget  # training stops at its time budget before its step count
        parts = [self.desc, count]
        if left and left != "?":
            parts.append(f"{left} left")
        parts += [f"{key} {value}" for key, value in self.postfix.items() if key in ("loss", "psnr")]
        return " ".join(parts)


def _seconds(text: str) -> float:
    try:
        value = 0.0
        for part in text.split(":"):
            value = value * 60 + float(part)
        return value
    except ValueError:
        return float("inf")


def last_bar(text: str) -> Bar | None:
    """The most recent progress bar in a stretch of log text (bars are separated by carriage returns)."""
    for segment in reversed(re.split(r"[\r\n]", text)):
        matches = list(_BAR.finditer(segment))
        if matches:
            m = matches[-1]
            postfix = dict(re.findall(r"(\w+)=([^,\s]+)", m.group("rest")))
            total = int(m.group("total")) if m.group("total") else None
            return Bar(m.group("desc").strip(), int(m.group("n")), total, m.group("left"), postfix)
    return None


def read_tail(path: Path, size: int = _TAIL_BYTES) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - size))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


@dataclasses.dataclass
class Job:
    jobid: int
    rule: str
    started: float
    log: Path | None = None
    wildcards: str = ""

    def label(self) -> str:
        values = [part.split("=", 1)[-1] for part in self.wildcards.split(", ") if part]
        return f"{self.rule}[{'/'.join(values)}]" if values else self.rule


class RunMonitor:
    """Feed it Snakemake's output line by line; it echoes the lines and keeps the status line."""

    def __init__(
        self,
        out: IO[str] | None = None,
        workdir: Path | None = None,
        interval: float | None = None,
        live: bool | None = None,
    ):
        self.out = out or sys.stderr
        self.workdir = workdir or Path.cwd()
        self.live = self.out.isatty() if live is None else live
        self.interval = interval if interval is not None else (1.0 if self.live else 60.0)
        self.running: dict[int, Job] = {}
        self._block: Job | None = None  # the job whose description Snakemake is printing
        self._block_is_error = False  # that description reports a failure, not a start
        self._lock = threading.Lock()
        self._shown = ""  # the status line on screen (live) or last printed (not live)
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None

    # -- Snakemake's output -------------------------------------------------------------------------
    def feed(self, line: str) -> None:
        line = line.rstrip("\n")
        self._follow(line)
        if line.startswith("Shell command:"):
            return
        with self._lock:
            self._clear()
            self.out.write(line + "\n")
            self._draw()

    def _follow(self, line: str) -> None:
        """Track running jobs from Snakemake's job blocks ("rule crop:" then indented "log:", "jobid:",
        "wildcards:" lines), its "Finished jobid: N" lines and its "Error in rule X:" blocks."""
        stripped = line.strip()
        finished = _FINISHED.match(stripped)
        if finished:
            self.running.pop(int(finished.group(1)), None)
        start, error = _RULE_START.match(stripped), _ERROR.match(stripped)
        if start or error:
            self._block = Job(-1, (start or error).group(1), time.time())
            self._block_is_error = bool(error)
            return
        if self._block is None:
            return
        if not line.startswith("    "):
            self._block = None
            return
        key, _, value = stripped.partition(":")
        value = value.strip()
        if key == "jobid" and value.isdigit():
            self._block.jobid = int(value)
            if self._block_is_error:
                self.running.pop(self._block.jobid, None)
            else:
                self.running[self._block.jobid] = self._block
        elif key == "log":
            self._block.log = self.workdir / re.sub(r"\s+\(check log file.*$", "", value)
        elif key == "wildcards":
            self._block.wildcards = value

    # -- the status line ------------------------------------------------------------------------------
    def status(self) -> str:
        jobs = sorted(self.running.values(), key=lambda j: j.started)
        if not jobs:
            return ""
        parts = []
        for job in jobs[:3]:
            bar = last_bar(read_tail(job.log)) if job.log else None
            since = clock(time.time() - job.started)
            parts.append(f"{job.label()} {bar.describe() if bar else 'started'} ({since})")
        more = f" +{len(jobs) - 3} more" if len(jobs) > 3 else ""
        return f"running {len(jobs)}: " + " | ".join(parts) + more

    def tick(self) -> None:
        with self._lock:
            if self.live:
                self._clear()
                self._draw()
            else:
                text = self.status()
                if text and text != self._shown:
                    self.out.write(f"[progress {time.strftime('%H:%M:%S')}] {text}\n")
                    self.out.flush()
                    self._shown = text

    def _clear(self) -> None:
        if self.live and self._shown:
            self.out.write("\r\033[K")
            self._shown = ""

    def _draw(self) -> None:
        if not self.live:
            return
        text = self.status()
        width = shutil.get_terminal_size((120, 24)).columns - 1
        self._shown = text[:width]
        self.out.write(self._shown)
        self.out.flush()

    def start(self) -> "RunMonitor":
        def loop():
            while not self._stop.wait(self.interval):
                self.tick()

        self._ticker = threading.Thread(target=loop, daemon=True)
        self._ticker.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._ticker:
            self._ticker.join(timeout=5)
        with self._lock:
            self._clear()
            self.out.flush()

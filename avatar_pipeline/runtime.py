"""Process-wide conveniences: logging set-up and progress bars that read well in Snakemake logs."""

from __future__ import annotations

import functools
import logging
import platform
import sys
from typing import Iterable, Iterator, TypeVar

from tqdm import tqdm

T = TypeVar("T")


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def progress(items: Iterable[T], total: int | None, desc: str, unit: str = "frame", initial: int = 0) -> Iterator[T]:
    """A progress bar on stderr; in a log file (not a terminal) it updates every few seconds. `initial`:
    the count already done (a resumed run)."""
    interactive = sys.stderr.isatty()
    return tqdm(
        items,
        total=total,
        desc=desc,
        unit=unit,
        file=sys.stderr,
        dynamic_ncols=True,
        mininterval=0.2 if interactive else 5.0,
        leave=True,
        initial=initial,
    )


def clock(seconds: float) -> str:
    """A duration as m:ss, or h:mm:ss from an hour (as tqdm writes them)."""
    seconds = max(0, int(seconds))
    minutes, seconds = divmod(seconds, 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{seconds:02d}" if minutes >= 60 else f"{minutes}:{seconds:02d}"


def torch_device():
    """CUDA when present, else the CPU."""
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def matmul_gflops(dtype=None) -> float:
    """This machine's matrix-product throughput (GFLOP/s, on the CPU, a 8192x256 by 256x256 product as in
    the NeRF MLPs), recorded beside timings: the machines here differ by 2x or more."""
    import time

    import torch

    dtype = dtype or torch.float32
    a, b = torch.randn(8192, 256, dtype=dtype), torch.randn(256, 256, dtype=dtype)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(5):  # the best of five rounds: the first ones pay for thread start-up and frequency ramps
        start = time.perf_counter()
        for _ in range(10):
            a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * 8192 * 256 * 256 * 10 / best / 1e9


@functools.cache
def cpu_info() -> dict:
    """This machine's CPU model and whether it multiplies bf16 natively (AVX512-BF16 or AMX), which
    decides NeRFace's `precision: auto` and makes CPU timings comparable across machines."""
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        return {"model": platform.processor() or platform.machine(), "native_bf16": False}
    model = next(
        (line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")),
        platform.machine(),
    )
    return {"model": model, "native_bf16": "avx512_bf16" in text or "amx_bf16" in text}

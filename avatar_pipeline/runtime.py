"""Process-wide conveniences: logging set-up and progress bars that read well in Snakemake logs."""
from __future__ import annotations

import logging
import sys
from typing import Iterable, Iterator, TypeVar

from tqdm import tqdm

T = TypeVar("T")


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def progress(items: Iterable[T], total: int | None, desc: str) -> Iterator[T]:
    """A progress bar on stderr; in a log file (not a terminal) it updates every few seconds."""
    interactive = sys.stderr.isatty()
    return tqdm(items, total=total, desc=desc, unit="frame", file=sys.stderr, dynamic_ncols=True,
                mininterval=0.2 if interactive else 5.0, leave=True)


def torch_device():
    """CUDA when present, else the CPU."""
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")

"""Helper processes (image decoding, CRF) that never outlive the process that started them.

A worker process is tied to its parent twice: on Linux the kernel sends it SIGKILL when the
parent dies (``PR_SET_PDEATHSIG``, set through ``prctl``), and on every platform a daemon thread
in the worker exits it when its parent process id changes (the parent died and the worker was
re-parented). So ``kill -9`` of a batch run leaves no decoder behind holding memory.

:func:`iter_decoded` yields decoded images in input order, from DataLoader worker processes or in
the calling process (``workers=0``); decode errors travel back as values, never as exceptions.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generator, Optional, Sequence, cast

import numpy as np

from ..imageio import DEFAULT_MAX_PIXELS, ImageDecodeError, load_image

__all__ = ["DecodedImage", "iter_decoded", "die_with_parent", "worker_initializer"]

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
_WATCHDOG_INTERVAL_S = 1.0


@dataclass
class DecodedImage:
    """One input after decoding: ``image`` (H×W×3 uint8) or ``error`` (why it could not be read)."""

    path: str
    name: str  # output name: relative path without extension (or with it, ``--keep-ext``)
    image: Optional[np.ndarray]
    error: Optional[str]
    decode_s: float


def _set_pdeathsig(sig: int) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watchdog(parent_pid: int) -> None:
    while True:
        time.sleep(_WATCHDOG_INTERVAL_S)
        if os.getppid() != parent_pid:
            os._exit(1)


def die_with_parent(parent_pid: int) -> None:
    """Make the calling (worker) process exit when process ``parent_pid`` dies.

    Call it first thing in a worker. Exits at once if the parent is already gone.
    """
    _set_pdeathsig(signal.SIGKILL)
    if os.getppid() != parent_pid:  # the parent died before the kernel could be told
        os._exit(1)
    threading.Thread(target=_watchdog, args=(parent_pid,), name="parent-watchdog", daemon=True).start()


def worker_initializer(parent_pid: Optional[int] = None):
    """A picklable initializer for ``ProcessPoolExecutor(initializer=...)`` /
    ``DataLoader(worker_init_fn=...)`` that ties each worker to this process."""
    return functools.partial(_init_worker, os.getpid() if parent_pid is None else parent_pid)


def _init_worker(parent_pid: int, *_args) -> None:
    # Ctrl-C in a terminal (or a SIGTERM to the process group) reaches every worker too: the
    # parent decides how to stop and shuts its workers down, so a worker must not die mid-item
    # with a traceback of its own; if the parent dies instead, the worker goes with it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    die_with_parent(parent_pid)


class _Decoder:
    """Map-style dataset over ``(path, name)`` items (picklable for worker processes)."""

    def __init__(self, items: Sequence[tuple[Path, str]], max_pixels: int):
        self.items, self.max_pixels = list(items), max_pixels

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> DecodedImage:
        path, name = self.items[i]
        t0 = time.perf_counter()
        try:
            img = load_image(path, max_pixels=self.max_pixels)
            return DecodedImage(str(path), name, img, None, time.perf_counter() - t0)
        except ImageDecodeError as e:
            return DecodedImage(str(path), name, None, e.reason, time.perf_counter() - t0)


def _identity(x):
    return x


def iter_decoded(items: Sequence[tuple[Path, str]], workers: int = 2, max_pixels: int = DEFAULT_MAX_PIXELS,
                 prefetch: int = 4) -> Generator[DecodedImage, None, None]:
    """Decode ``items`` in order with ``workers`` processes (0: in this process).

    At most ``workers * prefetch`` decoded images wait in memory. The workers are shut down when
    the iterator is exhausted, closed or garbage-collected, and die with this process if it is
    killed.
    """
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    ds = _Decoder(items, max_pixels)
    if workers == 0 or len(ds) == 0:
        for i in range(len(ds)):
            yield ds[i]
        return
    from torch.utils.data import DataLoader

    loader: Any = DataLoader(cast(Any, ds), batch_size=None, shuffle=False, num_workers=min(workers, len(ds)),
                             prefetch_factor=prefetch, collate_fn=_identity, worker_init_fn=worker_initializer())
    it = iter(loader)
    try:
        yield from it
    finally:
        shutdown = getattr(it, "_shutdown_workers", None)
        if shutdown is not None:  # at once, not whenever the iterator happens to be collected
            shutdown()

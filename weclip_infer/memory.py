"""Heap policy of a CPU process: training, batch segmentation, serving (glibc; no-ops elsewhere).

A training step allocates and frees hundreds of megabytes of temporaries, many of them larger
than glibc's mmap threshold (32 MB at most, e.g. the ``B×C×H×W`` upsampled logits). Each such
tensor is a fresh ``mmap``: the kernel zero-fills every page on first touch, and those page
faults cost more than the arithmetic of the element-wise ops on it (an ``exp`` over millions of
floats is several times slower on fresh pages than on reused memory). ``reuse_freed_memory``
raises the mmap and trim thresholds, so freed blocks stay in the heap and the next step reuses
them; ``trim_heap`` hands free pages back (after the model is built, whose loading buffers are
never reused).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys
from functools import lru_cache

__all__ = ["trim_heap", "reuse_freed_memory"]


# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


@lru_cache(maxsize=2)
def _libc_fn(name: str):
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        fn = getattr(libc, name)
    except (OSError, AttributeError):  # musl and other libcs have no malloc_trim/mallopt
        return None
    fn.argtypes = [ctypes.c_size_t] if name == "malloc_trim" else [ctypes.c_int, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def reuse_freed_memory(mmap_threshold: int = 1 << 30, trim_threshold: int = 1 << 30, *, device=None) -> bool:
    """Keep freed blocks up to ``mmap_threshold`` bytes in the heap for reuse, and only return
    the heap's top to the OS when more than ``trim_threshold`` bytes are free there. Process-wide;
    call once before a training or inference loop. With ``device`` (``torch.device`` or string)
    it only applies to CPU work (a CUDA process keeps glibc's defaults). Returns False where it did
    nothing (not a CPU device, or no glibc ``mallopt``)."""
    if device is not None and str(device).split(":")[0] != "cpu":
        return False
    fn = _libc_fn("mallopt")
    if fn is None:
        return False
    return bool(fn(_M_MMAP_THRESHOLD, int(mmap_threshold))) and bool(fn(_M_TRIM_THRESHOLD, int(trim_threshold)))


def trim_heap() -> bool:
    """Release free heap pages to the OS. Returns True if memory was released; a no-op (False)
    where the C library has no ``malloc_trim``."""
    fn = _libc_fn("malloc_trim")
    return bool(fn(0)) if fn is not None else False

"""How many compute threads a process should use: the CPUs it may really run on, shared fairly.

PyTorch (and OpenMP) default to one thread per core of the machine, ignoring CPU affinity masks
(``taskset``, container cpusets) and CPU quotas (Docker ``--cpus``, Kubernetes limits). Several
processes doing that at once on the same cores spend most of their time waiting for each other;
a run can become many times slower than with fewer threads. :func:`available_cpus` reads what
this process may use, :func:`plan_threads` divides it among the processes that compute at the
same time, and :func:`apply_threads` sets it.
"""
from __future__ import annotations

import ctypes
import logging
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

__all__ = ["CpuBudget", "ThreadPlan", "available_cpus", "cgroup_cpu_limit", "plan_threads", "apply_threads",
           "release_idle_threads"]

log = logging.getLogger(__name__)

_CGROUP_ROOT = Path("/sys/fs/cgroup")


@dataclass(frozen=True)
class CpuBudget:
    """``cpus``: whole CPUs this process may use; ``affinity``: CPUs in its affinity mask;
    ``quota``: the cgroup CPU quota in CPUs (``None``: no quota)."""

    cpus: int
    affinity: int
    quota: Optional[float]

    def describe(self) -> str:
        q = "no CPU quota" if self.quota is None else f"CPU quota {self.quota:g}"
        return f"{self.cpus} CPU(s) available ({self.affinity} in the affinity mask, {q})"


@dataclass(frozen=True)
class ThreadPlan:
    """``threads``: intra-op threads for this process; ``reason``: how they were chosen."""

    threads: int
    reason: str


def _read(path: Path) -> Optional[str]:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _v2_quota(path: Path) -> Optional[float]:
    text = _read(path / "cpu.max")
    if not text:
        return None
    parts = text.split()
    if parts[0] == "max" or len(parts) < 2:
        return None
    try:
        quota, period = int(parts[0]), int(parts[1])
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def _v1_quota(path: Path) -> Optional[float]:
    q, p = _read(path / "cpu.cfs_quota_us"), _read(path / "cpu.cfs_period_us")
    try:
        quota, period = int(q or "-1"), int(p or "0")
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def cgroup_cpu_limit(root: Path = _CGROUP_ROOT, proc_cgroup: Path = Path("/proc/self/cgroup")) -> Optional[float]:
    """The tightest CPU quota (in CPUs) of this process's cgroup and its ancestors, ``None`` if none.

    Reads cgroup v2 ``cpu.max`` and v1 ``cpu.cfs_quota_us``/``cpu.cfs_period_us``; inside a
    container the cgroup is usually mounted at the root, which is checked too.
    """
    limits: list[float] = []
    text = _read(proc_cgroup) or ""
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hid, controllers, rel = parts
        rel = rel.lstrip("/")
        if hid == "0" and controllers == "":
            base, reader = root, _v2_quota
        elif "cpu" in controllers.split(","):
            base = root / controllers if (root / controllers).is_dir() else root / "cpu"
            reader = _v1_quota
        else:
            continue
        candidates = [base]
        p = Path(rel)
        while str(p) not in ("", "."):
            candidates.append(base / p)
            p = p.parent
        for c in candidates:
            v = reader(c)
            if v is not None:
                limits.append(v)
    return min(limits) if limits else None


def available_cpus() -> CpuBudget:
    """CPUs this process may use: the affinity mask, capped by the cgroup quota (rounded up, ≥ 1)."""
    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = os.cpu_count() or 1
    quota = cgroup_cpu_limit()
    cpus = affinity if quota is None else min(affinity, max(1, math.ceil(quota - 1e-9)))
    return CpuBudget(max(1, cpus), affinity, quota)


def plan_threads(processes: int = 1, requested: Optional[int] = None, budget: Optional[CpuBudget] = None) -> ThreadPlan:
    """Intra-op threads for one of ``processes`` processes computing at the same time on this
    machine: ``available CPUs // processes`` (at least 1), or ``requested`` when given."""
    if requested is not None:
        if requested < 1:
            raise ValueError(f"--threads must be >= 1, got {requested}")
        return ThreadPlan(requested, f"{requested} thread(s) as requested")
    if processes < 1:
        raise ValueError(f"processes must be >= 1, got {processes}")
    budget = budget or available_cpus()
    threads = max(1, budget.cpus // processes)
    share = f" shared by {processes} processes" if processes > 1 else ""
    return ThreadPlan(threads, f"{threads} thread(s): {budget.describe()}{share}")


def apply_threads(plan: ThreadPlan) -> None:
    """Set PyTorch's intra-op threads (ONNX Runtime sessions created afterwards follow it) and
    ``OMP_NUM_THREADS`` for child processes that do not set their own."""
    import torch

    torch.set_num_threads(plan.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(plan.threads))
    log.info("compute threads: %s", plan.reason)


_OPENMP: Optional[ctypes.CDLL] = None
_OPENMP_FINAL = False  # looked up with PyTorch loaded: the answer stands


def _openmp() -> Optional[ctypes.CDLL]:
    """GNU OpenMP as loaded in this process (PyTorch's), if it has ``omp_pause_resource_all``
    (OpenMP 5.0); else ``None``. Looked up until PyTorch is loaded (which loads the runtime)."""
    global _OPENMP, _OPENMP_FINAL
    if not _OPENMP_FINAL:
        final = "torch" in sys.modules
        _OPENMP = _find_openmp()
        _OPENMP_FINAL = final or _OPENMP is not None
    return _OPENMP


def _find_openmp() -> Optional[ctypes.CDLL]:
    # GNU OpenMP (PyTorch's Linux wheels): its pause frees the calling thread's team only
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if os.path.basename(line.split()[-1]).startswith("libgomp")}
    except OSError:
        return None
    for path in sorted(paths):
        try:
            lib = ctypes.CDLL(path)  # already loaded: the same library, not a second copy
            lib.omp_pause_resource_all.argtypes, lib.omp_pause_resource_all.restype = [ctypes.c_int], ctypes.c_int
        except (OSError, AttributeError):
            continue
        return lib
    return None


def release_idle_threads() -> bool:
    """Let the calling thread's idle OpenMP worker threads exit (GNU OpenMP's
    ``omp_pause_resource_all``, soft, which frees the calling thread's team and no other); its
    next parallel operation starts them again. Returns whether it did (``False`` with other
    OpenMP runtimes, where it does nothing).

    Each thread that runs a parallel PyTorch operation keeps its own team of OpenMP workers. When
    the process holds more such workers than it has CPUs, the runtime stops letting waiting
    workers spin and puts them to sleep at every synchronisation, which makes workloads of many
    short operations (the torch DenseCRF) about 1.5× slower. A thread about to block while another
    thread computes calls this first, so that only the computing thread's team exists.
    """
    lib = _openmp()
    return lib is not None and lib.omp_pause_resource_all(1) == 0  # omp_pause_soft

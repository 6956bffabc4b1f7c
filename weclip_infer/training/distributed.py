"""Multi-process training helpers (``torchrun`` + DistributedDataParallel).

Launch with ``torchrun --nproc_per_node N -m weclip_infer.train --config ...``. ``torchrun`` sets
``RANK``/``WORLD_SIZE``/``LOCAL_RANK``; :func:`init_distributed` then joins the process group
(NCCL on CUDA, gloo on CPU) and picks ``cuda:LOCAL_RANK``. Only rank 0 logs and writes files.

The reference trains on one GPU; with N processes the global batch is N × batch_size,
each process seeing a disjoint shard of every epoch (see :class:`ResumableSampler`).
"""
from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from typing import Any, Iterator, List

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

__all__ = ["DistInfo", "init_distributed", "cleanup_distributed", "ResumableSampler", "all_reduce_sum",
           "all_reduce_mean", "all_gather_objects", "barrier"]


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    initialized_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _pick_device(device: str, local_rank: int, distributed: bool) -> torch.device:
    d = (device or "auto").lower()
    if d == "auto":
        d = "cuda" if torch.cuda.is_available() else "cpu"
    if d.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError("train.device: CUDA requested but not available (use --device cpu)")
        if d == "cuda":
            return torch.device("cuda", local_rank if distributed else torch.cuda.current_device())
        return torch.device(d)
    return torch.device("cpu")


def init_distributed(device: str = "auto", backend: str = "auto") -> DistInfo:
    """Read the ``torchrun`` environment, join the process group when ``WORLD_SIZE > 1``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = _pick_device(device, local, world > 1)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    info = DistInfo(rank=rank, world_size=world, local_rank=local, device=dev)
    if world > 1:
        if dist.is_initialized():
            info.rank, info.world_size = dist.get_rank(), dist.get_world_size()
        else:
            be = backend if backend != "auto" else ("nccl" if dev.type == "cuda" else "gloo")
            if be == "nccl" and dev.type != "cuda":
                raise RuntimeError("train.dist_backend=nccl needs CUDA devices; use gloo on CPU")
            kw: dict[str, Any] = {}
            if be == "nccl":
                kw["device_id"] = dev
            dist.init_process_group(backend=be, **kw)
            info.initialized_here = True
    return info


def cleanup_distributed(info: DistInfo, finished: bool = False) -> None:
    """Leave the process group joined by :func:`init_distributed`.

    After a run that ``finished`` on every process, the processes first meet at a barrier and
    drop unreachable objects (a ``DistributedDataParallel`` wrapper's reducer holds the group),
    so no process tears down its connections while a peer is still using them and no group
    outlives :func:`torch.distributed.destroy_process_group` into interpreter shutdown. After an
    error there is no barrier: the peers may never arrive.
    """
    if not (info.initialized_here and dist.is_initialized()):
        return
    if finished:
        gc.collect()
        barrier()
    dist.destroy_process_group()


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if _active():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """In-place sum over processes (no-op in a single process)."""
    if _active():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    if _active():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= dist.get_world_size()
    return t


def all_gather_objects(obj: Any) -> List[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` (``[obj]`` in a single process)."""
    if not _active():
        return [obj]
    out: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


class ResumableSampler(Sampler[int]):
    """Epoch-seeded shuffling, sharded over processes, that can start mid-epoch.

    Epoch ``e``'s order is ``torch.randperm(n)`` from a generator seeded with ``seed + e`` (what
    ``DistributedSampler`` does); the tail is dropped so every process gets ``n // world_size``
    indices (``rank::world_size`` of the permutation). ``set_epoch(e, start)`` skips the first
    ``start`` indices of this process's shard, so a resumed run sees exactly the batches the
    uninterrupted run would have seen. Single process: ``world_size=1``.
    """

    def __init__(self, n: int, seed: int, rank: int = 0, world_size: int = 1, shuffle: bool = True):
        if n < 1:
            raise ValueError("empty dataset")
        self.n, self.seed, self.rank, self.world_size = int(n), int(seed), int(rank), int(world_size)
        self.shuffle = shuffle
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = int(epoch), int(start)

    @property
    def per_rank(self) -> int:
        return self.n // self.world_size

    def indices(self) -> List[int]:
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        total = self.per_rank * self.world_size
        return order[:total][self.rank:total:self.world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices()[self.start:])

    def __len__(self) -> int:
        return max(0, self.per_rank - self.start)


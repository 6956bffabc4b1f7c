"""bf16 linear layers of the frozen CLIP with their weights cast (and on CPU packed) once.

Under bf16 autocast, every ``F.linear`` call casts its fp32 weight to bf16 (one copy kernel per
weight per call on a GPU) and, on the CPU, oneDNN then reorders it into its blocked layout before
multiplying: for ViT-B/16 that is 85 M weights cast (and repacked) at every forward. The frozen
CLIP's weights never change while it runs, so :class:`PackedLinears` keeps each one ready:

* on CPUs with native bf16, cast and reordered for oneDNN (``torch.ops.mkldnn``'s
  ``_reorder_linear_weight`` / ``_linear_pointwise``, the pair PyTorch's own CPU compiler uses
  for frozen weights);
* on CUDA devices, cast to bf16 (``F.linear`` on the bf16 copies: what autocast runs, minus the
  cast kernels).

The products are bit-identical to autocast's ``F.linear``: the same bf16 operands and the same
kernel; only the per-call cast (and reorder) is gone.

Cost: a bf16 copy of each weight (2 bytes per weight, 170 MB for ViT-B/16's image tower), built
on first use. An entry is rebuilt when its weight changes (a new tensor, storage, shape or
in-place write), and the cache is emptied when the owning module moves or changes dtype. Where
neither applies (AVX2-only CPUs, other builds and devices), :meth:`PackedLinears.linear` is
plain ``F.linear``.
"""
from __future__ import annotations

import functools
import threading
import weakref
from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["PackedLinears", "packed_bf16_available"]


@functools.lru_cache(maxsize=1)
def packed_bf16_available() -> bool:
    """Whether this PyTorch build and CPU run oneDNN bf16 products with pre-packed weights."""
    try:
        ops = torch.ops.mkldnn
        return bool(torch.backends.mkldnn.is_available() and ops._is_mkldnn_bf16_supported()
                    and hasattr(ops, "_reorder_linear_weight") and hasattr(ops, "_linear_pointwise"))
    except (AttributeError, RuntimeError):
        return False


def _signature(t: torch.Tensor) -> tuple:
    """What must stay the same for a packed copy of ``t`` to stay valid."""
    return (t.data_ptr(), t._version, tuple(t.shape), t.dtype, t.device)


def _uses_packed_ops(device: torch.device) -> bool:
    """CPUs multiply with oneDNN-packed weights; other devices with plain bf16 copies."""
    return device.type == "cpu"


class PackedLinears:
    """A cache of ready bf16 weights, one entry per weight tensor, and the product with them.

    Thread-safe (entries are built under a lock; the weights are only read afterwards). Copies
    and pickles of an owner start with an empty cache: packed oneDNN tensors have no storage to
    copy, and every entry is rebuilt on first use.
    """

    def __init__(self) -> None:
        self._entries: dict[int, tuple[tuple, torch.Tensor, Optional[torch.Tensor], Optional[tuple]]] = {}
        self._refs: dict[int, weakref.ref] = {}  # an entry goes when its weight is freed
        self._lock = threading.RLock()  # re-entrant: a weight may be freed (callback) under it

    @staticmethod
    def supported(device_type: str) -> bool:
        """Whether products on ``device_type`` can use ready weights: CPUs with native bf16 and
        this build's packed oneDNN ops, and CUDA devices."""
        return device_type == "cuda" or device_type == "cpu" and packed_bf16_available()

    def __deepcopy__(self, memo: dict) -> "PackedLinears":
        return PackedLinears()

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()  # type: ignore[misc]

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._refs.clear()

    def _forgotten(self, key: int, ref: object) -> None:
        with self._lock:
            self._entries.pop(key, None)
            self._refs.pop(key, None)

    @property
    def nbytes(self) -> int:
        """Bytes held by the packed weights and biases."""
        with self._lock:
            return sum(w.numel() * w.element_size() + (b.numel() * b.element_size() if b is not None else 0)
                       for _, w, b, _ in self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    @classmethod
    def applies(cls, x: torch.Tensor) -> bool:
        """Whether :meth:`linear` uses the ready weights for input ``x``: a bf16 tensor, or an
        fp32 one under bf16 autocast, on a device where they are :meth:`supported`."""
        dev = x.device.type
        if not cls.supported(dev):
            return False
        if x.dtype == torch.bfloat16:
            return True
        return (torch.is_autocast_enabled(dev) and torch.get_autocast_dtype(dev) == torch.bfloat16
                and x.dtype == torch.float32)

    def _entry(self, weight: torch.Tensor, bias: Optional[torch.Tensor]):
        key = id(weight)
        sig, bsig = _signature(weight), (_signature(bias) if bias is not None else None)
        e = self._entries.get(key)
        if e is not None and e[0] == sig and e[3] == bsig:
            return e
        with self._lock:
            e = self._entries.get(key)
            if e is None or e[0] != sig or e[3] != bsig:
                with torch.no_grad():
                    packed = weight.detach().to(torch.bfloat16)
                    if _uses_packed_ops(weight.device):
                        # the batch-size hint only picks among layouts; any number of rows is correct
                        packed = torch.ops.mkldnn._reorder_linear_weight(packed, 1024)
                    b16 = bias.detach().to(torch.bfloat16) if bias is not None else None
                e = (sig, packed, b16, bsig)
                self._entries[key] = e
                if key not in self._refs:
                    self._refs[key] = weakref.ref(weight, functools.partial(self._forgotten, key))
        return e

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``F.linear(x, weight, bias)`` as bf16 autocast computes it (``…×in`` → ``…×out``, bf16),
        from the ready bf16 copy of ``weight`` where :meth:`applies`; plain ``F.linear``
        otherwise and whenever gradients are needed (the copies are constants)."""
        if not self.applies(x) or torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
            return F.linear(x, weight, bias)
        _, packed, b16, _ = self._entry(weight, bias)
        if not _uses_packed_ops(x.device):
            with torch.autocast(x.device.type, enabled=False):  # the operands are bf16 already
                return F.linear(x.to(torch.bfloat16), packed, b16)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(torch.bfloat16)
        y = torch.ops.mkldnn._linear_pointwise(x2, packed, b16, "none", [], "")
        return y.reshape(*shape[:-1], y.shape[-1])

"""Small tensor helpers shared by the label and prediction paths."""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["channel_argmax", "attention"]


def channel_argmax(x: torch.Tensor, dim: int) -> torch.Tensor:
    """``x.argmax(dim)`` (first index on ties), computed over a contiguous last dimension.

    On CPU, ``argmax`` over a non-innermost dimension of a few channels is much slower than
    moving that dimension last first and reducing over contiguous memory.
    """
    return x.movedim(dim, -1).contiguous().argmax(-1)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, need_map: bool = False
              ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``softmax(q·kᵀ/√d)·v`` for ``B×nh×L×d`` tensors; with ``need_map`` also the softmax map
    averaged over heads (``B×L×L``), else ``None``.

    Without a map, fp32 and half precision use SDPA's fused kernel. bf16 on CPU always takes the
    explicit products with a bf16 softmax (which accumulates in fp32 internally): there the
    fused kernel's bf16 path runs at its fp32 speed, about half that of the explicit one, and an
    autocast region would promote the softmax, and with it the ``L×L`` maps, to fp32. The bf16
    map is averaged in fp32.
    """
    cpu_bf16 = q.dtype == torch.bfloat16 and q.device.type == "cpu"
    if not (need_map or cpu_bf16):
        return F.scaled_dot_product_attention(q, k, v), None
    with torch.autocast(device_type="cpu", enabled=False) if cpu_bf16 else contextlib.nullcontext():
        a = torch.softmax((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1), dim=-1)
        amap = (a.mean(dim=1, dtype=torch.float32) if cpu_bf16 else a.mean(dim=1)) if need_map else None
        return a @ v, amap

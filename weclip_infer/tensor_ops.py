"""Small tensor helpers shared by the label and prediction paths."""
from __future__ import annotations

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
    scale = q.shape[-1] ** -0.5
    if q.dtype == torch.bfloat16 and q.device.type == "cpu":
        with torch.autocast(device_type="cpu", enabled=False):
            a = torch.softmax((q * scale) @ k.transpose(-2, -1), dim=-1)
            return a @ v, (a.mean(dim=1, dtype=torch.float32) if need_map else None)
    if need_map:
        a = torch.softmax((q * scale) @ k.transpose(-2, -1), dim=-1)
        return a @ v, a.mean(dim=1)
    return F.scaled_dot_product_attention(q, k, v), None

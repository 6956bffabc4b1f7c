"""Small tensor helpers shared by the label and prediction paths."""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["channel_argmax", "attention", "ATTENTION_SCORE_BYTES", "to_device"]

# Largest block of attention scores the explicit bf16 path holds at once when no map is asked
# for (query rows are taken a block at a time beyond it): without it, memory would grow with the
# square of the token count (a 2048² input at scale 4 would need 13 GB of scores per block).
ATTENTION_SCORE_BYTES = 64 << 20


def to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A (small) CPU tensor on ``device`` without waiting for the device: on CUDA the copy goes
    through pinned memory and is queued on the stream (from ordinary memory, each copy would
    wait until every kernel queued before it has finished). Elsewhere ``t.to(device)``."""
    device = torch.device(device)
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


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
    map is averaged in fp32. Without a map the explicit path holds at most
    :data:`ATTENTION_SCORE_BYTES` of scores at a time (softmax is per query row, so blocks of
    rows give the same result).
    """
    cpu_bf16 = q.dtype == torch.bfloat16 and q.device.type == "cpu"
    if not (need_map or cpu_bf16):
        return F.scaled_dot_product_attention(q, k, v), None
    scale = q.shape[-1] ** -0.5
    if cpu_bf16:
        # heads split out of a fused projection are strided views; oneDNN's bf16 batched products
        # run faster on contiguous operands, and copying them costs less than it saves
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    kt = k.transpose(-2, -1)
    # on CPU in bf16 the softmax overwrites its scores (the same values, one L×L block less to
    # write to fresh memory)
    softmax = _softmax_in_place if cpu_bf16 else (lambda s: torch.softmax(s, dim=-1))
    with torch.autocast(device_type="cpu", enabled=False) if cpu_bf16 else contextlib.nullcontext():
        if need_map:
            a = softmax((q * scale) @ kt)
            amap = a.mean(dim=1, dtype=torch.float32) if cpu_bf16 else a.mean(dim=1)
            return a @ v, amap
        L = q.shape[-2]
        rows = max(1, ATTENTION_SCORE_BYTES // (q.shape[0] * q.shape[1] * k.shape[-2] * q.element_size()))
        blocks = [softmax((q[..., i : i + rows, :] * scale) @ kt) @ v for i in range(0, L, rows)]
        return (blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=-2)), None


def _softmax_in_place(scores: torch.Tensor) -> torch.Tensor:
    """``torch.softmax(scores, -1)``, written over ``scores`` (a fresh product nothing else holds)
    unless a gradient must flow through it: the CPU kernel reads each row before writing it."""
    if scores.requires_grad:
        return torch.softmax(scores, dim=-1)
    return torch._softmax(scores, -1, False, out=scores)

"""Optimiser and learning-rate schedule of the WeCLIP recipe.

The reference (``PolyWarmupAdamW``) sets the lr of every parameter group *before* each optimiser
step from a step counter ``s`` that starts at 0:

* warm-up, ``s < warmup_iters``: ``lr = lr0 · (1 − (1 − s/warmup_iters)·(1 − warmup_ratio))``
  (linear from ``warmup_ratio·lr0`` towards ``lr0``);
* poly, ``warmup_iters ≤ s < max_iters``: ``lr = lr0 · (1 − s/max_iters)^power`` — the poly factor
  uses ``s/max_iters``, not ``(s − warmup)/(max_iters − warmup)``;
* ``s ≥ max_iters``: the reference leaves the last lr in place; we return the value at
  ``max_iters − 1``.

``lr0`` is the effective decoder lr, ``base_lr · lr_mult`` = 2e-4 · 10 = 2e-3.
"""
from __future__ import annotations

from typing import Iterable

import torch

from .config import TrainConfig

__all__ = ["lr_at", "build_optimizer", "set_lr"]


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimiser step ``step`` (0-based, evaluated before the update)."""
    s = int(step)
    if s < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    lr0 = cfg.base_lr * cfg.lr_mult
    if s < cfg.warmup_iters:
        return lr0 * (1.0 - (1.0 - s / cfg.warmup_iters) * (1.0 - cfg.warmup_ratio))
    s = min(s, cfg.max_iters - 1)
    return lr0 * (1.0 - s / cfg.max_iters) ** cfg.poly_power


def build_optimizer(params: Iterable[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW (decoupled weight decay) on the trainable parameters: betas (0.9, 0.999),
    eps 1e-8, weight decay 0.01 on every parameter (biases and norms included), one group at the
    effective lr. The reference's other three groups are empty (backbone frozen).

    On CPUs and CUDA GPUs the update is torch's fused kernel: the same AdamW arithmetic over all
    ~80 decoder tensors in one pass, instead of a handful of operations per tensor (on a GPU each
    one a kernel launch the host must issue), equal up to float rounding."""
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters")
    fused = all(p.device.type in _FUSED_ADAMW_DEVICES and p.dtype in _FUSED_ADAMW_DTYPES for p in params)
    return torch.optim.AdamW(params, lr=lr_at(0, cfg), betas=tuple(cfg.betas), eps=cfg.eps,
                             weight_decay=cfg.weight_decay, fused=fused or None)


# where torch's fused AdamW runs (it supports more devices; these are the ones the tests cover)
_FUSED_ADAMW_DEVICES = ("cpu", "cuda")
_FUSED_ADAMW_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr

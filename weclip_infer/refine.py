"""CAM refinement: the static CLIP-ES refinement and WeCLIP's RFM (docs/method.md §4).

All maps are ``B×hw×hw`` with the CLS row/column removed; everything is detached.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .config import RefineConfig

__all__ = [
    "patch_attention",
    "static_refine_map",
    "refine_affinity",
    "sinkhorn_transition",
    "apply_transition",
]


def patch_attention(attn: Sequence[torch.Tensor]) -> torch.Tensor:
    """List of ``B×L×L`` maps (CLS first) → ``B×n×hw×hw`` with CLS row/column dropped (docs/method.md §4)."""
    return torch.stack([a[:, 1:, 1:] for a in attn], dim=1)


def static_refine_map(maps: torch.Tensor, last: int = 8) -> torch.Tensor:
    """CLIP-ES static refinement (docs/method.md §4.1): mean of the last ``last`` maps. ``B×n×hw×hw`` → ``B×hw×hw``."""
    return maps[:, -last:].mean(dim=1)


def refine_affinity(maps: torch.Tensor, aff: torch.Tensor, cfg: RefineConfig
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """WeCLIP's refining map R (docs/method.md §4.2) and its Table-6 ablations.

    ``maps``: ``B×n×hw×hw`` all CLIP attention maps (blocks 1..N); ``aff``: ``B×hw×hw`` decoder
    affinity ``A_f`` (detached here). Returns ``(R, scores, keep)`` with ``scores``/``keep``
    ``B×k`` over the ``k = cfg.candidate_blocks`` last blocks.
    """
    aff = aff.detach()
    cand = maps[:, -cfg.candidate_blocks:]
    diff = aff.unsqueeze(1) - cand
    if cfg.layer_score == "abs":  # paper: Σ|A_f − A_s^l|
        diff = diff.abs()
    scores = diff.sum(dim=(-2, -1))  # code: signed Σ(A_f − A_s^l) (docs/method.md §12)
    tau = scores.mean(dim=1, keepdim=True)
    keep = (scores <= tau) if cfg.layer_filter == "le" else (scores < tau)
    keep = keep.to(maps.dtype)
    g_mean = (keep[:, :, None, None] * cand).sum(1) / (keep.sum(1)[:, None, None] + 1e-5)
    mode = cfg.refine_map
    if mode == "all":
        r = g_mean * aff
    elif mode == "af":
        r = aff
    elif mode == "as":
        r = maps.mean(dim=1)
    elif mode == "g_as":
        r = g_mean
    elif mode == "af_as":
        r = cand.mean(dim=1) * aff
    else:  # validated in config
        raise ValueError(mode)
    return r, scores, keep


def sinkhorn_transition(m: torch.Tensor, iters: int = 3, power: int = 2) -> torch.Tensor:
    """docs/method.md §4.3: ``iters`` × (column-normalise, row-normalise), symmetrise, matrix power.

    ``B×hw×hw`` → ``B×hw×hw``. No epsilon (entries are strictly positive)."""
    t = m
    for _ in range(iters):
        t = t / t.sum(dim=-2, keepdim=True)  # columns (sum over rows, dim 0 per image)
        t = t / t.sum(dim=-1, keepdim=True)  # rows
    t = (t + t.transpose(-2, -1)) / 2
    out = t
    for _ in range(power - 1):
        out = out @ t
    return out


def apply_transition(trans: torch.Tensor, cams: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Refined CAMs ``(T ⊙ B_k) @ vec(M_k)`` for all classes at once (docs/method.md §4.4).

    ``trans``: ``hw×hw``; ``cams``, ``boxes``: ``K×h×w``. Masking the columns of T with the box
    equals masking the CAM vector: ``(T ⊙ 1bᵀ) v = T (b ⊙ v)``. Returns ``K×h×w``.
    """
    K, h, w = cams.shape
    v = (cams * boxes).reshape(K, h * w).t()  # hw×K
    return (trans @ v).t().reshape(K, h, w)

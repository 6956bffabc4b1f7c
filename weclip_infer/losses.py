"""WeCLIP losses (spec §6): balanced segmentation CE and the affinity loss."""
from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F

__all__ = ["segmentation_loss", "radius_mask", "affinity_labels", "affinity_loss"]

IGNORE = 255


def segmentation_loss(logits: torch.Tensor, labels: torch.Tensor, kind: str = "balanced") -> torch.Tensor:
    """``logits`` ``B×C×h×w`` (upsampled bilinearly to the label size here), ``labels`` ``B×H×W``.

    ``balanced`` (code, §6.1): ``0.5·(CE over bg pixels + CE over fg pixels)``, each averaged over
    its own pixels; an empty term is skipped (the reference would return NaN). ``ce``: plain CE.
    """
    logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    labels = labels.long()
    if kind == "ce":
        return F.cross_entropy(logits, labels, ignore_index=IGNORE)
    bg = labels == 0
    fg = (labels != 0) & (labels != IGNORE)
    logp = F.log_softmax(logits, dim=1)  # once for both terms: cross_entropy = nll_loss ∘ log_softmax
    terms = []
    for sel in (bg, fg):
        if sel.any():
            terms.append(F.nll_loss(logp, labels.masked_fill(~sel, IGNORE), ignore_index=IGNORE))
        else:
            terms.append(logits.sum() * 0.0)
    return 0.5 * (terms[0] + terms[1])


@lru_cache(maxsize=16)
def _radius_mask_cpu(h: int, w: int, radius: int) -> torch.Tensor:
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    cheb = torch.maximum((ys[:, None] - ys[None]).abs(), (xs[:, None] - xs[None]).abs())
    return cheb <= radius


def radius_mask(h: int, w: int, radius: int = 8, device=None) -> torch.Tensor:
    """``hw×hw`` bool: True where two patches are within Chebyshev distance ``radius`` (§6.2)."""
    return _radius_mask_cpu(h, w, radius).to(device)


def affinity_labels(pseudo: torch.Tensor, hw: tuple[int, int], radius: int = 8) -> torch.Tensor:
    """Pair labels from pseudo labels (spec §6.2, §11.2 item 11).

    ``pseudo`` ``B×H×W`` → nearest-downsampled to ``h×w`` (top-left pixel of each patch) →
    ``B×hw×hw`` uint8: 1 same label, 0 different, 255 outside the radius window or ignored.
    """
    h, w = hw
    y = F.interpolate(pseudo[:, None].float(), size=(h, w), mode="nearest")[:, 0].long().flatten(1)  # B×hw
    lab = (y[:, :, None] == y[:, None, :]).to(torch.uint8)
    lab[~radius_mask(h, w, radius, pseudo.device).expand_as(lab)] = IGNORE
    ign = y == IGNORE
    if ign.any():
        lab[ign[:, :, None].expand_as(lab)] = IGNORE
        lab[ign[:, None, :].expand_as(lab)] = IGNORE
    return lab


def affinity_loss(aff: torch.Tensor, labels: torch.Tensor, kind: str = "linear") -> torch.Tensor:
    """Affinity loss on ``A_f`` (``B×hw×hw``, after sigmoid) against ``labels`` (§6.2).

    ``linear`` (code): ``0.5·Σ_pos(1−A_f)/(N_pos+1) + 0.5·Σ_neg A_f/(N_neg+1)``, sums over the
    whole batch. ``bce`` (paper Eq. 10): the same balance with log terms.
    """
    pos = (labels == 1).to(aff.dtype)
    neg = (labels == 0).to(aff.dtype)
    if kind == "bce":
        eps = 1e-6
        lp = -(pos * torch.log(aff.clamp_min(eps))).sum() / (pos.sum() + 1)
        ln = -(neg * torch.log((1 - aff).clamp_min(eps))).sum() / (neg.sum() + 1)
        return 0.5 * lp + 0.5 * ln
    return 0.5 * (pos * (1 - aff)).sum() / (pos.sum() + 1) + 0.5 * (neg * aff).sum() / (neg.sum() + 1)

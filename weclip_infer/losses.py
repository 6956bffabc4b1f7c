"""WeCLIP losses (docs/method.md §7): balanced segmentation CE and the affinity loss."""
from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F

from .tensor_ops import to_device

__all__ = ["segmentation_loss", "upsampled_cross_entropy", "radius_mask", "affinity_labels", "affinity_loss"]

IGNORE = 255


def segmentation_loss(logits: torch.Tensor, labels: torch.Tensor, kind: str = "balanced") -> torch.Tensor:
    """``logits`` ``B×C×h×w`` (upsampled bilinearly to the label size here), ``labels`` ``B×H×W``.

    ``balanced`` (code, docs/method.md §7.1): ``0.5·(CE over bg pixels + CE over fg pixels)``, each averaged over
    its own pixels; an empty term is skipped (the reference would return NaN). ``ce``: plain CE
    averaged over the non-ignored pixels. Both are one weighted per-pixel CE, computed by
    ``upsampled_cross_entropy`` (equal to ``F.interpolate`` + ``F.cross_entropy``, fewer passes
    over the ``B×C×H×W`` tensor; ``tests/test_core.py``).
    """
    if kind not in ("balanced", "ce"):
        raise ValueError(f"segmentation loss must be 'balanced' or 'ce', not {kind!r}")
    labels = labels.long()
    valid = labels != IGNORE
    if kind == "ce":
        weight = valid.float() / valid.sum().clamp_min(1)
    else:
        bg = labels == 0
        fg = valid & ~bg
        weight = bg.float() * (0.5 / bg.sum().clamp_min(1)) + fg.float() * (0.5 / fg.sum().clamp_min(1))
    return upsampled_cross_entropy(logits, labels.masked_fill(~valid, 0), weight)


@lru_cache(maxsize=32)
def _interp_matrix(n_out: int, n_in: int, device, dtype) -> torch.Tensor:
    """``n_out×n_in`` matrix of 1-D bilinear resizing with ``align_corners=False`` (as
    ``F.interpolate`` with ``size=``): source ``(i + 0.5)·n_in/n_out − 0.5`` clamped at 0."""
    src = ((torch.arange(n_out, dtype=torch.float64) + 0.5) * (n_in / n_out) - 0.5).clamp_min(0)
    i0 = src.floor().long().clamp_max(n_in - 1)
    i1 = (i0 + 1).clamp_max(n_in - 1)
    lam = src - i0
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    rows = torch.arange(n_out)
    m.index_put_((rows, i0), 1 - lam, accumulate=True)
    m.index_put_((rows, i1), lam, accumulate=True)
    return to_device(m.to(dtype), device)  # cached: built and copied once per size and device


class _UpsampledCE(torch.autograd.Function):
    """``Σ_p w_p·CE(up(logits)_p, y_p)`` with ``up`` the separable bilinear resize as two matmuls.

    The backward writes ``w·(softmax − onehot)`` once and resizes it back with the transposed
    matrices, instead of autograd's log-softmax, NLL (one per term), accumulation and
    upsampling backwards over ``B×C×H×W``.
    """

    @staticmethod
    def forward(ctx, logits, labels, weight):
        h, w = logits.shape[-2:]
        H, W = labels.shape[-2:]
        with torch.autocast(device_type=logits.device.type, enabled=False):  # fp32 also under AMP
            x = logits.float()
            my = _interp_matrix(H, h, x.device, x.dtype)
            mx = _interp_matrix(W, w, x.device, x.dtype)
            up = my @ (x @ mx.t())  # B×C×H×W
            lse = torch.logsumexp(up, dim=1)  # B×H×W
            picked = up.gather(1, labels[:, None])[:, 0]
            loss = (weight * (lse - picked)).sum()
        ctx.save_for_backward(up, lse, labels, weight, my, mx)
        ctx.in_dtype = logits.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        up, lse, labels, weight, my, mx = ctx.saved_tensors
        with torch.autocast(device_type=up.device.type, enabled=False):
            g = up - lse[:, None]
            g.exp_().mul_(weight[:, None])  # w·softmax
            g.scatter_add_(1, labels[:, None], -weight[:, None])
            g = my.t() @ (g @ mx)  # back to B×C×h×w
            return (g * grad_out.float()).to(ctx.in_dtype), None, None


def upsampled_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Weighted CE of bilinearly upsampled logits (``align_corners=False``).

    ``logits`` ``B×C×h×w``; ``labels`` ``B×H×W`` int64 in ``[0, C)``; ``weight`` ``B×H×W`` float
    (0 drops a pixel) → ``Σ weight·CE`` (scalar).
    """
    if labels.shape != weight.shape or labels.dim() != 3 or logits.dim() != 4 or labels.shape[0] != logits.shape[0]:
        raise ValueError(f"shapes do not match: logits {tuple(logits.shape)}, labels {tuple(labels.shape)}, "
                         f"weight {tuple(weight.shape)}")
    return _UpsampledCE.apply(logits, labels, weight.float())


@lru_cache(maxsize=16)
def _radius_mask_cpu(h: int, w: int, radius: int) -> torch.Tensor:
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    cheb = torch.maximum((ys[:, None] - ys[None]).abs(), (xs[:, None] - xs[None]).abs())
    return cheb <= radius


def radius_mask(h: int, w: int, radius: int = 8, device=None) -> torch.Tensor:
    """``hw×hw`` bool: True where two patches are within Chebyshev distance ``radius`` (docs/method.md §7.2)."""
    return _radius_mask_on(h, w, radius, torch.device(device or "cpu"))


@lru_cache(maxsize=16)
def _radius_mask_on(h: int, w: int, radius: int, device: torch.device) -> torch.Tensor:
    return to_device(_radius_mask_cpu(h, w, radius), device)


def affinity_labels(pseudo: torch.Tensor, hw: tuple[int, int], radius: int = 8) -> torch.Tensor:
    """Pair labels from pseudo labels (docs/method.md §7.2, §12).

    ``pseudo`` ``B×H×W`` → nearest-downsampled to ``h×w`` (top-left pixel of each patch) →
    ``B×hw×hw`` uint8: 1 same label, 0 different, 255 outside the radius window or ignored.
    """
    h, w = hw
    y = F.interpolate(pseudo[:, None].float(), size=(h, w), mode="nearest")[:, 0].long().flatten(1)  # B×hw
    lab = (y[:, :, None] == y[:, None, :]).to(torch.uint8)
    # masked_fill rather than boolean indexing or `if ign.any()`: no wait for the device
    lab.masked_fill_(~radius_mask(h, w, radius, pseudo.device), IGNORE)
    ign = y == IGNORE
    lab.masked_fill_(ign[:, :, None] | ign[:, None, :], IGNORE)
    return lab


def affinity_loss(aff: torch.Tensor, labels: torch.Tensor, kind: str = "linear") -> torch.Tensor:
    """Affinity loss on ``A_f`` (``B×hw×hw``, after sigmoid) against ``labels`` (docs/method.md §7.2).

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

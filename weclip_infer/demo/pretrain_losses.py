"""Losses of demo-CLIP pre-training: multi-positive InfoNCE, prompt-vs-background, token-level
multiple-instance and attention-affinity terms (image-level labels only)."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from weclip_infer.backbone import _block_attention

from .world import CLASS_NAMES

__all__ = ["token_mil_loss", "token_prompt_probs", "mil_bce", "value_tokens", "head_mean_attention",
           "attention_affinity_loss", "prompt_vs_background_loss", "multi_positive_clip_loss"]


def token_mil_loss(tokens: torch.Tensor, label_txt: torch.Tensor, y: torch.Tensor, scale: float = 20.0) -> torch.Tensor:
    """Token-level multiple-instance loss (a FILIP/SPARC-style auxiliary objective, image-level labels only).

    ``tokens`` ``B×N×E`` projected patch tokens, ``label_txt`` ``K×E`` prompt embeddings, ``y``
    ``B×K`` presence. Each token takes a softmax over the ``K`` prompts; an image's score for prompt
    ``k`` is the max over its tokens; binary cross-entropy against ``y``. Present labels must win at
    least one token and absent ones none, so token features stay local (without it, the small CLIP
    parks class evidence on background tokens and its GradCAM is inverted for some classes).
    """
    return mil_bce(token_prompt_probs(tokens, label_txt, scale), y)


def token_prompt_probs(tokens: torch.Tensor, label_txt: torch.Tensor, scale: float = 20.0) -> torch.Tensor:
    """Per-token softmax over the prompts: ``B×N×E`` tokens, ``K×E`` prompts → ``B×N×K``."""
    z = F.normalize(tokens.float(), dim=-1)
    t = F.normalize(label_txt.float(), dim=-1)
    return (scale * z @ t.t()).softmax(dim=-1)


def mil_bce(token_probs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Max over tokens of ``B×N×K`` probabilities, binary cross-entropy against ``B×K`` presence."""
    q = token_probs.amax(dim=1).clamp(1e-6, 1 - 1e-6)  # B×K
    return F.binary_cross_entropy(q, y)


def value_tokens(clip: nn.Module, x_last_in: torch.Tensor) -> torch.Tensor:
    """Dense per-patch embeddings along the value path of the last block (MaskCLIP-style):
    ``ln_post(out_proj(W_v · ln_1(x))) @ proj``. ``x_last_in``: ``B×L×D`` input of the last block
    → ``B×(L−1)×E`` (CLS dropped). This is the path GradCAM on the last block's ``ln_1`` reads,
    so a token loss here makes GradCAM local."""
    v: Any = clip.visual  # open_clip's VisionTransformer (untyped; nn.Module types submodules as Tensor | Module)
    blk = v.transformer.resblocks[-1]
    D = x_last_in.shape[-1]
    a = blk.ln_1(x_last_in[:, 1:])
    w_v = blk.attn.in_proj_weight[2 * D:]
    b_v = blk.attn.in_proj_bias[2 * D:] if blk.attn.in_proj_bias is not None else None
    o = blk.attn.out_proj(F.linear(a, w_v, b_v))
    return v.ln_post(o) @ v.proj


def head_mean_attention(blk: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Head-averaged attention probabilities of an open_clip block (with grad), from its input
    ``x`` ``B×L×D``: ``mean_h softmax(q_h·k_hᵀ/√d)`` → ``B×L×L`` (what RFM reads)."""
    b: Any = blk  # open_clip's block (untyped)
    attn = _block_attention(blk, b.ln_1(x), need_attn=True)[1]
    assert attn is not None  # need_attn=True always returns the map
    return attn


def attention_affinity_loss(attn: torch.Tensor, token_probs: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Self-distillation of the model's own token semantics into its attention (image-level labels only).

    ``attn`` ``B×L×L`` head-averaged attention (CLS first), ``token_probs`` ``B×N×K`` per-patch
    softmax over the class/background prompts (detached; the token-level MIL head). Target row i:
    ``T_i ∝ Σ_k q_ik q_jk`` over patches j (tokens that look like the same prompt); loss: KL(T‖A)
    over the patch-to-patch block of the attention (rows renormalised without CLS). RFM and the
    static CLIP-ES refinement propagate CAMs along these maps, so they must group object tokens.
    """
    a = attn[:, 1:, 1:]
    a = a / a.sum(-1, keepdim=True).clamp_min(eps)
    q = token_probs.detach().float()
    t = q @ q.transpose(1, 2)
    t = t / t.sum(-1, keepdim=True).clamp_min(eps)
    return (t * (t.clamp_min(eps).log() - a.clamp_min(eps).log())).sum(-1).mean()


def prompt_vs_background_loss(img: torch.Tensor, label_txt: torch.Tensor, y: torch.Tensor,
                              scale: torch.Tensor) -> torch.Tensor:
    """The scoring GradCAM uses, trained on image-level labels: for every present class
    c of image i, cross-entropy of ``softmax(scale·img_i·[t_c; T_bg])`` with target ``t_c``.

    ``img`` ``B×E`` pooled embeddings, ``label_txt`` ``(C+n_bg)×E`` class then background prompt
    embeddings, ``y`` ``B×(C+n_bg)`` presence. Without it a small CLIP can let a background prompt
    win for an image that holds an object (p_c ≈ 0), and GradCAM of a saturated score lands on the
    background.
    """
    n_cls = len(CLASS_NAMES)
    img = F.normalize(img.float(), dim=-1)
    t = F.normalize(label_txt.float(), dim=-1)
    s_fg = scale * img @ t[:n_cls].t()  # B×C
    s_bg = scale * img @ t[n_cls:].t()  # B×n_bg
    lse = torch.logaddexp(s_fg, torch.logsumexp(s_bg, dim=1, keepdim=True))  # B×C
    present = y[:, :n_cls] > 0.5
    return ((lse - s_fg) * present).sum() / present.sum().clamp_min(1)


def multi_positive_clip_loss(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor,
                             pos: torch.Tensor) -> torch.Tensor:

    """Symmetric InfoNCE with soft targets spread uniformly over the positives of each row/column."""
    logits = scale * img.float() @ txt.float().t()
    t_i = pos.float() / pos.float().sum(1, keepdim=True)
    t_t = pos.float().t() / pos.float().t().sum(1, keepdim=True)
    li = -(t_i * F.log_softmax(logits, dim=1)).sum(1).mean()
    lt = -(t_t * F.log_softmax(logits.t(), dim=1)).sum(1).mean()
    return 0.5 * (li + lt)

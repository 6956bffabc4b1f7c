"""Initial CAMs by GradCAM on the frozen last CLIP block (CLIP-ES style, docs/method.md §3) and box masks.

The reference runs one forward + backward of block N per image and per present class. Two
batched formulations give the same gradients (``tests/test_core.py`` checks both against
``initial_cam_per_class``):

- per image (CPU default): the forward of block N and the class scores do not depend on the
  target class (the text matrix of image b is ``[T_fg[keys_b]; T_bg]`` for each of its classes),
  so each image gets one forward, and the K_b backwards of its classes run as one vectorised
  backward (``is_grads_batched``: K_b one-hot cotangents). Fewest FLOPs.
- pairs (CUDA default): every (image, class) pair is one sample of one batched forward, and
  ``Σ_n p_n[j_n]`` is differentiated once; pairs do not interact, so pair n's gradient is
  ``∂p_n[j_n]/∂A_n``. Fewest kernel launches.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from .backbone import FrozenCLIP, run_block
from .tensor_ops import to_device

__all__ = ["CAMOutput", "class_keys", "initial_cam", "initial_cam_per_class", "box_mask", "box_masks",
           "box_masks_batch", "minmax_normalize"]


@dataclass
class CAMOutput:
    """Result of ``initial_cam`` for a batch.

    ``cams``: per image a ``K_i×h×w`` tensor in [0, 1] (ascending class order);
    ``keys``: per image the ``K_i`` 0-based foreground class ids;
    ``attn_last``: ``B×L×L`` head-averaged attention of block N (docs/method.md §2.4);
    ``probs``: per image ``K_i×(K_i+n_bg)`` softmax scores of each GradCAM target's forward.
    """

    cams: list
    keys: list
    attn_last: torch.Tensor
    probs: list


def class_keys(cls_labels: torch.Tensor) -> list[list[int]]:
    """``B×(C−1)`` multi-hot → per image the present 0-based class ids, ascending (docs/method.md §3.1)."""
    present = (cls_labels > 0.5).cpu()  # one device → host copy for the whole batch
    return [torch.nonzero(row).flatten().tolist() for row in present]


def minmax_normalize(x: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """``(x − min) / (max(x − min) + eps)`` over the last two dims (docs/method.md §3.3)."""
    flat = x.flatten(-2)
    mn = flat.min(dim=-1, keepdim=True).values
    flat = flat - mn
    mx = flat.max(dim=-1, keepdim=True).values
    return (flat / (mx + eps)).reshape(x.shape)


def initial_cam(backbone: FrozenCLIP, tokens_prev: torch.Tensor, hw: tuple[int, int], keys: Sequence[Sequence[int]],
                text_fg: torch.Tensor, text_bg: torch.Tensor, logit_scale: Optional[float] = None,
                batching: str = "auto") -> CAMOutput:
    """GradCAM initial CAMs for every present class of every image (docs/method.md §3.2–§3.3).

    ``tokens_prev``: ``B×L×D`` output of block N−1 (no grad needed); ``keys``: present classes
    per image; ``text_fg``: ``(C−1)×E``, ``text_bg``: ``n_bg×E`` L2-normalised text embeddings;
    ``logit_scale``: softmax scale (default: the CLIP's ``exp(logit_scale)``, 100 for OpenAI).
    ``batching``: ``"image"`` (one forward per image, its classes' backwards vectorised: fewest
    FLOPs, the CPU default), ``"pairs"`` (every (image, class) pair in one batched forward and
    backward: fewest kernel launches, the CUDA default) or ``"auto"``. Both equal the per-class
    loop (``tests/test_core.py``).
    """
    if batching == "auto":
        batching = "pairs" if tokens_prev.device.type == "cuda" else "image"
    if batching not in ("image", "pairs"):
        raise ValueError(f"batching must be 'auto', 'image' or 'pairs', not {batching!r}")
    B, L, D = tokens_prev.shape
    h, w = hw
    scale = float(backbone.logit_scale_exp) if logit_scale is None else float(logit_scale)
    blk = backbone.blocks[backbone.num_blocks - 1]
    tokens_prev = tokens_prev.detach()
    res = CAMOutput(cams=[tokens_prev.new_zeros(len(k), h, w) for k in keys], keys=[list(k) for k in keys],
                    attn_last=torch.empty(B, L, L, dtype=tokens_prev.dtype, device=tokens_prev.device),
                    probs=[tokens_prev.new_zeros(len(k), len(k) + text_bg.shape[0]) for k in keys])
    empty = [b for b in range(B) if not keys[b]]
    if empty:  # images without classes still need block N's attention map
        with torch.no_grad():
            _, a = _block_with_attention(blk, tokens_prev[empty])
        res.attn_last[empty] = a
    if len(empty) < B:
        fill = _gradcam_per_image if batching == "image" else _gradcam_pairs
        fill(res, backbone, blk, tokens_prev, hw, keys, text_fg, text_bg, scale)
    return res


def _gradcam_per_image(res: CAMOutput, backbone: FrozenCLIP, blk, tokens_prev, hw, keys, text_fg, text_bg, scale):
    """One block-N forward per image; the K backwards of its classes as one vectorised backward.
    (Per image rather than per group of images: the autograd graph of block N stays small, which
    keeps the training step's peak memory down at the same speed.)"""
    h, w = hw
    for b, kb in enumerate(keys):
        kb = list(kb)
        if not kb:
            continue
        k = len(kb)
        # Text matrix [T_fg[keys_b]; T_bg] (docs/method.md §3.2): the same for every target class of image b, so
        # one forward serves all of them.
        text = F.normalize(torch.cat([text_fg[kb], text_bg], dim=0), dim=-1, eps=1e-12)
        x = tokens_prev[b : b + 1]
        act, qkv = _hooked_activation(blk, x)
        with torch.enable_grad():
            out, attn = _block_with_attention(blk, x, qkv=qkv)
            p = torch.softmax(scale * backbone.pooled_embedding(out) @ text.t(), dim=-1)  # 1×(K+n_bg)
            if k == 1:
                (grad,) = torch.autograd.grad(p[0, 0], qkv)
            else:  # one vectorised backward with K one-hot cotangents = K separate backwards
                eye = torch.eye(k, dtype=p.dtype, device=p.device)
                (grad,) = torch.autograd.grad(p[0, :k], qkv, grad_outputs=eye, is_grads_batched=True)
        alpha = _channel_weights(blk, grad.reshape(k, *qkv.shape[1:]))  # K×D
        res.cams[b] = minmax_normalize(torch.relu(alpha @ act[0, 1:].t()).reshape(k, h, w))
        res.probs[b] = p.detach().expand(k, -1).clone()
        res.attn_last[b] = attn.detach()[0]


def _block_with_attention(blk, x: torch.Tensor, qkv: Optional[torch.Tensor] = None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """``run_block`` with its head-averaged attention map (always returned when asked for)."""
    out, attn = run_block(blk, x, need_attn=True, qkv=qkv)
    assert attn is not None
    return out, attn


def _hooked_activation(blk, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """GradCAM's hooked activation ``A = ln_1(x)`` (docs/method.md §3.3, ``B×L×D``) and its input projection
    ``A·W_inᵀ + b_in`` (``B×L×3D``), the latter as a leaf that requires grad.

    ``A`` enters block N only through that projection, so ``∂p/∂A_j = (∂p/∂qkv_j)·W_in``, and the
    token mean GradCAM needs is ``mean_j(∂p/∂qkv_j)·W_in`` (``_channel_weights``): one vector-matrix
    product instead of the backward's ``L×3D×D`` input-gradient matmul per class.
    """
    with torch.no_grad():
        act = blk.ln_1(x)
        qkv = F.linear(act, blk.attn.in_proj_weight, blk.attn.in_proj_bias)
    return act, qkv.requires_grad_(True)


def _channel_weights(blk, grad_qkv: torch.Tensor) -> torch.Tensor:
    """GradCAM channel weights ``α = mean over patch tokens of ∂p/∂A`` from ``∂p/∂qkv``
    (``…×L×3D`` → ``…×D``; CLS dropped)."""
    return grad_qkv[..., 1:, :].mean(dim=-2) @ blk.attn.in_proj_weight


def _gradcam_pairs(res: CAMOutput, backbone: FrozenCLIP, blk, tokens_prev, hw, keys, text_fg, text_bg, scale):
    """Every (image, class) pair gets its own copy of its image's tokens; one batched forward and
    one backward of ``Σ_n p_n[j_n]``. Pairs do not interact (LayerNorm, attention and MLP act
    within one sample), so pair n's gradient is ``∂p_n[j_n]/∂A_n``."""
    h, w = hw
    pairs = [(b, j) for b in range(len(keys)) for j in range(len(keys[b]))]
    dev = tokens_prev.device
    kmax = max(len(k) for k in keys)
    n_bg = text_bg.shape[0]
    # Indices built on the host and sent in one copy: per pair its image, its classes (padded to
    # kmax with -1) and its target.
    meta = torch.full((len(pairs), kmax + 2), -1, dtype=torch.long)
    for n, (b, j) in enumerate(pairs):
        kb = list(keys[b])
        meta[n, 0], meta[n, 1] = b, j
        meta[n, 2 : 2 + len(kb)] = torch.tensor(kb, dtype=torch.long)
    meta = to_device(meta, dev)
    x = tokens_prev[meta[:, 0]]  # N×L×D
    target = meta[:, 1]
    fg_valid = meta[:, 2:] >= 0  # N×kmax
    # Per pair the text matrix [T_fg[keys_b]; T_bg], padded to kmax fg rows (zeros, masked out).
    tfg = text_fg[meta[:, 2:].clamp_min(0)] * fg_valid[:, :, None].to(text_fg.dtype)
    valid = torch.cat([fg_valid, fg_valid.new_ones(len(pairs), n_bg)], dim=1)
    text = F.normalize(torch.cat([tfg, text_bg.unsqueeze(0).expand(len(pairs), -1, -1)], dim=1), dim=-1, eps=1e-12)
    act, qkv = _hooked_activation(blk, x)
    with torch.enable_grad():
        out, attn = _block_with_attention(blk, x, qkv=qkv)
        logits = scale * torch.einsum("ne,nke->nk", backbone.pooled_embedding(out), text)
        p = torch.softmax(logits.masked_fill(~valid, float("-inf")), dim=-1)
        (grad,) = torch.autograd.grad(p.gather(1, target[:, None]).sum(), qkv)
    alpha = _channel_weights(blk, grad)  # N×D
    cam = minmax_normalize(torch.relu(torch.einsum("nd,nld->nl", alpha, act[:, 1:])).reshape(-1, h, w))
    p = p.detach()
    seen = set()
    for n, (b, j) in enumerate(pairs):
        nb = len(keys[b])
        res.cams[b][j] = cam[n]
        res.probs[b][j] = torch.cat([p[n, :nb], p[n, kmax:]])
        if b not in seen:
            seen.add(b)
            res.attn_last[b] = attn.detach()[n]


def initial_cam_per_class(backbone: FrozenCLIP, tokens_prev: torch.Tensor, hw: tuple[int, int], keys, text_fg, text_bg,
                          logit_scale: Optional[float] = None) -> list:
    """Reference formulation: one block-N forward + backward per image and class (docs/method.md §3.3).
    Slow; kept to prove the batched ``initial_cam`` equal to it."""
    h, w = hw
    scale = float(backbone.logit_scale_exp) if logit_scale is None else float(logit_scale)
    blk: Any = backbone.blocks[backbone.num_blocks - 1]  # an open_clip block (untyped)
    out_cams = []
    for b, kb in enumerate(keys):
        text = F.normalize(torch.cat([text_fg[list(kb)], text_bg], 0), dim=-1)
        cams = []
        for j in range(len(kb)):
            x = tokens_prev[b : b + 1].detach()
            with torch.enable_grad():
                act = blk.ln_1(x).detach().requires_grad_(True)
                out, _ = run_block(blk, x, need_attn=True, ln1_out=act)
                p = torch.softmax(scale * backbone.pooled_embedding(out) @ text.t(), dim=-1)
                (g,) = torch.autograd.grad(p[0, j], act)
            a, g = act.detach()[0, 1:], g[0, 1:]
            cam = torch.relu(a @ g.mean(0)).reshape(1, h, w)
            cams.append(minmax_normalize(cam)[0])
        out_cams.append(torch.stack(cams) if cams else tokens_prev.new_zeros(0, h, w))
    return out_cams


def box_mask(cam: torch.Tensor | np.ndarray, threshold: float) -> np.ndarray:
    """CLIP-ES box-mask indicator of one CAM (docs/method.md §3.4): ``h×w`` float32 in {0, 1}.

    ``s = uint8(floor(255·cam))``; foreground ``s > int(θ·max(s))``; one rectangle per
    8-connected component (OpenCV contours trace 8-connected components; hole contours lie
    inside their component's rectangle, so they add nothing); rectangle ends are exclusive and
    clipped to ``w−1``/``h−1`` (docs/method.md §3.4).
    """
    c = cam.detach().float().cpu().numpy() if isinstance(cam, torch.Tensor) else np.asarray(cam)
    h, w = c.shape
    s = np.floor(c.astype(np.float32) * 255.0).clip(0, 255).astype(np.uint8)
    t = int(threshold * int(s.max()))
    fg = s > t
    out = np.zeros((h, w), dtype=np.float32)
    if not fg.any():
        return out
    lab, _ = ndimage.label(fg, structure=np.ones((3, 3), dtype=bool))
    for sl in ndimage.find_objects(lab):
        y0, x0 = sl[0].start, sl[1].start
        y1, x1 = min(sl[0].stop, h - 1), min(sl[1].stop, w - 1)
        out[y0:y1, x0:x1] = 1.0
    return out


def box_masks(cams: torch.Tensor, threshold: float) -> torch.Tensor:
    """``K×h×w`` CAMs → ``K×h×w`` box masks (float, same device)."""
    return box_masks_batch([cams], threshold)[0]


def box_masks_batch(cams: Sequence[torch.Tensor], threshold: float) -> list[torch.Tensor]:
    """Per image ``K_i×h×w`` CAMs → ``K_i×h×w`` box masks (float, same device), with one copy to
    the host and one back for the whole batch (the boxes are found on the CPU)."""
    if not cams:
        return []
    ref = cams[0]
    flat = torch.cat([c.detach() for c in cams]).float().cpu().numpy()
    masks = np.zeros(flat.shape, dtype=np.float32)
    for i, c in enumerate(flat):
        masks[i] = box_mask(c, threshold)
    out = to_device(torch.from_numpy(masks).to(ref.dtype), ref.device)
    return list(torch.split(out, [int(c.shape[0]) for c in cams]))

"""Pre-train the small demo CLIP from scratch on the procedural demo world (CPU, bf16 autocast).

``python -m weclip_infer.demo.pretrain_clip --minutes 35 --out weclip_infer/assets/demo_clip``

The model is an open_clip ``CLIP`` built from a config dict through :func:`weclip_infer.backbone.load_clip`
(``clip_weights="random"``, ``patch_stem="conv"``), i.e. the same code path that later loads the
shipped weights. The image tower pools by **averaging the patch tokens after ``ln_post``**
(open_clip ``pool_type="avg"``), which is exactly WeCLIP's ``FrozenCLIP.pooled_embedding``
(spec §2.2), so the GradCAM of WeCLIP differentiates the very embedding that was trained.

Training data are generated on the fly (:func:`weclip_infer.demo.world.generate_sample` on the
``pretrain`` index range), one random caption per image drawn from the sample's caption forms
(objects + background, objects only, WeCLIP's origami template, background only). Images are
normalised like WeCLIP feeds them (ImageNet mean/std on 0..255, spec §1.2).

Loss: symmetric InfoNCE with **multi-positive targets**: caption ``j`` counts as a positive for
image ``i`` whenever it is a correct description of image ``i`` (same visible class set when the
caption names objects, same background when it names one). Identical captions in a batch (e.g.
two "grass." captions) are therefore positives of each other's images instead of false negatives.

Every ``--eval-every`` seconds (and at the end) the script logs to ``pretrain_log.csv`` and
stdout: loss, images/s, zero-shot top-1 on held-out single-object val images, and the mIoU of
WeCLIP's initial GradCAM, of the static-refined CAM and of the pseudo label (static refinement +
PAR) on held-out val images, computed through :func:`weclip_infer.model.build_model`. It also
checkpoints ``clip.safetensors`` (token table pruned to the world's vocabulary) and
``provenance.json``.

Determinism: samples, captions and initialisation are functions of ``--seed``; with ``--steps``
the run is deterministic up to floating-point thread effects. With ``--minutes`` the cosine
schedule follows elapsed time, so the exact number of steps depends on the machine's speed.
"""
from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import os
import platform
import sys
import time
from itertools import combinations, permutations
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from weclip_infer.backbone import FrozenCLIP, _block_attention, load_clip, save_clip
from weclip_infer.normalization import normalize_array
from weclip_infer.config import BackboneConfig
from weclip_infer.demo.world import (
    OBJECT_STYLES,
    BACKGROUND_NAMES,
    CLASS_NAMES,
    CLASS_PROMPTS,
    ORIGAMI_TEMPLATE,
    SPLIT_OFFSETS,
    WorldConfig,
    caption_forms,
    generate_sample,
)
from weclip_infer.text import tokenize

__all__ = [
    "DEFAULT_MODEL_CFG",
    "TINY_MODEL_CFG",
    "DEFAULT_WECLIP_REFINE",
    "world_token_ids",
    "weclip_config",
    "build_clip",
    "positive_matrix",
    "multi_positive_clip_loss",
    "prompt_vs_background_loss",
    "presence_matrix",
    "label_prompts",
    "token_prompt_probs",
    "mil_bce",
    "token_mil_loss",
    "value_tokens",
    "head_mean_attention",
    "attention_affinity_loss",
    "evaluate",
    "main",
]

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "assets" / "demo_clip"

#: The shipped demo CLIP: 128 px input (8×8 grid at patch 16), 6 vision blocks, conv stem. Sized for
#: 2 shared AVX2 cores without bf16 support (~15 images/s in fp32).
DEFAULT_MODEL_CFG: dict = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": 128, "layers": 6, "width": 128, "head_width": 32, "patch_size": 16,
                   "mlp_ratio": 4.0, "pool_type": "avg"},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 2, "layers": 3},
}

#: A tiny model for tests.
TINY_MODEL_CFG: dict = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 32, "head_width": 16, "patch_size": 16,
                   "mlp_ratio": 2.0, "pool_type": "avg"},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}

#: WeCLIP refinement settings used for the CAM evaluation of a tower with ``L`` blocks
#: (the reference uses 8 of 12 maps for the static refinement and 6 candidates for RFM).
def DEFAULT_WECLIP_REFINE(num_layers: int) -> dict:  # noqa: N802 - constant-like
    return {"static_blocks": max(1, min(num_layers, round(num_layers * 8 / 12))),
            "candidate_blocks": max(1, min(num_layers, num_layers // 2)),
            "cam_logit_scale": None, "box_threshold": 0.4, "use_rfm": False}


# ------------------------------------------------------------------------------------------------
# Vocabulary
# ------------------------------------------------------------------------------------------------
def all_world_texts(max_objects: int = 3, n_classes: int = len(CLASS_NAMES)) -> list[str]:
    """Every caption any world sample can have (all class subsets up to ``max_objects``, every
    background, every form and object order) plus every WeCLIP / zero-shot prompt."""
    texts: set[str] = set()
    for k in range(0, max_objects + 1):
        for subset in combinations(range(n_classes), k):
            for bg in range(len(BACKGROUND_NAMES)):
                for caps in caption_forms(subset, bg).values():
                    texts.update(caps)
    for p in list(CLASS_PROMPTS) + list(CLASS_NAMES) + list(BACKGROUND_NAMES):
        texts.add(ORIGAMI_TEMPLATE.format(p))
        texts.add(p)
    return sorted(texts)


def world_token_ids(context_length: int = 32, max_objects: int = 3) -> list[int]:
    """Sorted token ids (incl. ``<sot>``/``<eot>`` and padding 0) of every world caption and prompt."""
    toks = tokenize(all_world_texts(max_objects), context_length)
    ids = set(int(i) for i in torch.unique(toks).tolist())
    ids.update({0, 49406, 49407})
    return sorted(ids)


# ------------------------------------------------------------------------------------------------
# Model / config
# ------------------------------------------------------------------------------------------------
def build_clip(model_cfg: dict, seed: int) -> nn.Module:
    """Random-init open_clip CLIP with the conv stem, through the same loader as the shipped file."""
    clip = load_clip(BackboneConfig(clip_weights="random", model_cfg=model_cfg, patch_stem="conv", seed=seed))
    return clip


def weclip_config(model_cfg: dict, refine: Optional[dict] = None) -> dict:
    """WeCLIP config dict for the demo world on top of ``model_cfg``."""
    layers = int(model_cfg["vision_cfg"]["layers"])
    r = dict(DEFAULT_WECLIP_REFINE(layers))
    r.update(refine or {})
    return {
        "backbone": {"clip_weights": "random", "model_cfg": model_cfg, "patch_stem": "conv", "normalize": "imagenet"},
        "text": {"dataset": "custom", "class_names": list(CLASS_NAMES), "class_prompts": list(CLASS_PROMPTS),
                 "bg_prompts": list(BACKGROUND_NAMES), "templates": [ORIGAMI_TEMPLATE]},
        "refine": r,
    }


# ------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------
_FORM_ORDER = ("objects_background", "objects", "origami", "background")


def normalize_batch(images: Sequence[np.ndarray]) -> torch.Tensor:
    """H×W×3 uint8 images → ``B×3×H×W`` float32, ImageNet mean/std on 0..255 (spec §1.2)."""
    arr = normalize_array(np.stack(images), "imagenet")
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(0, 3, 1, 2)))


def sample_caption(classes: Sequence[int], bg: int, rng: np.random.Generator, weights: Sequence[float]) -> tuple[str, Optional[frozenset], Optional[int]]:
    """A random caption and what it asserts: (text, class set or None, background or None)."""
    forms = caption_forms(classes, bg)
    w = np.array([float(x) if forms[f] else 0.0 for f, x in zip(_FORM_ORDER, weights)])
    form = _FORM_ORDER[int(rng.choice(4, p=w / w.sum()))]
    caps = forms[form]
    text = caps[int(rng.integers(len(caps)))]
    cls = None if form == "background" else frozenset(int(c) for c in classes)
    b = int(bg) if form in ("objects_background", "background") else None
    return text, cls, b


class PretrainStream(torch.utils.data.IterableDataset):
    """Batches of (images, token ids, meta) generated on the fly; batch ``s`` is a pure function of
    ``(seed, s)``: images ``pretrain + s·B + 1 … pretrain + (s+1)·B``."""

    def __init__(self, seed: int, batch_size: int, world: WorldConfig, context_length: int, start_step: int = 0,
                 caption_weights: Sequence[float] = (0.35, 0.25, 0.3, 0.1)):
        super().__init__()
        self.seed, self.bs, self.world, self.ctx = seed, batch_size, world, context_length
        self.start_step, self.weights = start_step, tuple(caption_weights)

    def batch(self, step: int):
        base = SPLIT_OFFSETS["pretrain"] + step * self.bs
        imgs, texts, cls_sets, bgs, cap_cls, cap_bg = [], [], [], [], [], []
        rng = np.random.default_rng([self.seed, 7919, step])
        for i in range(self.bs):
            s = generate_sample(self.seed, base + i + 1, self.world)
            imgs.append(s.image)
            t, cc, cb = sample_caption(s.classes, s.background, rng, self.weights)
            texts.append(t)
            cls_sets.append(frozenset(s.classes))
            bgs.append(s.background)
            cap_cls.append(cc)
            cap_bg.append(cb)
        pos = positive_matrix(cls_sets, bgs, cap_cls, cap_bg)
        return normalize_batch(imgs), tokenize(texts, self.ctx), pos, presence_matrix(cls_sets, bgs)

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        nw, wid = (1, 0) if info is None else (info.num_workers, info.id)
        step = self.start_step + wid
        while True:
            yield self.batch(step)
            step += nw


def positive_matrix(img_classes: Sequence[frozenset], img_bg: Sequence[int], cap_classes: Sequence[Optional[frozenset]],
                    cap_bg: Sequence[Optional[int]]) -> torch.Tensor:
    """``B×B`` bool: caption ``j`` correctly describes image ``i`` (diagonal always true)."""
    B = len(img_classes)
    pos = torch.zeros(B, B, dtype=torch.bool)
    for i in range(B):
        for j in range(B):
            ok_c = cap_classes[j] is None or cap_classes[j] == img_classes[i]
            ok_b = cap_bg[j] is None or cap_bg[j] == img_bg[i]
            pos[i, j] = ok_c and ok_b
    pos |= torch.eye(B, dtype=torch.bool)
    return pos


def presence_matrix(img_classes: Sequence[frozenset], img_bg: Sequence[int]) -> torch.Tensor:
    """``B×(C+NB)`` float image-level labels: the classes present and the background of each image
    (columns in :func:`label_prompts` order). Image-level only: no mask information."""
    y = torch.zeros(len(img_classes), len(CLASS_NAMES) + len(BACKGROUND_NAMES))
    for i, (cs, bg) in enumerate(zip(img_classes, img_bg)):
        for c in cs:
            y[i, c] = 1.0
        y[i, len(CLASS_NAMES) + bg] = 1.0
    return y


def label_prompts() -> list[str]:
    """The WeCLIP prompts of the world's classes then backgrounds (what GradCAM will score)."""
    return [ORIGAMI_TEMPLATE.format(p) for p in list(CLASS_PROMPTS) + list(BACKGROUND_NAMES)]


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
    → ``B×(L−1)×E`` (CLS dropped). This is the path GradCAM on the last block's ``ln_1`` reads
    (spec §2.3), so a token loss here makes GradCAM local."""
    v = clip.visual
    blk = v.transformer.resblocks[-1]
    D = x_last_in.shape[-1]
    a = blk.ln_1(x_last_in[:, 1:])
    w_v = blk.attn.in_proj_weight[2 * D:]
    b_v = blk.attn.in_proj_bias[2 * D:] if blk.attn.in_proj_bias is not None else None
    o = blk.attn.out_proj(F.linear(a, w_v, b_v))
    return v.ln_post(o) @ v.proj


def head_mean_attention(blk: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Head-averaged attention probabilities of an open_clip block (with grad), from its input
    ``x`` ``B×L×D``: ``mean_h softmax(q_h·k_hᵀ/√d)`` → ``B×L×L`` (what RFM reads, spec §1.5)."""
    return _block_attention(blk, blk.ln_1(x), need_attn=True)[1]


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


def prompt_vs_background_loss(img: torch.Tensor, label_txt: torch.Tensor, y: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The scoring GradCAM uses (spec §2.2), trained on image-level labels: for every present class
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


def multi_positive_clip_loss(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE with soft targets spread uniformly over the positives of each row/column."""
    logits = scale * img.float() @ txt.float().t()
    t_i = pos.float() / pos.float().sum(1, keepdim=True)
    t_t = pos.float().t() / pos.float().t().sum(1, keepdim=True)
    li = -(t_i * F.log_softmax(logits, dim=1)).sum(1).mean()
    lt = -(t_t * F.log_softmax(logits.t(), dim=1)).sum(1).mean()
    return 0.5 * (li + lt)


# ------------------------------------------------------------------------------------------------
# Evaluation
# ------------------------------------------------------------------------------------------------
class EvalSet:
    """Held-out val images: ``n_zs`` single-object ones (zero-shot) and the first ``n_cam`` (CAMs)."""

    def __init__(self, seed: int, world: WorldConfig, n_zs: int, n_cam: int):
        off = SPLIT_OFFSETS["val"]
        self.cam = [generate_sample(seed, off + k, world) for k in range(1, n_cam + 1)]
        zs, k = [], 1
        while len(zs) < n_zs:
            s = generate_sample(seed, off + 100_000 + k, world)
            if len(s.classes) == 1:
                zs.append(s)
            k += 1
        self.zs_x = normalize_batch([s.image for s in zs])
        self.zs_y = torch.tensor([s.classes[0] for s in zs])
        self.bg_miou = _miou([s.mask for s in self.cam], [np.zeros_like(s.mask) for s in self.cam])


def _miou(gts, preds, n: int = len(CLASS_NAMES) + 1) -> float:
    from weclip_infer.metrics import ConfusionMatrix

    cm = ConfusionMatrix(n)
    for g, p in zip(gts, preds):
        cm.update(np.asarray(g), np.asarray(p))
    return float(cm.compute()["miou"])


def _cam_labels(cams: list, keys: list, size: tuple[int, int]) -> list[np.ndarray]:
    out = []
    for c, k in zip(cams, keys):
        if len(k) == 0:
            out.append(np.zeros(size, np.uint8))
            continue
        from weclip_infer.cam import minmax_normalize

        # per-class min-max first (as WeCLIP does before PAR, spec §2.3/§2.5): the refined CAMs are
        # not in [0, 1]; the initial ones already are (no-op)
        up = F.interpolate(minmax_normalize(c.float())[None], size=size, mode="bilinear", align_corners=False)[0]
        stack = torch.cat([1 - up.max(0, keepdim=True).values, up], 0)
        idx = stack.argmax(0).numpy()
        lut = np.array([0] + [int(x) + 1 for x in k], np.uint8)
        out.append(lut[idx])
    return out


@torch.no_grad()
def zero_shot(clip: nn.Module, ev: EvalSet, ctx: int) -> float:
    clip.eval()
    txt = F.normalize(clip.encode_text(tokenize([ORIGAMI_TEMPLATE.format(p) for p in CLASS_PROMPTS], ctx)), dim=-1)
    preds = []
    fb = FrozenCLIP(clip)  # WeCLIP's forward (interpolates positional embeddings for other sizes)
    for i in range(0, len(ev.zs_x), 50):
        feats, _, _ = fb.forward_features(ev.zs_x[i:i + 50], num_blocks=fb.num_blocks, need_attn=False)
        img = fb.pooled_embedding(feats[-1])
        preds.append((img @ txt.t()).argmax(1))
    return float((torch.cat(preds) == ev.zs_y).float().mean())


def evaluate(clip: nn.Module, ev: EvalSet, model_cfg: dict, refine: Optional[dict] = None, batch: int = 8) -> dict:
    """Zero-shot top-1 and WeCLIP CAM / pseudo-label mIoU of ``clip`` (not modified)."""
    from weclip_infer.model import build_model

    ctx = int(model_cfg["text_cfg"]["context_length"])
    c = copy.deepcopy(clip).float().eval()
    res = {"zs_top1": zero_shot(c, ev, ctx), "logit_scale": float(c.logit_scale.exp())}
    model = build_model(weclip_config(model_cfg, refine), clip=c, device="cpu").eval()
    gts, init_l, static_l, pseudo_l = [], [], [], []
    n_cls = len(CLASS_NAMES)
    for i in range(0, len(ev.cam), batch):
        ss = ev.cam[i:i + batch]
        x = normalize_batch([s.image for s in ss])
        lab = torch.zeros(len(ss), n_cls)
        for b, s in enumerate(ss):
            lab[b, list(s.classes)] = 1
        rec = model.intermediates(x, lab, use_rfm=False)
        size = tuple(x.shape[-2:])
        init_l += _cam_labels(rec["cam_init"], rec["cam_keys"], size)
        static_l += _cam_labels(rec["cam_static"], rec["cam_keys"], size)
        pseudo_l += [p.numpy() for p in rec["pseudo_label"]]
        gts += [s.mask for s in ss]
    res.update(cam_miou=_miou(gts, init_l), static_cam_miou=_miou(gts, static_l), pseudo_miou=_miou(gts, pseudo_l),
               bg_miou=ev.bg_miou)
    return res


# ------------------------------------------------------------------------------------------------
# Saving
# ------------------------------------------------------------------------------------------------
def save_outputs(clip: nn.Module, out: Path, model_cfg: dict, token_ids: list[int], dtype: str, prov: dict) -> int:
    out.mkdir(parents=True, exist_ok=True)
    c = copy.deepcopy(clip).float()
    if dtype == "fp16":
        c = c.half()
    path = out / "clip.safetensors"
    save_clip(c, path, model_cfg, patch_stem="conv", text_token_ids=token_ids)
    size = path.stat().st_size
    prov = dict(prov, file_bytes=size, weights_dtype=dtype)
    from weclip_infer.io_utils import write_json_atomic

    write_json_atomic(out / "provenance.json", prov)  # files get the user's umask mode
    return size


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------
def _param_groups(clip: nn.Module, lr: float, wd: float, scale_lr: float):
    decay, no_decay, scale = [], [], []
    for n, p in clip.named_parameters():
        if not p.requires_grad:
            continue
        if n == "logit_scale":
            scale.append(p)
        elif p.ndim < 2 or "embedding" in n or n.endswith(".bias") or "ln_" in n:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": wd, "lr": lr, "base_lr": lr},
            {"params": no_decay, "weight_decay": 0.0, "lr": lr, "base_lr": lr},
            {"params": scale, "weight_decay": 0.0, "lr": scale_lr, "base_lr": scale_lr}]


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=35.0, help="training time budget (excluding the final eval)")
    ap.add_argument("--steps", type=int, default=None, help="fixed number of steps (schedule by steps; deterministic)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--scale-lr", type=float, default=1e-2, help="own lr of the learnable log temperature")
    ap.add_argument("--init-scale", type=float, default=25.0, help="initial exp(logit_scale)")
    ap.add_argument("--max-scale", type=float, default=100.0)
    ap.add_argument("--wd", type=float, default=0.05)
    ap.add_argument("--warmup", type=int, default=40, help="warm-up steps")
    ap.add_argument("--eval-every", type=float, default=240.0, help="seconds between evaluations (0: only at the end)")
    ap.add_argument("--eval-zs", type=int, default=200)
    ap.add_argument("--eval-cam", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--token-loss", type=float, default=0.0,
                    help="weight of the token-level MIL loss (image-level labels; keeps token features local)")
    ap.add_argument("--token-feature", choices=("value", "final"), default="value",
                    help="tokens the MIL loss reads: the last block's value path (what GradCAM sees) or the final tokens")
    ap.add_argument("--attn-loss", type=float, default=0.0,
                    help="weight of the attention-affinity loss (needs --token-loss, value tokens): the last "
                         "--attn-blocks blocks' attention is pulled towards the affinity of the tokens' prompt predictions")
    ap.add_argument("--prompt-loss", type=float, default=0.0,
                    help="weight of the present-class-vs-background-prompts loss (needs --token-loss > 0)")
    ap.add_argument("--attn-blocks", type=int, default=4, help="how many last blocks the attention loss reads")
    ap.add_argument("--object-style", choices=OBJECT_STYLES, default="flat",
                    help="demo-world object style (WorldConfig.object_style) to train and evaluate on")
    ap.add_argument("--badge-scale", type=float, nargs=2, metavar=("LO", "HI"), default=list(WorldConfig.badge_scale),
                    help="badge style: badge radius range as a fraction of the object radius "
                         f"(default {' '.join(map(str, WorldConfig.badge_scale))})")
    ap.add_argument("--init", type=Path, default=None, help="start from this clip.safetensors (fine-tuning)")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (only faster on CPUs with native bf16)")
    ap.add_argument("--dtype", choices=("fp16", "fp32"), default="fp16", help="stored weight dtype")
    ap.add_argument("--tiny", action="store_true", help="tiny model and 64 px world (tests)")
    ap.add_argument("--model-cfg", type=str, default=None, help="JSON open_clip model config (overrides the default)")
    ap.add_argument("--eval-only", action="store_true", help="only evaluate OUT/clip.safetensors and print JSON")
    ap.add_argument("--eval-size", type=int, default=None, help="--eval-only: world image size (default: the model's)")
    ap.add_argument("--static-blocks", type=int, default=None, help="--eval-only: refine.static_blocks override")
    ap.add_argument("--cam-logit-scale", type=float, default=None, help="--eval-only: refine.cam_logit_scale override")
    return ap.parse_args(argv)


def eval_only(args: argparse.Namespace) -> dict:
    """Evaluate a written ``clip.safetensors`` (optionally at another image size / static_blocks)."""
    from safetensors import safe_open

    path = args.out / "clip.safetensors"
    with safe_open(str(path), "pt") as f:
        model_cfg = json.loads(f.metadata()["open_clip_cfg"])
    model_cfg.pop("patch_stem", None)
    clip = load_clip(BackboneConfig(clip_weights=str(path)))
    size = args.eval_size or int(model_cfg["vision_cfg"]["image_size"])
    ev = EvalSet(args.seed, WorldConfig(size=size, object_style=args.object_style, badge_scale=tuple(args.badge_scale)), args.eval_zs, args.eval_cam)
    refine = DEFAULT_WECLIP_REFINE(int(model_cfg["vision_cfg"]["layers"]))
    if args.static_blocks:
        refine["static_blocks"] = args.static_blocks
    if args.cam_logit_scale:
        refine["cam_logit_scale"] = args.cam_logit_scale
    r = dict(evaluate(clip, ev, model_cfg, refine), eval_size=size, refine=refine)
    print(json.dumps(r), flush=True)
    return r


def main(argv=None) -> dict:
    args = parse_args(argv)
    t_start = time.time()
    torch.set_num_threads(args.threads)
    if args.eval_only:
        return eval_only(args)
    torch.manual_seed(args.seed)
    model_cfg = json.loads(args.model_cfg) if args.model_cfg else copy.deepcopy(TINY_MODEL_CFG if args.tiny else DEFAULT_MODEL_CFG)
    img_size = int(model_cfg["vision_cfg"]["image_size"])
    world = WorldConfig(size=img_size, object_style=args.object_style, badge_scale=tuple(args.badge_scale))
    ctx = int(model_cfg["text_cfg"]["context_length"])
    token_ids = world_token_ids(ctx)
    if args.init is not None:
        from safetensors import safe_open

        clip = load_clip(BackboneConfig(clip_weights=str(args.init))).float()
        with safe_open(str(args.init), "pt") as f:
            model_cfg = json.loads(f.metadata()["open_clip_cfg"])
        model_cfg.pop("patch_stem", None)
    else:
        clip = build_clip(model_cfg, args.seed)
        with torch.no_grad():
            clip.logit_scale.fill_(math.log(args.init_scale))
    clip.train()
    n_params = sum(p.numel() for n, p in clip.named_parameters() if n != "token_embedding.weight")
    opt = torch.optim.AdamW(_param_groups(clip, args.lr, args.wd, args.scale_lr), betas=(0.9, 0.98), eps=1e-6)
    ev = EvalSet(args.seed, world, args.eval_zs, args.eval_cam)
    refine = DEFAULT_WECLIP_REFINE(int(model_cfg["vision_cfg"]["layers"]))
    stream = PretrainStream(args.seed, args.batch_size, world, ctx)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=args.workers,
                                         persistent_workers=args.workers > 0, prefetch_factor=4 if args.workers else None)
    args.out.mkdir(parents=True, exist_ok=True)
    log_path = args.out / "pretrain_log.csv"
    fields = ["step", "images", "elapsed_s", "lr", "loss", "images_per_s", "logit_scale", "zs_top1", "cam_miou",
              "static_cam_miou", "pseudo_miou", "bg_miou", "eval_s"]
    with open(log_path, "w", newline="") as f:
        csv.DictWriter(f, fieldnames=fields).writeheader()
    budget = args.minutes * 60.0
    prov_base = {
        "command": " ".join([os.path.basename(sys.executable), "-m", "weclip_infer.demo.pretrain_clip"] + list(sys.argv[1:] if argv is None else argv)),
        "seed": args.seed, "batch_size": args.batch_size, "lr": args.lr, "scale_lr": args.scale_lr,
        "init_logit_scale": args.init_scale, "weight_decay": args.wd, "warmup_steps": args.warmup, "bf16_autocast": args.bf16,
        "loss": "symmetric InfoNCE, multi-positive targets (caption j positive for image i if it correctly describes it)"
                + (f" + {args.token_loss} x token-level MIL loss (per-token softmax over the WeCLIP class/background prompts,"
                   " max over tokens, BCE vs image-level presence)" if args.token_loss > 0 else "")
                + (f" + {args.attn_loss} x attention-affinity loss (KL from the affinity of the tokens' detached prompt"
                   f" predictions to the head-averaged attention of the last {args.attn_blocks} blocks)" if args.attn_loss > 0 else "")
                + (f" + {args.prompt_loss} x present-class-vs-background-prompts CE on the pooled embedding" if args.prompt_loss > 0 else ""),
        "prompt_loss": args.prompt_loss, "token_loss": args.token_loss, "token_feature": args.token_feature,
        "attn_loss": args.attn_loss, "attn_blocks": args.attn_blocks,
        "init": str(args.init) if args.init is not None else None,
        "pool": "avg of patch tokens after ln_post (= FrozenCLIP.pooled_embedding)",
        "normalize": "imagenet (mean/std on 0..255)",
        "model_cfg": model_cfg, "patch_stem": "conv", "params_excluding_token_table": n_params,
        "kept_token_ids": len(token_ids), "world": world.to_dict(), "world_split": "pretrain (train), val (eval)",
        "weclip_eval_config": {"refine": refine, "text": weclip_config(model_cfg)["text"], "use_rfm": False,
                               "n_val_cam_images": args.eval_cam, "n_val_zero_shot_images": args.eval_zs},
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "open_clip": __import__("open_clip").__version__, "numpy": np.__version__},
        "threads": args.threads,
    }
    print(f"[pretrain] params (w/o token table) {n_params/1e6:.2f} M, kept tokens {len(token_ids)}, "
          f"all-background mIoU {ev.bg_miou:.4f}", flush=True)

    step, images, loss_acc, n_acc = 0, 0, 0.0, 0
    t0 = time.time()
    last_eval, t_win, img_win = t0, t0, 0
    lr_now = 0.0
    last: dict = {}

    def progress() -> float:
        if args.steps is not None:
            return step / max(1, args.steps)
        return (time.time() - t0) / budget

    def do_eval(final: bool = False) -> dict:
        nonlocal t_win, img_win, loss_acc, n_acc
        te = time.time()
        r = evaluate(clip, ev, model_cfg, refine)
        clip.train()
        ips = img_win / max(1e-9, te - t_win)
        row = {"step": step, "images": images, "elapsed_s": round(te - t0, 1), "lr": f"{lr_now:.3g}",
               "loss": round(loss_acc / max(1, n_acc), 4), "images_per_s": round(ips, 1),
               "logit_scale": round(r["logit_scale"], 2), "zs_top1": round(r["zs_top1"], 4), "cam_miou": round(r["cam_miou"], 4),
               "static_cam_miou": round(r["static_cam_miou"], 4), "pseudo_miou": round(r["pseudo_miou"], 4),
               "bg_miou": round(r["bg_miou"], 4), "eval_s": round(time.time() - te, 1)}
        with open(log_path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=fields).writerow(row)
        print("[pretrain] " + " ".join(f"{k}={v}" for k, v in row.items()), flush=True)
        prov = dict(prov_base, steps=step, images_seen=images, train_wall_s=round(te - t0, 1),
                    total_wall_s=round(time.time() - t_start, 1), final=final,
                    zero_shot_top1=r["zs_top1"], cam_miou=r["cam_miou"], static_cam_miou=r["static_cam_miou"],
                    pseudo_label_miou=r["pseudo_miou"], all_background_miou=r["bg_miou"], learned_logit_scale=r["logit_scale"])
        save_outputs(clip, args.out, model_cfg, token_ids, args.dtype, prov)
        loss_acc, n_acc, img_win = 0.0, 0, 0
        t_win = time.time()
        return r

    label_tok = tokenize(label_prompts(), ctx)
    last_in: list = [None]
    if args.token_loss > 0 and args.token_feature == "value":
        def _keep_input(_m, inp):
            last_in[0] = inp[0]
        clip.visual.transformer.resblocks[-1].register_forward_pre_hook(_keep_input)
    if args.prompt_loss > 0 and not args.token_loss > 0:
        raise SystemExit("--prompt-loss needs --token-loss > 0 (it reads the same prompt embeddings)")
    if args.attn_loss > 0 and not (args.token_loss > 0 and args.token_feature == "value"):
        raise SystemExit("--attn-loss needs --token-loss > 0 with --token-feature value")
    attn_in: dict = {}
    if args.attn_loss > 0:
        blocks = clip.visual.transformer.resblocks
        for bi in range(max(0, len(blocks) - args.attn_blocks), len(blocks)):
            def _keep(_m, inp, bi=bi):
                attn_in[bi] = inp[0]
            blocks[bi].register_forward_pre_hook(_keep)
    clip.visual.output_tokens = args.token_loss > 0
    tok_acc = 0.0
    it = iter(loader)
    while progress() < 1.0:
        x, tok, pos, y = next(it)
        p = progress()
        lr_fac = min(1.0, (step + 1) / max(1, args.warmup)) * (0.5 * (1 + math.cos(math.pi * min(1.0, p))))
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * lr_fac
        lr_now = args.lr * lr_fac
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            if args.token_loss > 0:
                pooled, tokens = clip.visual(x)
                img = F.normalize(pooled.float(), dim=-1)
                txt_all = clip.encode_text(torch.cat([tok, label_tok]))
                txt = F.normalize(txt_all[: tok.shape[0]].float(), dim=-1)
                tokens = value_tokens(clip, last_in[0]) if args.token_feature == "value" else tokens @ clip.visual.proj
            else:
                img = F.normalize(clip.encode_image(x).float(), dim=-1)
                txt = F.normalize(clip.encode_text(tok).float(), dim=-1)
        loss = multi_positive_clip_loss(img, txt, clip.logit_scale.exp(), pos)
        if args.token_loss > 0:
            qp = token_prompt_probs(tokens, txt_all[tok.shape[0]:])  # B×N×K
            loss_tok = mil_bce(qp, y)
            tok_acc += loss_tok.item()
            loss = loss + args.token_loss * loss_tok
        if args.prompt_loss > 0:
            loss = loss + args.prompt_loss * prompt_vs_background_loss(img, txt_all[tok.shape[0]:], y, clip.logit_scale.exp())
        if args.attn_loss > 0:  # qp is detached inside the loss
            blocks = clip.visual.transformer.resblocks
            loss_attn = sum(attention_affinity_loss(head_mean_attention(blocks[bi], xin), qp)
                            for bi, xin in attn_in.items()) / len(attn_in)
            loss = loss + args.attn_loss * loss_attn
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(clip.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            clip.logit_scale.clamp_(0, math.log(args.max_scale))
        step += 1
        images += x.shape[0]
        img_win += x.shape[0]
        loss_acc += loss.item()
        n_acc += 1
        if step % 10 == 0:
            print(f"[pretrain] step {step} loss {loss_acc / n_acc:.4f} (token {tok_acc / max(1, step):.4f}) lr {lr_now:.2e} "
                  f"{img_win / max(1e-9, time.time() - t_win):.1f} img/s scale {float(clip.logit_scale.exp()):.1f}", flush=True)
        if args.eval_every > 0 and time.time() - last_eval >= args.eval_every and progress() < 1.0:
            last = do_eval()
            last_eval = time.time()
    last = do_eval(final=True)
    clip.visual.output_tokens = False
    del it, loader
    return dict(last, clip=clip.eval(), model_cfg=model_cfg, token_ids=token_ids, steps=step, images=images)


if __name__ == "__main__":
    main()

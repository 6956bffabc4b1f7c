"""Evaluating a demo CLIP during pre-training: zero-shot top-1 on held-out single-object images
and the mIoU of WeCLIP's initial CAM, static-refined CAM and pseudo label on held-out val images."""
from __future__ import annotations

import copy
from typing import Any, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from weclip_infer.backbone import FrozenCLIP
from weclip_infer.text import tokenize

from .pretrain_data import normalize_batch
from .world import (
    BACKGROUND_NAMES,
    CLASS_NAMES,
    CLASS_PROMPTS,
    ORIGAMI_TEMPLATE,
    SPLIT_OFFSETS,
    Sample,
    WorldConfig,
    generate_sample,
)

__all__ = ["DEFAULT_WECLIP_REFINE", "weclip_config", "EvalSet", "zero_shot", "evaluate"]


#: WeCLIP refinement settings used for the CAM evaluation of a tower with ``L`` blocks
#: (the reference uses 8 of 12 maps for the static refinement and 6 candidates for RFM).
def DEFAULT_WECLIP_REFINE(num_layers: int) -> dict:  # noqa: N802 - constant-like
    return {"static_blocks": max(1, min(num_layers, round(num_layers * 8 / 12))),
            "candidate_blocks": max(1, min(num_layers, num_layers // 2)),
            "cam_logit_scale": None, "box_threshold": 0.4, "use_rfm": False}



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
# Evaluation
# ------------------------------------------------------------------------------------------------
class EvalSet:
    """Held-out val images: ``n_zs`` single-object ones (zero-shot) and the first ``n_cam`` (CAMs)."""

    def __init__(self, seed: int, world: WorldConfig, n_zs: int, n_cam: int):
        off = SPLIT_OFFSETS["val"]
        self.cam = [generate_sample(seed, off + k, world) for k in range(1, n_cam + 1)]
        zs: list[Sample] = []
        k = 1
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

        # per-class min-max first (as WeCLIP does before PAR): the refined CAMs are
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
    open_clip_model: Any = clip  # open_clip's CLIP (untyped)
    prompts = tokenize([ORIGAMI_TEMPLATE.format(p) for p in CLASS_PROMPTS], ctx)
    txt = F.normalize(open_clip_model.encode_text(prompts), dim=-1)

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
    logit_scale = c.logit_scale
    assert isinstance(logit_scale, torch.Tensor)  # CLIP's learned temperature (a parameter)
    res = {"zs_top1": zero_shot(c, ev, ctx), "logit_scale": float(logit_scale.exp())}
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
        size = (int(x.shape[-2]), int(x.shape[-1]))

        init_l += _cam_labels(rec["cam_init"], rec["cam_keys"], size)
        static_l += _cam_labels(rec["cam_static"], rec["cam_keys"], size)
        pseudo_l += [p.numpy() for p in rec["pseudo_label"]]
        gts += [s.mask for s in ss]
    res.update(cam_miou=_miou(gts, init_l), static_cam_miou=_miou(gts, static_l), pseudo_miou=_miou(gts, pseudo_l),
               bg_miou=ev.bg_miou)
    return res

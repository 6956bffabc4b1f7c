"""What the demo CLIP is pre-trained on: the world's vocabulary, on-the-fly caption batches and
the image/caption and image/label targets (see :mod:`.pretrain_clip`)."""
from __future__ import annotations

from itertools import combinations
from typing import Optional, Sequence

import numpy as np
import torch

from weclip_infer.normalization import normalize_array
from weclip_infer.text import tokenize

from .world import (
    BACKGROUND_NAMES,
    CLASS_NAMES,
    CLASS_PROMPTS,
    ORIGAMI_TEMPLATE,
    SPLIT_OFFSETS,
    WorldConfig,
    caption_forms,
    generate_sample,
)

__all__ = ["all_world_texts", "world_token_ids", "normalize_batch", "sample_caption", "PretrainStream",
           "positive_matrix", "presence_matrix", "label_prompts"]


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
# Data
# ------------------------------------------------------------------------------------------------
_FORM_ORDER = ("objects_background", "objects", "origami", "background")


def normalize_batch(images: Sequence[np.ndarray]) -> torch.Tensor:
    """H×W×3 uint8 images → ``B×3×H×W`` float32, ImageNet mean/std on 0..255."""
    arr = normalize_array(np.stack(images), "imagenet")
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(0, 3, 1, 2)))


def sample_caption(classes: Sequence[int], bg: int, rng: np.random.Generator, weights: Sequence[float]
                   ) -> tuple[str, Optional[frozenset], Optional[int]]:
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

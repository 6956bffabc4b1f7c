"""Captions of demo-world images (the text side of CLIP pre-training)."""
from __future__ import annotations

from itertools import permutations
from typing import Optional, Sequence, Union

import numpy as np

from .world_config import _FORM_TEMPLATES, _FORMS, BACKGROUND_NAMES, CLASS_PROMPTS, Sample, WorldConfig

__all__ = ["caption_forms", "all_captions", "caption_for"]

# --------------------------------------------------------------------------------------------
# Captions
# --------------------------------------------------------------------------------------------
def _with_article(p: str) -> str:
    return ("an " if p[:1].lower() in "aeiou" else "a ") + p


def _join(items: Sequence[str]) -> str:
    items = list(items)
    if len(items) <= 1:
        return items[0] if items else ""
    return ", ".join(items[:-1]) + " and " + items[-1]


def _fill(template: str, prompts: Sequence[str], bg: str) -> str:
    return template.format(objs=_join([_with_article(p) for p in prompts]), bare=_join(prompts), bg=bg)


def caption_forms(classes: Sequence[int], background: int) -> dict[str, list[str]]:
    """All captions of an image with ``classes`` (0-based) on ``background``, grouped by form.

    Forms: ``objects_background`` ("a red circle and a blue square on grass."), ``objects``
    ("a photo of a red circle and a blue square."), ``origami`` ("a clean origami red circle and
    blue square." — WeCLIP's template) and ``background`` ("grass.", "a photo of grass.", "a clean
    origami grass."). Every object order is enumerated. Object forms are empty when ``classes`` is.
    """
    bg = BACKGROUND_NAMES[int(background)]
    prompts = [CLASS_PROMPTS[int(c)] for c in sorted(set(int(c) for c in classes))]
    out: dict[str, list[str]] = {}
    for form in _FORMS:
        caps: list[str] = []
        if form == "background":
            caps = [_fill(t, [], bg) for t in _FORM_TEMPLATES[form]]
        elif prompts:
            for t in _FORM_TEMPLATES[form]:
                for perm in permutations(prompts):
                    caps.append(_fill(t, perm, bg))
        out[form] = caps
    return out


def all_captions(sample_or_classes: Union[Sample, Sequence[int]], background: Optional[int] = None) -> list[str]:
    """Every caption form for a sample (or for ``classes`` + ``background``), in a fixed order."""
    classes: Sequence[int]
    if isinstance(sample_or_classes, Sample):
        classes, background = sample_or_classes.classes, sample_or_classes.background
    else:
        classes = sample_or_classes
        if background is None:
            raise ValueError("background is required when passing classes")
    forms = caption_forms(classes, int(background))
    return [c for form in _FORMS for c in forms[form]]


def _random_caption(classes: Sequence[int], background: int, rng: np.random.Generator, weights: Sequence[float]) -> str:
    w = np.asarray(weights, dtype=np.float64)
    if not classes:
        w = w * np.array([0.0, 0.0, 0.0, 1.0])
    if w.sum() <= 0:
        w = np.array([0.0, 0.0, 0.0, 1.0]) if not classes else np.array([1.0, 0.0, 0.0, 0.0])
    form = _FORMS[int(rng.choice(len(_FORMS), p=w / w.sum()))]
    templates = _FORM_TEMPLATES[form]
    t = templates[int(rng.integers(len(templates)))]
    prompts = [CLASS_PROMPTS[int(c)] for c in classes]
    order: Union[np.ndarray, list[int]] = rng.permutation(len(prompts)) if prompts else []

    return _fill(t, [prompts[i] for i in order], BACKGROUND_NAMES[int(background)])


def caption_for(sample: Sample, rng: np.random.Generator, cfg: Optional[WorldConfig] = None) -> str:
    """A fresh random caption for ``sample`` (random form, template and object order) from ``rng``.

    Use this for on-the-fly caption augmentation during CLIP pre-training; object forms always
    mention exactly the classes visible in the sample.
    """
    weights = (cfg or WorldConfig()).caption_form_weights
    return _random_caption(sample.classes, sample.background, rng, weights)

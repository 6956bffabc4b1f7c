"""Class names, background names, prompt templates and cached text embeddings."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from .config import ConfigError, TextConfig

__all__ = [
    "VOC_CLASSES", "VOC_PROMPTS", "VOC_BACKGROUND", "COCO_CLASSES", "COCO_PROMPTS", "COCO_BACKGROUND",
    "ClassSpec", "resolve_classes", "tokenize", "text_embeddings",
]

from .classes import (  # noqa: E402 - the lists are data, kept in one module
    COCO_BACKGROUND,
    COCO_CLASSES,
    COCO_PROMPTS,
    VOC_BACKGROUND,
    VOC_CLASSES,
    VOC_PROMPTS,
)


@dataclass
class ClassSpec:
    """Resolved class lists: ``names`` (display, label i+1), ``prompts`` (fg, same order),
    ``bg_prompts`` and ``templates``."""

    names: list
    prompts: list
    bg_prompts: list
    templates: list

    @property
    def num_classes(self) -> int:
        """Number of classes including background."""
        return len(self.names) + 1


def resolve_classes(cfg: TextConfig) -> ClassSpec:
    """The class/prompt lists named by ``cfg`` (VOC, COCO, or the user's custom lists)."""
    if cfg.dataset == "voc":
        names, prompts, bg = VOC_CLASSES, VOC_PROMPTS, VOC_BACKGROUND
    elif cfg.dataset == "coco":
        names, prompts, bg = COCO_CLASSES, COCO_PROMPTS, COCO_BACKGROUND
    else:
        if not cfg.class_names:
            raise ConfigError("text.class_names: required for a custom dataset")
        names, prompts = cfg.class_names, cfg.class_prompts or cfg.class_names
        bg = cfg.bg_prompts if cfg.bg_prompts is not None else VOC_BACKGROUND

    if cfg.class_names is not None and cfg.dataset != "custom":
        names = cfg.class_names
    if cfg.class_prompts is not None:
        prompts = cfg.class_prompts
    if cfg.bg_prompts is not None:
        bg = cfg.bg_prompts
    if len(prompts) != len(names):
        raise ConfigError("text.class_prompts: must have one entry per class name")
    if len(set(names)) != len(names):
        raise ConfigError("text.class_names: duplicate class names")
    if any(not str(n).strip() for n in names):
        raise ConfigError("text.class_names: empty class name")
    return ClassSpec(list(names), list(prompts), list(bg), list(cfg.templates))


def tokenize(texts: Sequence[str], context_length: int = 77) -> torch.Tensor:
    """CLIP BPE tokens (``<sot>`` … ``<eot>``, zero-padded): ``T×context_length`` int64.
    Uses open_clip's bundled vocabulary (no network)."""
    from open_clip.tokenizer import tokenize as _tok

    return _tok(list(texts), context_length=context_length)


@torch.no_grad()
def text_embeddings(backbone, prompts: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
    """Per prompt: encode every template, L2-normalise, average, L2-normalise again.

    Returns ``P×E`` (``E`` = CLIP embedding dim, 512 for ViT-B/16).
    """
    device = next(backbone.parameters()).device
    out = []
    for t in templates:
        toks = tokenize([t.format(p) for p in prompts], backbone.context_length).to(device)
        out.append(F.normalize(backbone.encode_text(toks).float(), dim=-1))
    return F.normalize(torch.stack(out, 0).mean(0), dim=-1)

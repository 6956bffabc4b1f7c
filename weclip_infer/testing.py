"""Tiny random WeCLIP models for tests and examples: the whole pipeline in well under a second.

``build_model(tiny_config())`` gives a 4-block, 64-wide CLIP-style model with three custom classes
and random weights (seeded). It exercises every code path of the full-size model, so extension
code can be tested without CLIP weights.
"""
from __future__ import annotations

import copy
from typing import Any, Dict

__all__ = ["TINY_CLIP_CFG", "tiny_config"]

TINY_CLIP_CFG: Dict[str, Any] = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": 4, "width": 64, "patch_size": 16, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def tiny_config(**over: Dict[str, Any]) -> Dict[str, Any]:
    """The tiny model's config as a dict; ``over`` updates whole sections (e.g. ``refine={...}``)."""
    cfg: Dict[str, Any] = {
        "backbone": {"clip_weights": "random", "model_cfg": copy.deepcopy(TINY_CLIP_CFG), "seed": 0},
        "text": {"dataset": "custom", "class_names": ["red box", "green box", "blue box"],
                 "bg_prompts": ["noise", "grey"]},
        "decoder": {"dim": 32, "num_heads": 4, "num_layers": 1},
        "refine": {"candidate_blocks": 2, "static_blocks": 3, "cam_logit_scale": 10.0},
        "par": {"num_iter": 3, "dilations": [1, 2]},
    }
    for k, v in over.items():
        cfg.setdefault(k, {}).update(v)
    return cfg

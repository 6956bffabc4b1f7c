"""weclip-infer: WeCLIP (CVPR 2024) weakly supervised semantic segmentation on a frozen CLIP.

Public entry points (imported lazily so that light modules stay light):
``build_model``, ``WeCLIP``, ``WeCLIPConfig``, ``load_config``, ``Segmenter``,
``import_reference_checkpoint``, ``save_checkpoint``, ``load_checkpoint``.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "build_model": "weclip_infer.model",
    "WeCLIP": "weclip_infer.model",
    "WeCLIPConfig": "weclip_infer.config",
    "load_config": "weclip_infer.config",
    "ConfigError": "weclip_infer.config",
    "Segmenter": "weclip_infer.predictor",
    "Annotator": "weclip_infer.annotate",
    "SegmentationResult": "weclip_infer.predictor",
    "import_reference_checkpoint": "weclip_infer.checkpoint",
    "save_checkpoint": "weclip_infer.checkpoint",
    "load_checkpoint": "weclip_infer.checkpoint",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'weclip_infer' has no attribute {name!r}")

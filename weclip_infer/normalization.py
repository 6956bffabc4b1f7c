"""Input normalisation, defined once: the constants and how they are applied.

The authors' code normalises 0..255 RGB with ImageNet statistics (``imagenet``, the default);
CLIP's own statistics (``clip``) are available as an option. Both act on the 0..255 scale.
"""
from __future__ import annotations

from typing import Dict, Tuple

import numpy as np
import torch

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "CLIP_MEAN", "CLIP_STD", "NORMALIZATIONS", "mean_std",
           "normalize_array", "normalize_tensor"]

Triple = Tuple[float, float, float]


def _times_255(r: float, g: float, b: float) -> Triple:
    return (255.0 * r, 255.0 * g, 255.0 * b)


IMAGENET_MEAN: Triple = (123.675, 116.28, 103.53)
IMAGENET_STD: Triple = (58.395, 57.12, 57.375)
CLIP_MEAN = _times_255(0.48145466, 0.4578275, 0.40821073)
CLIP_STD = _times_255(0.26862954, 0.26130258, 0.27577711)

NORMALIZATIONS: Dict[str, Tuple[Triple, Triple]] = {
    "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
    "clip": (CLIP_MEAN, CLIP_STD),
}



def mean_std(kind: str) -> Tuple[Triple, Triple]:
    """``(mean, std)`` of a named normalisation; ``ValueError`` for an unknown name."""
    try:
        return NORMALIZATIONS[kind]
    except KeyError:
        raise ValueError(f"normalize: must be one of {sorted(NORMALIZATIONS)}, got {kind!r}") from None


def normalize_array(images: np.ndarray, kind: str = "imagenet") -> np.ndarray:
    """``...×H×W×3`` 0..255 RGB (uint8 or float) → float32 ``(x − mean) / std``, channels last kept."""
    mean, std = mean_std(kind)
    return (np.asarray(images, dtype=np.float32) - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def normalize_tensor(images: torch.Tensor, kind: str = "imagenet") -> torch.Tensor:
    """``B×3×H×W`` 0..255 RGB → float32 ``(x − mean) / std`` on the tensor's device."""
    mean, std = mean_std(kind)
    m = torch.tensor(mean, dtype=torch.float32, device=images.device).reshape(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=images.device).reshape(1, 3, 1, 1)
    return (images.float() - m) / s

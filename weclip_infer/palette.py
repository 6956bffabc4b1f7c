"""Colour palettes for label maps: the PASCAL VOC colormap, extended to 256 entries."""
from __future__ import annotations

import numpy as np

__all__ = ["voc_palette", "colorize", "overlay"]


def voc_palette(n: int = 256) -> np.ndarray:
    """The classic VOC ``bitget`` colormap: ``n``×3 uint8; index 255 is (224, 224, 192)."""
    pal = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal[i] = (r, g, b)
    return pal


def colorize(labels: np.ndarray) -> np.ndarray:
    """H×W integer labels → H×W×3 uint8 colour image with the VOC palette."""
    return voc_palette()[np.asarray(labels).astype(np.int64) % 256]


def overlay(image: np.ndarray, labels: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend the colourised ``labels`` (H×W) over ``image`` (H×W×3 uint8); background stays as is."""
    col = colorize(labels).astype(np.float32)
    img = np.asarray(image, dtype=np.float32)
    fg = (np.asarray(labels) > 0) & (np.asarray(labels) != 255)
    out = img.copy()
    out[fg] = (1 - alpha) * img[fg] + alpha * col[fg]
    return out.clip(0, 255).astype(np.uint8)

"""A preview mosaic of demo-world samples for eyeballing the world."""
from __future__ import annotations

from typing import Optional

import numpy as np

from .generate import iter_samples
from .world_config import WorldConfig

__all__ = ["preview_grid"]

# --------------------------------------------------------------------------------------------
# Preview
# --------------------------------------------------------------------------------------------
def preview_grid(seed: int = 0, n: int = 16, cfg: Optional[WorldConfig] = None, start: int = 1,
                 ncols: int = 4, with_masks: bool = True) -> np.ndarray:
    """An RGB mosaic of ``n`` samples (each image, and its colourised mask beside it if
    ``with_masks``), for eyeballing the world."""
    from weclip_infer.palette import colorize

    cfg = cfg or WorldConfig()
    tiles = []
    for s in iter_samples(seed, start, cfg, stop=start + n):
        t = s.image
        if with_masks:
            t = np.concatenate([t, np.full((cfg.size, 4, 3), 255, np.uint8), colorize(s.mask)], axis=1)
        tiles.append(t)
    th, tw = tiles[0].shape[:2]
    nrows = (n + ncols - 1) // ncols
    pad = 6
    grid = np.full((nrows * (th + pad), ncols * (tw + pad), 3), 255, dtype=np.uint8)
    for i, t in enumerate(tiles):
        r, c = divmod(i, ncols)
        grid[r * (th + pad): r * (th + pad) + th, c * (tw + pad): c * (tw + pad) + tw] = t
    return grid

"""``make demo``: the main job on the embedded default model.

Generates a handful of demo-world sample images (deterministic), segments them with the shipped
demo model, and writes masks and an overlay grid into ``out/``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

__all__ = ["main", "DEMO_MODEL_DIR"]

ASSETS = Path(__file__).resolve().parent / "assets"
DEMO_MODEL_DIR = ASSETS / "demo_model"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="weclip-demo", description=__doc__)
    ap.add_argument("--out", default="out")
    ap.add_argument("--stop", action="store_true", help="stop a running demo server (none yet)")
    a = ap.parse_args(argv)
    if a.stop:
        print("nothing to stop")
        return 0
    if not (DEMO_MODEL_DIR / "config.json").is_file():
        print(f"The embedded demo model is not shipped yet ({DEMO_MODEL_DIR} missing).\n"
              "Train it with: python -m weclip_infer.train --config weclip_infer/configs/demo.yaml", file=sys.stderr)
        return 1
    from PIL import Image

    from .demo.world import WorldConfig, generate_sample, SPLIT_OFFSETS
    from .imageio import save_png_atomic
    from .palette import overlay, voc_palette
    from .predictor import Segmenter

    out = Path(a.out)
    seg = Segmenter.from_pretrained(DEMO_MODEL_DIR)
    tiles = []
    for k in range(6):
        s = generate_sample(1234, SPLIT_OFFSETS["test"] + k, WorldConfig())
        res = seg.predict(s.image)
        save_png_atomic(out / f"sample_{k}.png", s.image)
        save_png_atomic(out / f"sample_{k}_mask.png", res.labels.astype(np.uint8), palette=voc_palette())
        tiles.append(np.concatenate([s.image, overlay(s.image, res.labels)], axis=1))
        print(f"sample_{k}: {res.areas()}")
    save_png_atomic(out / "grid.png", np.concatenate(tiles, axis=0))
    print(f"wrote masks and {out / 'grid.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

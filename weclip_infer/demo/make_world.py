"""Write the procedural demo world as a VOC-style data set.

Example::

    python -m weclip_infer.demo.make_world --out data/demo_world --n-train 3000 --n-val 300 --seed 0 --size 256

See :func:`weclip_infer.demo.world.write_voc_layout` for the layout. Re-running with the same
arguments into the same folder resumes an interrupted run and yields byte-identical files.
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Optional, Sequence

from weclip_infer.demo.world import (
    BACKGROUND_NAMES,
    CLASS_NAMES,
    OBJECT_STYLES,
    WorldConfig,
    preview_grid,
    write_voc_layout,
)

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser."""
    p = argparse.ArgumentParser(prog="python -m weclip_infer.demo.make_world", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output folder (created if missing)")
    p.add_argument("--n-train", type=int, required=True, help="number of training images")
    p.add_argument("--n-val", type=int, required=True, help="number of validation images")
    p.add_argument("--n-test", type=int, default=0, help="number of test images (default 0: no test.txt)")
    p.add_argument("--seed", type=int, default=0, help="world seed (default 0)")
    p.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    p.add_argument("--n-classes", type=int, default=len(CLASS_NAMES),
                   help=f"use the first N foreground classes (default {len(CLASS_NAMES)})")
    p.add_argument("--max-objects", type=int, default=3, help="most objects per image (default 3)")
    p.add_argument("--single-object-prob", type=float, default=0.5, help="share of one-object images (default 0.5)")
    p.add_argument("--object-style", choices=OBJECT_STYLES, default="flat",
                   help="flat: objects filled with their class colour (default); badge: a striped body shared by "
                        "all classes with a class-coloured badge, so CAMs cover objects partly")
    p.add_argument("--badge-scale", type=float, nargs=2, metavar=("LO", "HI"), default=list(WorldConfig.badge_scale),
                   help="badge style: badge radius range as a fraction of the object radius "
                        f"(default {' '.join(map(str, WorldConfig.badge_scale))})")
    p.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    p.add_argument("--jpeg-quality", type=int, default=95, help="JPEG quality (default 95)")
    p.add_argument("--overwrite", action="store_true",
                   help="rewrite existing files and accept a folder made with other settings")
    p.add_argument("--preview", metavar="PNG", default=None, help="also save a 4x4 preview grid (images + masks) here")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point; returns the process exit status."""
    args = build_parser().parse_args(argv)
    try:
        cfg = WorldConfig(size=args.size, n_classes=args.n_classes, max_objects=args.max_objects,
                          single_object_prob=args.single_object_prob, object_style=args.object_style,
                          badge_scale=tuple(args.badge_scale))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    try:
        meta = write_voc_layout(args.out, args.n_train, args.n_val, seed=args.seed, cfg=cfg, n_test=args.n_test,
                                workers=max(1, args.workers), overwrite=args.overwrite,
                                jpeg_quality=args.jpeg_quality, progress=not args.quiet)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    dt = time.perf_counter() - t0
    if args.preview:
        from PIL import Image

        Image.fromarray(preview_grid(args.seed, 16, cfg)).save(args.preview)
    if not args.quiet:
        c = meta["counts"]
        n = c["train"] + c["val"] + c["test"]
        print(f"wrote {n} images ({c['train']} train, {c['val']} val, {c['test']} test) to {args.out} "
              f"in {dt:.1f} s ({1000 * dt / max(n, 1):.1f} ms/image)")
        print(f"classes ({cfg.n_classes}): {', '.join(cfg.class_prompts)}")
        print(f"backgrounds: {', '.join(BACKGROUND_NAMES)}")
        print("images per class: " + ", ".join(f"{k}={v}" for k, v in meta["images_per_class"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``python -m weclip_infer.train`` / ``weclip-train``: train WeCLIP from a YAML config.

Examples::

    python -m weclip_infer.train --config weclip_infer/configs/voc.yaml data.root=/data/VOC2012
    python -m weclip_infer.train --config demo.yaml train.max_iters=200 --device cpu
    python -m weclip_infer.train --resume runs/voc                 # continue the run in runs/voc
    torchrun --nproc_per_node 2 -m weclip_infer.train --config voc.yaml   # DDP

Overrides are ``section.key=value`` (sections ``model``, ``train``, ``data``; values parsed as
YAML), e.g. ``train.max_iters=10 model.refine.rfm_switch_iter=5 model.refine.use_rfm=false``.
A shipped config can be named without its path: ``--config voc`` (voc, coco, demo, custom).
"""
from __future__ import annotations

import argparse
import json
import sys
from importlib import resources
from pathlib import Path
from typing import Optional, Sequence

__all__ = ["main", "build_parser", "shipped_config"]

SHIPPED = ("voc", "coco", "demo", "custom")


def shipped_config(name: str) -> Path:
    """Path of a config shipped in ``weclip_infer/configs`` (``voc``, ``coco``, ``demo``, ``custom``)."""
    return Path(str(resources.files("weclip_infer") / "configs" / f"{name}.yaml"))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="weclip-train", description="Train WeCLIP (frozen CLIP + decoder) with "
                                "image-level labels.", epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", "-c", help=f"training YAML (or one of {list(SHIPPED)})")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    p.add_argument("--out", help="run folder (default: train.out_dir)")
    p.add_argument("--resume", help="checkpoint folder, run folder, or 'auto' (resume --out if it has a checkpoint)")
    p.add_argument("--device", help="auto (CUDA if available) | cpu | cuda | cuda:N")
    p.add_argument("--amp", action="store_true", help="mixed precision (train.amp=true)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    from weclip_infer.config import ConfigError

    from .config import dump_yaml, load_train_config
    from .loop import train

    config = args.config
    if config is not None and config in SHIPPED and not Path(config).exists():
        config = str(shipped_config(config))
    overrides = list(args.overrides)
    if args.device:
        overrides.append(f"train.device={args.device}")
    if args.amp:
        overrides.append("train.amp=true")
    try:
        if args.print_config:
            if config is None:
                raise ConfigError("--print-config needs --config")
            print(dump_yaml(load_train_config(config, overrides)), end="")
            return 0
        if config is None and args.resume is None:
            raise ConfigError("--config is required (or --resume a run)")
        summary = train(config, overrides=overrides, resume=args.resume, out_dir=args.out)
    except ConfigError as e:
        print(f"weclip-train: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("weclip-train: interrupted (resume from the last checkpoint with --resume <out>)", file=sys.stderr)
        return 130
    if summary.get("world_size", 1) == 1 or summary.get("rank", 0) == 0:
        print(json.dumps({k: summary[k] for k in ("out_dir", "iterations", "final_loss", "checkpoint")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

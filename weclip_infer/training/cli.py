"""``python -m weclip_infer.train`` / ``weclip-train``: train WeCLIP from a YAML config
(the examples and rules are in :data:`EPILOG`, what ``--help`` shows)."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from importlib import resources
from pathlib import Path
from typing import Optional, Sequence

__all__ = ["main", "build_parser", "shipped_config", "resolve_config_arg", "EPILOG"]

SHIPPED = ("voc", "coco", "demo", "custom")

EPILOG = """examples:
  python -m weclip_infer.train --config voc data.root=/data/VOC2012 model.backbone.clip_weights=/models/ViT-B-16.pt
  python -m weclip_infer.train --config demo.yaml train.max_iters=200 --device cpu
  python -m weclip_infer.train --config custom data.root=/data/mine data.labels_file=labels.csv \\
      data.class_names_file=classes.txt model.backbone.clip_weights=demo
  python -m weclip_infer.train --resume runs/voc          # continue the run in runs/voc
  torchrun --nproc_per_node 2 -m weclip_infer.train --config voc.yaml data.root=/data/VOC2012   # several processes

Overrides are section.key=value (sections model, train, data; values parsed as YAML), e.g.
train.max_iters=10 model.refine.rfm_switch_iter=5 model.refine.use_rfm=false.
A shipped config can be named with or without .yaml: voc, coco, demo, custom; --print-config
shows every resolved value. A shorter train.max_iters scales the warm-up and the RFM switch
with it. A custom folder's class list file (data.class_names_file) defines the classes.
"""

logger = logging.getLogger("weclip_infer.training")


def shipped_config(name: str) -> Path:
    """Path of a config shipped in ``weclip_infer/configs`` (``voc``, ``coco``, ``demo``, ``custom``)."""
    return Path(str(resources.files("weclip_infer") / "configs" / f"{name}.yaml"))


def resolve_config_arg(config: str) -> str:
    """``--config`` value → a file: an existing path as is, else a shipped config by its name
    with or without ``.yaml`` (``demo``, ``demo.yaml``)."""
    if Path(config).exists():
        return config
    stem = config[:-5] if config.endswith(".yaml") else config[:-4] if config.endswith(".yml") else config
    if stem in SHIPPED and os.sep not in config:
        return str(shipped_config(stem))
    return config


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="weclip-train", description="Train WeCLIP (frozen CLIP + decoder) with "
                                "image-level labels.", epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", "-c", help=f"training YAML: a path, or a shipped config {list(SHIPPED)} "
                                          "(with or without .yaml)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    p.add_argument("--out", help="run folder (default: train.out_dir)")
    p.add_argument("--resume", help="checkpoint folder, run folder (its newest checkpoint that loads), or 'auto' "
                                    "(resume --out if it has a checkpoint)")
    p.add_argument("--device", help="auto (CUDA if available) | cpu | cuda | cuda:N")
    p.add_argument("--amp", action="store_true", help="mixed precision (train.amp=true)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--debug", action="store_true", help="show full tracebacks and debug messages")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    from .runlog import setup_console_logging

    setup_console_logging(debug=args.debug, rank=int(os.environ.get("RANK", "0")))
    config = resolve_config_arg(args.config) if args.config is not None else None
    overrides = list(args.overrides)
    if args.device:
        overrides.append(f"train.device={args.device}")
    if args.amp:
        overrides.append("train.amp=true")
    try:
        from weclip_infer.config import ConfigError

        from .config import dump_yaml, load_train_config
        from .loop import train

        if args.print_config:
            if config is None:
                raise ConfigError("--print-config needs --config")
            print(dump_yaml(load_train_config(config, overrides)), end="")
            return 0
        if config is None and args.resume is None:
            raise ConfigError("--config is required (or --resume a run)")
        summary = train(config, overrides=overrides, resume=args.resume, out_dir=args.out)
    except KeyboardInterrupt:
        print("weclip-train: interrupted (resume from the last checkpoint with --resume <out>)", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - a CLI: one line; the traceback under --debug
        if args.debug:
            logger.exception("weclip-train failed")
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"weclip-train: error: {msg}", file=sys.stderr)
        return 2
    if summary.get("world_size", 1) == 1 or summary.get("rank", 0) == 0:
        print(json.dumps({k: summary[k] for k in ("out_dir", "iterations", "final_loss", "checkpoint")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

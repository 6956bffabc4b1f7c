"""``weclip-segment``: batch segmentation of folders (the CLI lives in ``weclip_infer.batch.cli``).

Kept as the console-script target and for ``python -m weclip_infer.segment``; the reusable
pieces (listing, results log, workers, the folder loop) are in :mod:`weclip_infer.batch`.
"""
from __future__ import annotations

from .batch.cli import main
from .batch.listing import DEFAULT_EXTS, list_inputs, shard
from .batch.segmentation import segment_folder

__all__ = ["DEFAULT_EXTS", "list_inputs", "shard", "segment_folder", "main"]

if __name__ == "__main__":
    raise SystemExit(main())

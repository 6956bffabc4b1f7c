#!/usr/bin/env python3
"""Export a checkpoint to TorchScript + ONNX: ``python export/export.py CKPT --out BUNDLE`` (= ``weclip-export``).

A thin script beside the library; all logic is in :mod:`weclip_infer.export`.
"""
import sys

from weclip_infer.export.cli import main

if __name__ == "__main__":
    sys.exit(main())

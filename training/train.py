#!/usr/bin/env python3
"""Train WeCLIP: ``python training/train.py --config demo`` (same as ``weclip-train``).

A thin script beside the library; all logic is in :mod:`weclip_infer.training`.
"""
import sys

from weclip_infer.training.cli import main

if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Package a model as a TorchServe archive: ``python export/make_mar.py MODEL_DIR --out model_store``.

A thin script beside the library; all logic is in :mod:`weclip_infer.export.mar`.
"""
import sys

from weclip_infer.export.mar import main

if __name__ == "__main__":
    sys.exit(main())

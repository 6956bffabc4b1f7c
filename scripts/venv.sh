#!/usr/bin/env bash
# Create/update the project virtual environment (.venv) with the pinned torch pair.
# Usage: scripts/venv.sh [extras]   (default extras: test,crf,onnx,serve)
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="${1:-test,crf,onnx,serve}"
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
STAMP=".venv/.weclip-installed-$(cat pyproject.toml | sha256sum | cut -c1-16)-${EXTRAS//,/_}"
if [ ! -f "$STAMP" ]; then
  # pip (not uv/poetry): torch==2.14.1 / torchvision==0.29.1 come from the local wheel cache here.
  .venv/bin/python -m pip install -q --disable-pip-version-check -e ".[${EXTRAS}]" 2>&1 | grep -v "^WARNING: Location" || true
  .venv/bin/python -c "import torch, open_clip, weclip_infer" 
  touch "$STAMP"
fi

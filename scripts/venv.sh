#!/usr/bin/env bash
# Create/update the project virtual environment (.venv) with the pinned torch pair.
# Usage: scripts/venv.sh [extras]   (default extras: test,lint,crf,onnx,serve,ray,triton)
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="${1:-test,lint,crf,onnx,serve,ray,triton}"
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "Creating .venv with $("$PY" --version) ..."
  "$PY" -m venv .venv
fi
STAMP=".venv/.weclip-installed-$(cat pyproject.toml | sha256sum | cut -c1-16)-${EXTRAS//,/_}"
if [ ! -f "$STAMP" ]; then
  echo "Installing weclip-infer[${EXTRAS}] into .venv: torch 2.14.1 + torchvision 0.29.1 (a CUDA build that"
  echo "also runs on CPU, ~5.7 GB with its CUDA libraries), open_clip, ONNX Runtime, TorchServe, pydensecrf2"
  echo "(compiled, ~30 s). The first install takes 1-3 minutes; later runs skip this step."
  # pip (not uv/poetry): torch==2.14.1 / torchvision==0.29.1 come from the local wheel cache here.
  # Progress: one line per package pip collects, then the install summary.
  LOG=".venv/pip-install.log"
  set +e
  .venv/bin/python -m pip install --disable-pip-version-check -e ".[${EXTRAS}]" 2>&1 | tee "$LOG" \
    | grep --line-buffered -E "^(Collecting|Building|Installing collected|Successfully|ERROR|error)" \
    | sed -u -E 's/^Collecting ([^ ]+).*/  collecting \1/'
  rc=${PIPESTATUS[0]}
  set -e
  if [ "$rc" -ne 0 ]; then
    echo "pip install failed (exit $rc); the full log is in $LOG" >&2
    exit "$rc"
  fi
  .venv/bin/python -c "import torch, open_clip, weclip_infer"
  touch "$STAMP"
  echo "Done: .venv is ready (activate it with: source .venv/bin/activate)."
fi

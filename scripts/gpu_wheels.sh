#!/usr/bin/env bash
# Step 1 of the GPU check (benchmarks/gpu.py), run HERE, before the device call.
#
# The lent GPU machine has no network and its python3 (3.12, torch 2.11) lacks open_clip_torch and
# ftfy (and ftfy's wcwidth). This downloads their wheels, at the versions in our .venv (the ones the
# tests run with), into the git-ignored folder .whl/, which the device call carries
# (carry [".whl"]) and scripts/gpu_check.sh installs there. Pure-python wheels only (--no-deps:
# everything else they need is on the device). Prints the total size: what travels is at most
# 64 MiB together with the working tree.
#
# Usage: bash scripts/gpu_wheels.sh        (then: device run "bash scripts/gpu_check.sh", carry [".whl"])
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
PKGS=(open_clip_torch ftfy wcwidth)

# the folder must never be committed: ignore it in this clone only
EXCLUDE="$(git rev-parse --git-path info/exclude)"
mkdir -p "$(dirname "$EXCLUDE")"
touch "$EXCLUDE"
grep -qxF "/.whl/" "$EXCLUDE" || echo "/.whl/" >>"$EXCLUDE"

mkdir -p .whl
SPECS=()
for name in "${PKGS[@]}"; do
  ver="$("$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name" 2>/dev/null || true)"
  if [ -z "$ver" ]; then
    echo "gpu_wheels: $name is not installed in $PY; run make venv first" >&2
    exit 1
  fi
  SPECS+=("$name==$ver")
  # one version of each: two stop the whole install on the device
  stem="$(echo "$name" | tr '-' '_')"
  find .whl -maxdepth 1 -type f -iname "${stem}-*.whl" ! -iname "${stem}-${ver}-*.whl" -print -delete
done

"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${SPECS[@]}"

echo "gpu_wheels: ${SPECS[*]} in .whl/:"
ls -l .whl/*.whl
total="$(du -cb .whl/*.whl | tail -1 | cut -f1)"
echo "gpu_wheels: total $total bytes ($(( (total + 1048575) / 1048576 )) MiB) to carry with the working tree (64 MiB in all)"

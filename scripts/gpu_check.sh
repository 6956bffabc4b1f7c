#!/usr/bin/env bash
# Step 2 of the GPU check: the one command the lent GPU machine runs (see benchmarks/gpu.py).
#
#   device run: command "bash scripts/gpu_check.sh", carry [".whl"], timeout_s ~560
#
# Installs the carried wheels (scripts/gpu_wheels.sh made them here) into /tmp/site, puts them and
# the working tree on PYTHONPATH (the machine's own python3 and torch run our package from the
# tree), prints the GPU and library versions, then runs benchmarks/gpu.py under `timeout`:
# budget GPU_BUDGET_S (default 420 s) for the checks, killed after GPU_TIMEOUT_S (default budget +
# 60 s), so the whole command ends well inside 9 minutes. gpu.py rewrites its results after every
# check, so a run cut short keeps what it measured. Results and this log go to $OUT (the device's
# return folder; benchmarks/results when unset). Extra arguments go to gpu.py (e.g. --only serve).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results}"
mkdir -p "$OUT"
BUDGET_S="${GPU_BUDGET_S:-420}"
LIMIT_S="${GPU_TIMEOUT_S:-$(( ${BUDGET_S%.*} + 60 ))}"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1

main() {
  echo "== gpu_check $(date -u +%FT%TZ): budget ${BUDGET_S} s, limit ${LIMIT_S} s"
  if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      .whl/*.whl || { echo "gpu_check: installing .whl/ failed" >&2; return 3; }
    export PYTHONPATH="/tmp/site:$PWD"
  else
    echo "gpu_check: no .whl/*.whl (run scripts/gpu_wheels.sh here and carry .whl); open_clip may be missing" >&2
    export PYTHONPATH="$PWD"
  fi
  nvidia-smi || echo "gpu_check: nvidia-smi failed" >&2
  "$PY" - <<'PYEOF' || { echo "gpu_check: imports failed" >&2; return 4; }
import platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| CUDA", torch.version.cuda,
      "| cuDNN", torch.backends.cudnn.version(), "| GPU", torch.cuda.is_available() and torch.cuda.get_device_name(0))
import open_clip, weclip_infer
print("open_clip", getattr(open_clip, "__version__", "?"), "| weclip_infer", weclip_infer.__version__,
      "from", weclip_infer.__file__)
try:
    import onnxruntime as ort
    print("onnxruntime", ort.__version__, ort.get_available_providers())
except Exception as e:
    print("onnxruntime not importable:", e)
PYEOF
  timeout -k 15 "$LIMIT_S" "$PY" benchmarks/gpu.py --budget-s "$BUDGET_S" --out "$OUT" "$@"
  local rc=$?
  [ "$rc" -eq 124 ] && echo "gpu_check: gpu.py stopped by the ${LIMIT_S} s limit (results up to the last check kept)"
  echo "== gpu_check done $(date -u +%FT%TZ), gpu.py exit $rc"
  ls -l "$OUT"
  return "$rc"
}

main "$@" 2>&1 | tee "$OUT/gpu_check.log"
exit "${PIPESTATUS[0]}"

"""The GPU check script (benchmarks/gpu.py) runs end to end on the CPU, and its device command parses.

The GPU run happens on a lent machine, once, with no second chance to fix a typo: ``--smoke-cpu``
runs every check with a tiny model and counts of one or two, so each code path (serving batches and
threads, the torch CRF, the stage profile, the ONNX export path, parity, the training CLI, the
JSON/markdown writers) has run before it gets there. Figures are not checked: they mean nothing on
a tiny model.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CHECKS = ["env", "serve_fp32", "serve_bf16", "bf16_weights", "crf_torch", "serve_crf_torch", "train_profile_fp32",
          "train_profile_bf16", "train_fp32", "train_bf16_backbone", "onnx_cuda", "parity_cpu_vs_cuda",
          "train_amp_fp16", "train_cli_cuda"]


def _errors(v, path: str = "") -> list:
    """Paths of every ``error`` key, nested ones included."""
    if isinstance(v, dict):
        found = [path or "/"] if "error" in v else []
        for k, x in v.items():
            found += _errors(x, f"{path}/{k}")
        return found
    if isinstance(v, list):
        return [p for i, x in enumerate(v) for p in _errors(x, f"{path}[{i}]")]
    return []


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_smoke_cpu_runs_every_check(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path / "ignored")}  # --out wins over $OUT
    p = subprocess.run([sys.executable, "benchmarks/gpu.py", "--smoke-cpu", "--out", str(tmp_path)], cwd=REPO,
                       env=env, capture_output=True, text=True, timeout=280)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    files = sorted(tmp_path.glob("gpu-*.json"))
    assert len(files) == 1 and files[0].with_suffix(".md").is_file()
    res = json.loads(files[0].read_text())
    assert res["smoke_cpu"] is True
    for key in CHECKS:
        assert key in res, key
        assert "skipped" not in res[key], (key, res[key])
    assert not _errors(res), {k: res[k] for k in CHECKS if _errors(res[k])}
    # the figures the markdown headline reads are there
    serve = res["serve_fp32"]
    assert {"sequential", "sequential_tf32", "network_batch", "threads", "service"} <= set(serve)
    assert set(serve["network_batch"]) == {"1", "2"} and set(serve["threads"]) == {"1", "2"}
    assert serve["network_batch"]["2"]["rows_per_call"] == 4  # two flipped requests share one network call
    assert {(r["labels"], r["batch"]) for r in res["crf_torch"]["rows"]} == {(4, 1), (4, 2), (3, 1), (3, 2)}
    assert {"clip", "decoder", "gradcam", "par", "loss"} <= set(res["train_profile_fp32"]["stages_ms_synced"])
    assert "clip" in res["train_profile_bf16"]["profiler"]["stages"]
    assert res["onnx_cuda"]["argmax_agreement"] > 0.9
    assert res["bf16_weights"]["labels_identical"] is True
    assert set(res["bf16_weights"]["rounds"]) == {"ready weights", "cast per call"}
    assert res["train_cli_cuda"]["returncode"] == 0
    md = files[0].with_suffix(".md").read_text()
    assert "## serve_fp32" in md and "| figure | value |" in md


def test_gpu_check_script_parses():
    for script in ("scripts/gpu_check.sh", "scripts/gpu_wheels.sh"):
        p = subprocess.run(["bash", "-n", script], cwd=REPO, capture_output=True, text=True)
        assert p.returncode == 0, p.stderr


def test_device_skip_reason_for_cpu_only_onnxruntime(monkeypatch):
    """On the device, an onnxruntime without the CUDA provider is recorded as skipped, with why."""
    pytest.importorskip("onnxruntime")
    import onnxruntime

    spec = importlib.util.spec_from_file_location("gpu_benchmark_script", REPO / "benchmarks" / "gpu.py")
    assert spec is not None and spec.loader is not None
    gpu = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, gpu)  # dataclasses look their module up there
    spec.loader.exec_module(gpu)
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    res = gpu.onnx_cuda(gpu.Plan(device="cuda"), gpu.Budget(60, 10))
    assert res["skipped"] == gpu.ORT_SKIP

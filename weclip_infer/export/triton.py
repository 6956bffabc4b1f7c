"""A Triton Inference Server model repository from an exported bundle (files only).

``write_triton_repository(bundle_dir, repo_dir, name)`` creates::

    repo_dir/<name>/config.pbtxt       onnxruntime backend, dynamic batch, variable H and W
    repo_dir/<name>/1/model.onnx       the bundle's ONNX graph, unchanged
    repo_dir/<name>/manifest.json      the bundle's manifest: class names, normalisation, patch size

The graph is the same as in the bundle: normalised ``images`` (``B×3×H×W`` float32) in, raw
``logits`` (``B×C×floor(H/p)×floor(W/p)``) out. Pre-processing (RGB, mean/std normalisation) and
post-processing (bilinear upsampling to the image size, argmax, optional multi-scale/flip
averaging) stay on the client, as ``examples/triton_client.py`` shows. Triton batches only
requests of equal ``H×W`` together; clients that want server-side batching resize to one size.

The model folder is published atomically and an existing one is never replaced.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Union

from weclip_infer.io_utils import atomic_dir

__all__ = ["DEFAULT_MAX_BATCH_SIZE", "DEFAULT_QUEUE_DELAY_US", "triton_config_text", "write_triton_repository"]

DEFAULT_MAX_BATCH_SIZE = 8
DEFAULT_QUEUE_DELAY_US = 5000
_INSTANCE_KINDS = ("KIND_CPU", "KIND_GPU")


def _check_name(name: str) -> str:
    if not name or not all(c.isalnum() or c in "-_." for c in name) or name.startswith("."):
        raise ValueError(f"Triton model name must be letters, digits, '-', '_' or '.', got {name!r}")
    return name


def triton_config_text(name: str, manifest: Mapping[str, Any], *, max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
                       instance_kind: str = "KIND_CPU", instance_count: int = 1,
                       max_queue_delay_us: int = DEFAULT_QUEUE_DELAY_US) -> str:
    """The ``config.pbtxt`` text (protobuf text format of Triton's ``ModelConfig``) for a bundle.

    ``manifest`` is the bundle's ``manifest.json`` (input/output names, number of classes).
    """
    _check_name(name)
    for key, v, lo in (("max_batch_size", max_batch_size, 1), ("instance_count", instance_count, 1),
                       ("max_queue_delay_us", max_queue_delay_us, 0)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{key} must be an integer >= {lo}, got {v!r}")
    if instance_kind not in _INSTANCE_KINDS:
        raise ValueError(f"instance_kind must be one of {_INSTANCE_KINDS}, got {instance_kind!r}")
    try:
        in_name = str(manifest["input"]["name"])
        out_name = str(manifest["output"]["name"])
        num_classes = int(manifest["num_classes"])
    except (KeyError, TypeError, ValueError):
        raise ValueError("manifest.json lacks input/output names or num_classes (not an export bundle?)") from None
    preferred = sorted({b for b in (max_batch_size // 2, max_batch_size) if b >= 1})
    return "\n".join([
        f'name: "{name}"',
        'backend: "onnxruntime"',
        f"max_batch_size: {max_batch_size}",
        "input [",
        "  {",
        f'    name: "{in_name}"',
        "    data_type: TYPE_FP32",
        "    format: FORMAT_NCHW",
        "    dims: [ 3, -1, -1 ]",
        "  }",
        "]",
        "output [",
        "  {",
        f'    name: "{out_name}"',
        "    data_type: TYPE_FP32",
        f"    dims: [ {num_classes}, -1, -1 ]",
        "  }",
        "]",
        "dynamic_batching {",
        f"  preferred_batch_size: [ {', '.join(str(b) for b in preferred)} ]",
        f"  max_queue_delay_microseconds: {max_queue_delay_us}",
        "}",
        "instance_group [",
        "  {",
        f"    count: {instance_count}",
        f"    kind: {instance_kind}",
        "  }",
        "]",
        "version_policy: { latest { num_versions: 1 } }",
        "",
    ])


def write_triton_repository(bundle_dir: Union[str, Path], repo_dir: Union[str, Path], name: str = "weclip", *,
                            max_batch_size: int = DEFAULT_MAX_BATCH_SIZE, instance_kind: Optional[str] = None,
                            instance_count: int = 1, max_queue_delay_us: int = DEFAULT_QUEUE_DELAY_US) -> Path:
    """Write ``repo_dir/<name>/`` from the export bundle in ``bundle_dir``; returns that folder.

    ``instance_kind`` defaults to ``KIND_GPU`` for fp16 bundles (which need CUDA) and ``KIND_CPU``
    otherwise. Raises ``FileExistsError`` when ``repo_dir/<name>`` exists and ``ValueError`` when
    the bundle has no ONNX graph.
    """
    bundle = Path(bundle_dir)
    man_path = bundle / "manifest.json"
    onnx_path = bundle / "model.onnx"
    if not man_path.is_file():
        raise ValueError(f"{bundle} is not an export bundle (no manifest.json)")
    manifest: Dict[str, Any] = json.loads(man_path.read_text())
    if "onnx" not in manifest.get("files", {}) or not onnx_path.is_file():
        raise ValueError(f"{bundle} has no ONNX graph: export with --formats including onnx")
    if instance_kind is None:
        instance_kind = "KIND_GPU" if str(manifest.get("precision", "")).startswith("fp16") else "KIND_CPU"
    text = triton_config_text(name, manifest, max_batch_size=max_batch_size, instance_kind=instance_kind,
                              instance_count=instance_count, max_queue_delay_us=max_queue_delay_us)
    target = Path(repo_dir) / _check_name(name)
    if target.exists():
        raise FileExistsError(f"{target} exists; remove it or choose another model name")
    with atomic_dir(target, replace=False) as tmp:
        (tmp / "1").mkdir()
        shutil.copyfile(onnx_path, tmp / "1" / "model.onnx")
        (tmp / "config.pbtxt").write_text(text, encoding="utf-8")
        shutil.copyfile(man_path, tmp / "manifest.json")
    return target

"""Load an exported bundle (``manifest.json`` + ``model.onnx`` / ``model.ts.pt``) as a backend.

``load_bundle_backend(path, backend, device) -> (fn, meta, device)`` where ``fn`` maps a
normalised ``B×3×H×W`` float tensor to ``B×C×(H//p)×(W//p)`` logits (torch in, torch out) and
``meta`` is the manifest (``class_names``, ``normalize``, ``patch_size``, ``inference`` …).
``Segmenter.from_pretrained(bundle_dir, backend=...)`` uses it. Written by
``weclip_infer.export`` (``weclip-export``).
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Callable, Tuple, Union

import torch

__all__ = ["BundleError", "load_bundle_backend", "read_manifest", "ort_providers", "ort_session", "onnx_runner"]

MANIFEST = "manifest.json"
FILES = {"torchscript": "model.ts.pt", "onnx": "model.onnx"}
_ORT_HINT = 'install it with: pip install "weclip-infer[onnx]" (CPU) or pip install "weclip-infer[gpu]" (CUDA)'


class BundleError(RuntimeError):
    """A bundle is missing, incomplete or cannot run with the requested backend/device."""


def read_manifest(path: Union[str, os.PathLike]) -> dict:
    p = Path(path)
    f = p / MANIFEST if p.is_dir() else p
    if not f.is_file():
        raise BundleError(f"{p}: not an exported bundle (no {MANIFEST})")
    try:
        meta = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise BundleError(f"{f}: invalid JSON: {e}") from None
    if not str(meta.get("format", "")).startswith("weclip_infer.bundle/"):
        raise BundleError(f"{f}: unsupported bundle format {meta.get('format')!r}")
    for key in ("class_names", "patch_size"):
        if key not in meta:
            raise BundleError(f"{f}: manifest lacks {key!r}")
    return meta


def _import_ort():
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise BundleError(f"the ONNX backend needs onnxruntime ({e}); {_ORT_HINT}") from None
    return ort


def _graph_file(root: Path, meta: dict, fmt: str) -> Path:
    name = meta.get("files", {}).get(fmt, {}).get("path", FILES[fmt])
    return root / name


def ort_providers(device: torch.device) -> list:
    """Execution providers to request: CUDA first only for a CUDA device (raises if unavailable)."""
    if device.type != "cuda":
        return ["CPUExecutionProvider"]
    ort = _import_ort()
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise BundleError(f"device {device} requested but this onnxruntime has no CUDAExecutionProvider "
                          f"(available: {ort.get_available_providers()}); pip install \"weclip-infer[gpu]\" "
                          f"or use --device cpu / backend='torchscript'")
    return ["CUDAExecutionProvider", "CPUExecutionProvider"]


def ort_session(file: Union[str, os.PathLike], device: Union[str, torch.device] = "cpu"):
    """An ONNX Runtime ``InferenceSession`` for ``file`` on ``device``: the one place sessions are made.

    Providers are explicit (CPU only for a CPU device; CUDA then CPU for a CUDA device) and the
    session's granted providers are checked, so a CUDA request never falls back to the CPU silently.
    """
    ort = _import_ort()
    device = torch.device(device)
    providers = ort_providers(device)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = max(1, torch.get_num_threads())
    if device.type == "cpu":
        # Our pipeline alternates ONNX Runtime runs with torch pre/post-processing on the same
        # cores: threads that spin after a run would take CPU from the torch work in between.
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    provider_options = [{"device_id": device.index or 0}, {}] if device.type == "cuda" else None
    sess = ort.InferenceSession(str(file), sess_options=so, providers=providers, provider_options=provider_options)
    granted = sess.get_providers()
    if not granted or granted[0] != providers[0]:
        raise BundleError(f"{providers[0]} was requested for {file} but the session runs on {granted}"
                          + (" (CUDA/cuDNN libraries for onnxruntime-gpu missing?)" if device.type == "cuda" else ""))
    return sess


def onnx_runner(file: Union[str, os.PathLike], device: Union[str, torch.device] = "cpu"
                ) -> Callable[[torch.Tensor], torch.Tensor]:
    """A torch-in/torch-out callable over :func:`ort_session` (``.session`` holds the session);
    the output is returned on the input's device."""
    sess = ort_session(file, device)
    name = sess.get_inputs()[0].name

    def run(x: torch.Tensor) -> torch.Tensor:
        arr = x.detach().to("cpu", torch.float32).contiguous().numpy()
        out = torch.from_numpy(sess.run(None, {name: arr})[0])
        return out.to(x.device) if x.device.type != "cpu" else out

    run.session = sess  # type: ignore[attr-defined]
    return run


def _torchscript_backend(file: Path, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.jit\.load.* is deprecated")
        module = torch.jit.load(str(file), map_location=device).eval()

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return module(x.to(device, torch.float32))

    run.module = module  # type: ignore[attr-defined]
    return run


def load_bundle_backend(path: Union[str, os.PathLike], backend: str = "auto", device=None
                        ) -> Tuple[Callable[[torch.Tensor], torch.Tensor], dict, torch.device]:
    """``(fn, manifest, device)`` for an exported bundle directory.

    ``backend``: ``"onnx"`` (ONNX Runtime), ``"torchscript"``, or ``"auto"``: ONNX Runtime when the
    device is the CPU, onnxruntime imports and ``model.onnx`` exists, else TorchScript (and ONNX
    Runtime as a last resort). ``device``: ``None``/``"auto"`` → CUDA when available, else CPU.
    """
    from .device import select_device

    root = Path(path)
    meta = read_manifest(root)
    dev = select_device(device)
    backend = (backend or "auto").lower()
    if backend not in ("auto", "onnx", "torchscript"):
        raise BundleError(f"backend must be 'auto', 'onnx' or 'torchscript', got {backend!r}")
    onnx_file, ts_file = _graph_file(root, meta, "onnx"), _graph_file(root, meta, "torchscript")
    if backend == "auto":
        try:
            import onnxruntime  # noqa: F401

            have_ort = True
        except ImportError:
            have_ort = False
        if dev.type == "cpu" and have_ort and onnx_file.is_file():
            backend = "onnx"
        elif ts_file.is_file():
            backend = "torchscript"
        elif onnx_file.is_file():
            if not have_ort:
                raise BundleError(f"{root}: only model.onnx is present and onnxruntime is not installed; {_ORT_HINT}")
            backend = "onnx"
        else:
            raise BundleError(f"{root}: neither {onnx_file.name} nor {ts_file.name} found")
    file = onnx_file if backend == "onnx" else ts_file
    if not file.is_file():
        have = [f.name for f in (onnx_file, ts_file) if f.is_file()]
        raise BundleError(f"{root}: backend {backend!r} needs {file.name}, which is missing (bundle has {have})")
    fn = onnx_runner(file, dev) if backend == "onnx" else _torchscript_backend(file, dev)
    meta = dict(meta, backend=backend)
    return fn, meta, dev

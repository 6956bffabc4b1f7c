"""Write an exported bundle: ``model.ts.pt`` and/or ``model.onnx`` + ``manifest.json``.

Files are first written into a staging directory inside the output directory and checked for
parity; only when parity passes are they moved into place (``os.replace``), the manifest last
and atomically. A failed export therefore never leaves a bundle whose manifest describes graphs
that were not verified, and never damages a previous bundle in the same directory.
"""
from __future__ import annotations

import datetime as _dt
import os
import platform
import shutil
import tempfile
from pathlib import Path
from typing import Optional, Sequence, Tuple, Union

import torch

from weclip_infer.io_utils import fsync_dir, write_json_atomic
from weclip_infer.normalization import mean_std

from .onnx_export import DEFAULT_OPSET, INPUT_NAME, OUTPUT_NAME, export_onnx
from .parity import DEFAULT_CASES, check_parity
from .torchscript import export_torchscript

__all__ = ["BUNDLE_FORMAT", "FILES", "write_bundle", "export_checkpoint", "build_manifest", "parse_formats"]

BUNDLE_FORMAT = "weclip_infer.bundle/1"
FILES = {"torchscript": "model.ts.pt", "onnx": "model.onnx"}
MANIFEST = "manifest.json"


def parse_formats(formats: Union[str, Sequence[str]]) -> Tuple[str, ...]:
    items = [f.strip().lower() for f in (formats.split(",") if isinstance(formats, str) else formats) if f.strip()]
    alias = {"ts": "torchscript", "jit": "torchscript", "ort": "onnx"}
    items = [alias.get(f, f) for f in items]
    bad = [f for f in items if f not in FILES]
    if bad or not items:
        raise ValueError(f"formats: choose from {sorted(FILES)} (got {formats!r})")
    return tuple(dict.fromkeys(items))


def _versions() -> dict:
    from weclip_infer import __version__

    v: dict[str, Optional[str]] = {"weclip_infer": __version__, "torch": torch.__version__,
                                   "python": platform.python_version()}

    for mod in ("onnx", "onnxruntime"):
        try:
            v[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - optional
            v[mod] = None
    return v


def build_manifest(model, files: dict, opset: Optional[int], parity: dict, fp16: bool = False,
                   trace_size: Tuple[int, int] = (224, 224), source: Optional[dict] = None) -> dict:
    cfg = model.cfg
    p = int(model.backbone.patch_size)
    norm = cfg.backbone.normalize
    mean, std = mean_std(norm)
    inf = cfg.inference
    return {
        "format": BUNDLE_FORMAT,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "class_names": ["background", *model.classes.names],
        "num_classes": int(model.num_classes),
        "palette": "voc",
        "normalize": norm,
        "normalization": {"name": norm, "mean": [float(m) for m in mean], "std": [float(s) for s in std],
                          "input": "RGB in 0..255, x = (pixel - mean) / std, NCHW float32"},
        "patch_size": p,
        "inference": {"scales": [float(s) for s in inf.scales], "flip": bool(inf.flip), "crf": bool(inf.crf),
                      "long_side": int(inf.long_side)},
        "input": {"name": INPUT_NAME, "layout": "B×3×H×W", "dtype": "float32",
                  "rule": f"any H, W >= {p}; output grid = (floor(H/{p}), floor(W/{p})); batch dynamic",
                  "min_size": p, "dynamic_axes": ["batch", "height", "width"]},
        "output": {"name": OUTPUT_NAME, "layout": f"B×C×floor(H/{p})×floor(W/{p})", "dtype": "float32",
                   "meaning": "raw segmentation logits; upsample bilinearly (align_corners=False) then argmax"},
        "files": files,
        "opset": opset,
        "precision": "fp16-backbone" if fp16 else "fp32",
        "trace_size": list(trace_size),
        "source_checkpoint": source or {},
        "versions": _versions(),
        "parity": parity,
    }


def write_bundle(model, out_dir: Union[str, os.PathLike], formats: Sequence[str] = ("torchscript", "onnx"),
                 opset: int = DEFAULT_OPSET, fp16: bool = False, trace_size: Tuple[int, int] = (224, 224),
                 parity_cases: Sequence[Tuple[int, int, int]] = DEFAULT_CASES, rel_tol: Optional[float] = None,
                 min_agreement: Optional[float] = None, source: Optional[dict] = None) -> dict:
    """Export ``model`` (a ``WeCLIP``, on the export device) into ``out_dir``; returns the manifest.

    Raises ``ParityError`` (nothing written) when an exported graph does not match eager.
    """
    from weclip_infer.checkpoint import file_sha256

    formats = parse_formats(formats)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".export-", dir=out))
    try:
        ts_mod = None
        if "torchscript" in formats:
            ts_mod = export_torchscript(model, stage / FILES["torchscript"], trace_size, fp16=fp16)
        if "onnx" in formats:
            export_onnx(model, stage / FILES["onnx"], opset, trace_size, fp16=fp16)
        onnx_device = model.pixel_mean.device if fp16 else torch.device("cpu")  # fp16 graphs run on CUDA
        parity = check_parity(model, torchscript=(stage / FILES["torchscript"]) if ts_mod is not None else None,
                              onnx_path=(stage / FILES["onnx"]) if "onnx" in formats else None, cases=parity_cases,
                              rel_tol=rel_tol, min_agreement=min_agreement, fp16=fp16, onnx_device=onnx_device)
        files = {}
        for fmt in formats:
            f = stage / FILES[fmt]
            files[fmt] = {"path": FILES[fmt], "sha256": file_sha256(f), "bytes": f.stat().st_size}
            if fmt == "onnx":
                files[fmt]["opset"] = int(opset)
        manifest = build_manifest(model, files, int(opset) if "onnx" in formats else None, parity, fp16, trace_size,
                                  source)
        # a stale manifest must not describe new files half-way through the move
        (out / MANIFEST).unlink(missing_ok=True)
        for fmt in formats:
            os.replace(stage / FILES[fmt], out / FILES[fmt])  # written durably, umask mode, by atomic_path
        fsync_dir(out)
        for fmt, name in FILES.items():  # formats not exported this time: drop stale graphs
            if fmt not in formats:
                (out / name).unlink(missing_ok=True)
        write_json_atomic(out / MANIFEST, manifest)
        return manifest
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def export_checkpoint(checkpoint_dir: Union[str, os.PathLike], out_dir: Union[str, os.PathLike], device="cpu",
                      clip_weights: Optional[str] = None, **kwargs) -> dict:
    """Load one of our checkpoint directories and ``write_bundle`` it (records its sha256)."""
    from weclip_infer.checkpoint import file_sha256, load_checkpoint

    ck = Path(checkpoint_dir)
    model = load_checkpoint(ck, device=device, clip_weights=clip_weights)
    source = {"path": str(ck.resolve()), "model_sha256": file_sha256(ck / "model.safetensors")}
    if (ck / "backbone.safetensors").is_file():
        source["backbone_sha256"] = file_sha256(ck / "backbone.safetensors")
    return write_bundle(model, out_dir, source=source, **kwargs)

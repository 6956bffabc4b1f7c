"""``serve_config.json``: the per-archive server settings, validated in one place.

Keys: ``backend`` (``auto``|``torchscript``|``onnx``|``eager``), ``max_pixels`` (default: the
library's decode limit), default ``scales`` / ``flip`` / ``crf``, ``long_side``, ``num_threads``
``network_batch`` (most images in one network call when the server batches requests; a
flipped copy counts as one; default 16), ``crf_backend`` (``auto``|``torch``|``densecrf``) and
``crf_max_pixels`` (images above it are refined at a reduced size) and ``precision``
(``fp32``|``bf16``, the network's arithmetic; bf16 needs a checkpoint directory) and
``max_request_cost`` (the most network work one request may ask for with its own ``scales`` /
``flip``, as a multiple of the default options' work on the same image; default 8); unset keys
keep the library's defaults. Both the archive builder and every server read it through
:func:`read_serve_config` / :func:`validate_serve_config`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Mapping

from ..imageio import DEFAULT_MAX_PIXELS
from .errors import RequestError
from .options import parse_bool, parse_scales

__all__ = ["SERVE_CONFIG", "BACKENDS", "SERVE_KEYS", "DEFAULT_NETWORK_BATCH", "DEFAULT_MAX_REQUEST_COST",
           "read_serve_config", "validate_serve_config", "check_backend_for_model"]

SERVE_CONFIG = "serve_config.json"
BACKENDS = ("auto", "torchscript", "onnx", "eager")
DEFAULT_NETWORK_BATCH = 16  # images per network call when requests are batched (a flipped copy counts)
SERVE_KEYS = ("backend", "max_pixels", "scales", "flip", "crf", "long_side", "num_threads", "network_batch",
              "crf_backend", "crf_max_pixels", "precision", "max_request_cost")
#: A request may ask for at most this many times the network work of the archive's default
#: options (scales, flip) on the same image (``Segmenter.request_cost``).
DEFAULT_MAX_REQUEST_COST = 8.0


def validate_serve_config(cfg: Mapping[str, Any]) -> Dict[str, Any]:
    """Typed copy of ``cfg`` with defaults filled in; ``ValueError`` naming the key otherwise."""
    if not isinstance(cfg, Mapping):
        raise ValueError(f"{SERVE_CONFIG}: expected a JSON object")
    out = dict(cfg)
    unknown = set(out) - set(SERVE_KEYS)
    if unknown:
        raise ValueError(f"{SERVE_CONFIG}: unknown keys {sorted(unknown)}")
    backend = str(out.get("backend", "auto")).lower()
    if backend not in BACKENDS:
        raise ValueError(f"{SERVE_CONFIG}: backend must be one of {BACKENDS}, got {backend!r}")
    out["backend"] = backend
    if out.get("crf_backend") is not None:
        from ..crf import CRF_BACKENDS

        crf_backend = str(out["crf_backend"]).lower()
        if crf_backend not in CRF_BACKENDS:
            raise ValueError(f"{SERVE_CONFIG}: crf_backend must be one of {CRF_BACKENDS}, got {crf_backend!r}")
        out["crf_backend"] = crf_backend
    if out.get("precision") is not None:
        from ..config import PRECISIONS

        if out["precision"] not in PRECISIONS:
            raise ValueError(f"{SERVE_CONFIG}: precision must be one of {PRECISIONS}, got {out['precision']!r}")
    for key, default in (("max_pixels", DEFAULT_MAX_PIXELS), ("long_side", None), ("num_threads", None),
                         ("network_batch", DEFAULT_NETWORK_BATCH), ("crf_max_pixels", None)):
        v = out.get(key, default)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, int) or v < (0 if key == "long_side" else 1):
            raise ValueError(f"{SERVE_CONFIG}: {key} must be a positive integer, got {v!r}")
        out[key] = v
    cost = out.get("max_request_cost", DEFAULT_MAX_REQUEST_COST)
    if isinstance(cost, bool) or not isinstance(cost, (int, float)) or not 1 <= cost <= 1e6:
        raise ValueError(f"{SERVE_CONFIG}: max_request_cost must be a number from 1 (only the default request) to "
                         f"1e6, got {cost!r}")
    out["max_request_cost"] = float(cost)
    try:
        if out.get("scales") is not None:
            out["scales"] = parse_scales(out["scales"])
        for k in ("flip", "crf"):
            if out.get(k) is not None:
                out[k] = parse_bool(k, out[k])
    except RequestError as e:
        raise ValueError(f"{SERVE_CONFIG}: {e.message}") from None
    return out


def read_serve_config(model_dir: Path) -> Dict[str, Any]:
    """The validated ``serve_config.json`` of ``model_dir`` (defaults when there is none)."""
    f = Path(model_dir) / SERVE_CONFIG
    if not f.is_file():
        return validate_serve_config({})
    try:
        cfg = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{SERVE_CONFIG}: invalid JSON: {e}") from None
    return validate_serve_config(cfg)


def check_backend_for_model(backend: str, model_dir: Path) -> None:
    """``ValueError`` when ``backend`` cannot serve the kind of model directory ``model_dir`` is."""
    is_bundle = (Path(model_dir) / "manifest.json").is_file()
    if backend == "eager" and is_bundle:
        raise ValueError(f"{SERVE_CONFIG}: backend 'eager' needs a checkpoint directory, this is an export bundle")
    if backend in ("torchscript", "onnx") and not is_bundle:
        raise ValueError(f"{SERVE_CONFIG}: backend {backend!r} needs an export bundle (manifest.json), "
                         "this is a checkpoint directory")

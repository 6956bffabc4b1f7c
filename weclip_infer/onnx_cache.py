"""A checkpoint's network as ONNX, exported once and cached by content, for the fast CPU path.

:func:`cached_onnx_bundle` returns an export bundle (``manifest.json`` + ``model.onnx``) for one
of our checkpoint directories, exporting it on first use into the cache folder and re-using it
afterwards. The cache key is a digest of everything the graph depends on: the checkpoint's files,
the CLIP weights file it names, and the versions of weclip-infer, torch and onnx, so a changed
checkpoint or a new release never reuses a stale graph. Exports are written into a private
temporary folder and renamed into place, so concurrent processes never see a half-written entry.

Cache folder: ``$WECLIP_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/weclip_infer`` or
``~/.cache/weclip_infer``; entries live under ``onnx/<digest>/`` and may be deleted at any time.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional, Union

__all__ = ["cache_dir", "checkpoint_digest", "cached_onnx_bundle"]

log = logging.getLogger(__name__)

#: parity of the cached export is checked on one small input (the full check is weclip-export's)
_CACHE_PARITY_CASES = ((1, 224, 224),)


def cache_dir() -> Path:
    """The cache root (see the module docstring)."""
    env = os.environ.get("WECLIP_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "weclip_infer"


def checkpoint_digest(checkpoint_dir: Union[str, os.PathLike]) -> str:
    """Hex digest of a checkpoint's files, its CLIP weights file and the exporting versions."""
    import onnx
    import torch

    from . import __version__
    from .backbone import BUILTIN_WEIGHTS
    from .checkpoint import file_sha256

    ck = Path(checkpoint_dir)
    h = hashlib.sha256()
    h.update(f"weclip-infer {__version__} torch {torch.__version__} onnx {onnx.__version__}\n".encode())
    for name in ("config.json", "model.safetensors", "backbone.safetensors"):
        f = ck / name
        if f.is_file():
            h.update(f"{name} {file_sha256(f)}\n".encode())
    try:
        cfg = json.loads((ck / "config.json").read_text())
        weights = str(cfg.get("model", cfg).get("backbone", {}).get("clip_weights", ""))
    except (OSError, ValueError, AttributeError):
        weights = ""
    src = BUILTIN_WEIGHTS.get(weights) if weights in BUILTIN_WEIGHTS else None
    if src is None and weights and not (ck / "backbone.safetensors").is_file():
        cand = Path(weights) if Path(weights).is_absolute() else ck / weights
        src = cand if cand.is_file() else None
    if src is not None and Path(src).is_file():
        h.update(f"clip {file_sha256(src)}\n".encode())
    return h.hexdigest()[:32]


def cached_onnx_bundle(checkpoint_dir: Union[str, os.PathLike], root: Optional[Union[str, os.PathLike]] = None) -> Path:
    """The cached ONNX bundle of ``checkpoint_dir`` (exported now when missing); returns its folder."""
    from .export.bundle_writer import export_checkpoint

    base = Path(root) if root is not None else cache_dir()
    entry = base / "onnx" / checkpoint_digest(checkpoint_dir)
    if (entry / "manifest.json").is_file() and (entry / "model.onnx").is_file():
        log.info("ONNX Runtime graph for %s: cached at %s", checkpoint_dir, entry)
        return entry
    entry.parent.mkdir(parents=True, exist_ok=True)
    log.info("exporting %s to ONNX once (cache: %s)", checkpoint_dir, entry)
    stage = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", suffix=".tmp", dir=entry.parent))
    try:
        export_checkpoint(checkpoint_dir, stage, device="cpu", formats=("onnx",), parity_cases=_CACHE_PARITY_CASES)
        try:
            os.rename(stage, entry)
        except OSError:
            if not (entry / "manifest.json").is_file():  # not a concurrent winner: a real failure
                raise
            log.debug("another process cached %s first", entry)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return entry

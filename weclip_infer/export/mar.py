"""Package a model directory as a TorchServe ``.mar`` archive with the package's handler file.

The model directory is one of ours: a checkpoint (``config.json`` + ``model.safetensors``, with
``backbone.safetensors`` when saved with ``include_backbone=True``) or an exported bundle
(``manifest.json`` + ``model.ts.pt`` / ``model.onnx``). All its files go into the archive as
extra files (the archive is the model directory when TorchServe unpacks it); no
``--serialized-file`` is passed (optional in torch-model-archiver 0.12), so nothing in the archive
is a pickle that TorchServe's built-in loaders would try to ``torch.load``.

CLI: ``python -m weclip_infer.export.mar MODEL_DIR --out model_store --name weclip_demo
[--version 1.0] [--backend onnx] [--max-pixels N] [--scales 1,0.75] [--flip/--no-flip] [--crf]``.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Mapping, Optional, Union

from ..serving.serve_config import SERVE_CONFIG, check_backend_for_model, validate_serve_config

__all__ = ["BATCHING_KEYS", "build_mar", "default_handler_path", "main"]

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


def default_handler_path() -> Path:
    """The handler file shipped in :mod:`weclip_infer.serving` (found in a wheel install too)."""
    from ..serving import handler_file

    return handler_file()


def _is_model_dir(d: Path) -> str:
    if (d / "manifest.json").is_file():
        return "bundle"
    if (d / "config.json").is_file() and (d / "model.safetensors").is_file():
        return "checkpoint"
    raise ValueError(f"{d}: not a model directory (needs config.json + model.safetensors, or manifest.json)")


#: TorchServe's per-model settings an archive can carry (its ``model-config.yaml``), by our names.
BATCHING_KEYS = {"batch_size": "batchSize", "max_batch_delay_ms": "maxBatchDelay",
                 "response_timeout_s": "responseTimeout"}


def _model_config_yaml(batching: Mapping[str, Any]) -> str:
    """``model-config.yaml`` text for ``batching`` (keys of :data:`BATCHING_KEYS`, positive integers)."""
    import yaml

    out = {}
    for key, value in batching.items():
        if key not in BATCHING_KEYS:
            raise ValueError(f"batching: unknown key {key!r} (use {', '.join(BATCHING_KEYS)})")
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"batching: {key} must be a positive integer, got {value!r}")
        out[BATCHING_KEYS[key]] = value
    return yaml.safe_dump(out, sort_keys=True)


def build_mar(model_dir: Union[str, os.PathLike], export_path: Union[str, os.PathLike], name: str = "weclip",
              version: str = "1.0", serve_config: Optional[Mapping[str, Any]] = None,
              handler: Union[str, os.PathLike, None] = None, timeout: float = 600,
              batching: Optional[Mapping[str, int]] = None) -> Path:
    """Build ``<export_path>/<name>.mar`` from ``model_dir``; returns its path (overwrites).

    ``serve_config``: written into the archive as ``serve_config.json`` (``backend``,
    ``max_pixels``, ``scales``, ``flip``, ``crf``, ``long_side``, ``num_threads``); replaces one
    that the model directory already carries. ``batching``: TorchServe's batching for this
    model, carried by the archive (``model-config.yaml``): ``batch_size``, ``max_batch_delay_ms``,
    ``response_timeout_s``. TorchServe takes them over a ``models=`` entry in
    ``config.properties``; parameters of a management-API registration take precedence over both.
    Without it the archive carries none (a model registered without settings gets batch size 1).
    """
    model_dir = Path(model_dir).resolve()
    if not model_dir.is_dir():
        raise FileNotFoundError(f"{model_dir}: model directory not found")
    _is_model_dir(model_dir)
    if not _NAME_RE.match(name):
        raise ValueError(f"model name {name!r}: use letters, digits, '_', '-', '.'")
    if not _NAME_RE.match(str(version)):
        raise ValueError(f"version {version!r}: use letters, digits, '_', '-', '.'")
    handler = Path(handler) if handler is not None else default_handler_path()
    if not handler.is_file():
        raise FileNotFoundError(f"{handler}: handler not found")
    if serve_config is not None:
        check_backend_for_model(validate_serve_config(serve_config)["backend"], model_dir)
    model_config = _model_config_yaml(batching) if batching else None
    export_path = Path(export_path).resolve()
    export_path.mkdir(parents=True, exist_ok=True)

    # The archiver splits --extra-files on ',' and globs each entry, and stages in
    # $TMPDIR/<name>: copy into a private staging folder with safe names and give it its own TMPDIR.
    with tempfile.TemporaryDirectory(prefix="weclip_mar_") as td:
        stage = Path(td) / "files"
        stage.mkdir()
        for f in sorted(model_dir.iterdir()):
            if f.name.startswith(".") or f.name == "MAR-INF" or f.suffix == ".tmp":
                continue
            if f.name == SERVE_CONFIG and serve_config is not None:
                continue
            if re.search(r"[,*?\[\]]", f.name):
                raise ValueError(f"{f}: file names with ',', '*', '?', '[' or ']' cannot go into a .mar")
            (shutil.copytree if f.is_dir() else shutil.copy2)(f, stage / f.name)
        if serve_config is not None:
            (stage / SERVE_CONFIG).write_text(json.dumps(dict(serve_config), indent=2))
        extra = ",".join(str(p) for p in sorted(stage.iterdir()))
        tmp = Path(td) / "tmp"
        tmp.mkdir()
        cmd = [sys.executable, "-m", "model_archiver.model_packaging",
               "--model-name", name, "--version", str(version), "--handler", str(handler),
               "--extra-files", extra, "--export-path", str(export_path), "--force"]
        if model_config is not None:
            (Path(td) / "model-config.yaml").write_text(model_config)
            cmd += ["--config-file", str(Path(td) / "model-config.yaml")]
        env = dict(os.environ, TMPDIR=str(tmp))
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"torch-model-archiver failed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    out = export_path / f"{name}.mar"
    if not out.is_file():
        raise RuntimeError(f"torch-model-archiver did not write {out}")
    return out


def main(argv: Optional[list] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m weclip_infer.export.mar",
                                 description="Package a WeCLIP checkpoint or export bundle as a TorchServe .mar. "
                                             "Options below are written into the archive's serve_config.json.")
    ap.add_argument("model_dir", help="checkpoint directory (saved with include_backbone=True) or export bundle")
    ap.add_argument("--out", default="model_store", help="export folder (default: model_store)")
    ap.add_argument("--name", default="weclip", help="model name (default: weclip)")
    ap.add_argument("--version", default="1.0", help="model version (default: 1.0)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing <out>/<name>.mar")
    ap.add_argument("--backend", choices=["auto", "torchscript", "onnx", "eager"], default=None,
                    help="network backend of the worker (default: auto)")
    ap.add_argument("--max-pixels", type=int, default=None, help="largest decoded image, in pixels (default 40 MP)")
    ap.add_argument("--scales", default=None, help="default test-time scales, e.g. 1,0.75")
    ap.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None, help="default flip averaging")
    ap.add_argument("--crf", action=argparse.BooleanOptionalAction, default=None, help="DenseCRF by default")
    ap.add_argument("--crf-backend", choices=["auto", "torch", "densecrf"], default=None,
                    help="CRF implementation (default: auto)")
    ap.add_argument("--crf-max-pixels", type=int, default=None,
                    help="CRF pixel budget: larger images are refined at a reduced size")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default=None,
                    help="network arithmetic (default: the model's; bf16 needs a checkpoint directory)")
    ap.add_argument("--network-batch", type=int, default=None,
                    help="most same-size images of a TorchServe batch run as one network pass")
    ap.add_argument("--batch-size", type=int, default=None,
                    help="TorchServe batch size carried by the archive (model-config.yaml; default: none, set it in "
                         "config.properties or at registration)")
    ap.add_argument("--max-batch-delay", type=int, default=None, metavar="MS",
                    help="TorchServe's wait to fill a batch, in ms, carried by the archive")
    ap.add_argument("--response-timeout", type=int, default=None, metavar="S",
                    help="seconds a batch may take before TorchServe restarts the worker, carried by the archive")
    ap.add_argument("--handler", default=None, help="handler file (default: the one shipped in weclip_infer.serving)")
    a = ap.parse_args(argv)
    target = Path(a.out) / f"{a.name}.mar"
    if target.exists() and not a.overwrite:
        print(f"error: {target} exists; pass --overwrite to replace it", file=sys.stderr)
        return 2
    keys = ("backend", "max_pixels", "flip", "crf", "crf_backend", "crf_max_pixels", "network_batch", "precision")
    sc: dict = {k: getattr(a, k) for k in keys if getattr(a, k) is not None}
    if a.scales is not None:
        try:
            sc["scales"] = [float(s) for s in a.scales.split(",")]
        except ValueError:
            print(f"error: --scales: comma-separated numbers expected, got {a.scales!r}", file=sys.stderr)
            return 2
    try:
        batching = {k: v for k, v in (("batch_size", a.batch_size), ("max_batch_delay_ms", a.max_batch_delay),
                                      ("response_timeout_s", a.response_timeout)) if v is not None}
        out = build_mar(a.model_dir, a.out, name=a.name, version=a.version, serve_config=sc or None,
                        handler=a.handler, batching=batching or None)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

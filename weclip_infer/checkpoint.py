"""Checkpoints: our format and import of the authors' WeCLIP checkpoints.

Our format is a directory::

    config.json        {"format": "weclip_infer/1", "version", "config": WeCLIPConfig, "class_names",
                        "sha256": {file name: hex digest of each weights file}, ...}
    model.safetensors  decoder weights (``decoder.*``) + cached text embeddings (``text_fg``, ``text_bg``)
    backbone.safetensors   optional: the CLIP image tower, so the bundle is self-contained

Serving never needs the text tower: the text embeddings travel in ``model.safetensors``.
Everything is loaded with safetensors or ``torch.load(weights_only=True)``; nothing is unpickled.

Loading checks what it reads, so a damaged or tampered folder fails with one clear error
(``CheckpointError`` naming the file and, for config values, the key): ``config.json`` is
bounded in size and nesting and every config value is validated; each weights file must match
the sha256 recorded at save time (folders written before hashes were recorded load without that
check); every tensor must be finite and present; a relative ``clip_weights`` must stay inside the
checkpoint folder.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import sys
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch

from .config import ConfigError, WeCLIPConfig, load_config, parse_config_text, read_config_text, to_dict
from .io_utils import atomic_path, write_json_atomic

__all__ = [
    "CheckpointError", "save_checkpoint", "load_checkpoint", "import_reference_checkpoint",
    "reference_to_ours", "file_sha256", "read_checkpoint_meta", "read_checkpoint_tensors",
    "load_decoder_state", "main",
]

WEIGHT_FILES = ("model.safetensors", "backbone.safetensors")
REQUIRED_TENSORS = ("text_fg", "text_bg")

FORMAT = "weclip_infer/1"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable or does not match the model."""


def file_sha256(path: Union[str, os.PathLike]) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_checkpoint(model, directory: Union[str, os.PathLike], include_backbone: bool = False,
                    extra: Optional[Mapping[str, Any]] = None) -> Path:
    """Write ``model`` in our format to ``directory`` (files written atomically)."""
    from safetensors.torch import save_file

    from . import __version__

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tensors = {f"decoder.{k}": v.detach().contiguous().cpu() for k, v in model.decoder.state_dict().items()}
    tensors["text_fg"] = model.text_fg.detach().contiguous().cpu()
    tensors["text_bg"] = model.text_bg.detach().contiguous().cpu()
    with atomic_path(d / "model.safetensors") as tmp:
        save_file(tensors, str(tmp), metadata={"format": FORMAT})
    cfg = to_dict(model.cfg)
    if include_backbone:
        from .backbone import save_clip

        clip = model.backbone.clip
        mcfg = _model_cfg_of(model)
        save_clip(clip, d / "backbone.safetensors", mcfg, model.cfg.backbone.patch_stem)
        cfg["backbone"]["clip_weights"] = "backbone.safetensors"
        cfg["backbone"]["model_cfg"] = mcfg
    meta = {"format": FORMAT, "version": __version__, "config": cfg, "class_names": list(model.classes.names),
            "num_classes": model.num_classes}
    if extra:
        meta.update(extra)
    meta["sha256"] = {name: file_sha256(d / name) for name in WEIGHT_FILES
                      if (d / name).is_file() and (name == "model.safetensors" or include_backbone)}
    write_json_atomic(d / "config.json", meta)
    return d


def _model_cfg_of(model) -> dict:
    """The open_clip model config of a loaded backbone (kept on the config or rebuilt)."""
    if model.cfg.backbone.model_cfg is not None:
        return dict(model.cfg.backbone.model_cfg)
    import open_clip

    mc = open_clip.get_model_config(model.cfg.backbone.model_name)
    if mc is None:
        raise CheckpointError(f"unknown open_clip model {model.cfg.backbone.model_name}")
    mc = dict(mc)
    if "quickgelu" in model.cfg.backbone.model_name:
        mc["quick_gelu"] = True
    return mc


def _resolve_weights(path: str, base: Path) -> str:
    """``clip_weights`` of a checkpoint: a registry tag, a built-in name or an absolute path (the
    user's own file, as training records it) as is; a relative path must name a file inside the
    checkpoint folder ``base`` (a path leaving it, by ``..`` or a link, is refused)."""
    from .backbone import BUILTIN_WEIGHTS

    if path in ("openai", "random") or path in BUILTIN_WEIGHTS or os.path.isabs(path):
        return path
    cand = base / path
    if not cand.exists():
        return path  # e.g. another open_clip pretrained tag
    root = base.resolve()
    target = cand.resolve()
    if target != root and root not in target.parents:
        raise CheckpointError(f"{base / 'config.json'}: config.backbone.clip_weights={path!r} resolves outside the "
                              f"checkpoint folder ({target}); refusing to read it")
    return str(target)


def read_checkpoint_meta(directory: Union[str, os.PathLike]) -> dict:
    """``config.json`` of a checkpoint folder, bounded in size and nesting, with its ``config``
    checked to be a mapping (its values are validated by ``load_config``)."""
    d = Path(directory)
    cfg_file, weights = d / "config.json", d / "model.safetensors"
    if not cfg_file.is_file() or not weights.is_file():
        raise CheckpointError(f"{d}: not a weclip_infer checkpoint (needs config.json and model.safetensors)")
    try:
        meta = parse_config_text(read_config_text(cfg_file), str(cfg_file), json_only=True)
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{cfg_file}: expected a JSON object, got {type(meta).__name__}")
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{cfg_file}: unsupported checkpoint format {meta.get('format')!r}")
    if not isinstance(meta.get("config"), dict):
        raise CheckpointError(f"{cfg_file}: 'config' must be a JSON object, got {type(meta.get('config')).__name__}")
    hashes = meta.get("sha256", {})
    if not isinstance(hashes, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in hashes.items()):
        raise CheckpointError(f"{cfg_file}: 'sha256' must map file names to hex digests")
    return meta


def verify_weights_file(directory: Path, name: str, meta: Mapping[str, Any]) -> None:
    """Check ``directory/name`` against the sha256 recorded in ``config.json`` (when recorded)."""
    expected = (meta.get("sha256") or {}).get(name)
    if expected is None:
        return
    got = file_sha256(directory / name)
    if got != expected.lower():
        raise CheckpointError(f"{directory / name}: sha256 {got} does not match the {expected} recorded in "
                              "config.json; the file is damaged or was changed")


def _check_finite(tensors: Mapping[str, torch.Tensor], source: str) -> None:
    for k, v in tensors.items():
        if torch.is_floating_point(v) and not bool(torch.isfinite(v).all()):
            raise CheckpointError(f"{source}: tensor {k!r} holds NaN or infinite values")


def read_checkpoint_tensors(directory: Union[str, os.PathLike], meta: Optional[Mapping[str, Any]] = None) -> dict:
    """Tensors of ``model.safetensors`` (``decoder.*``, ``text_fg``, ``text_bg``), verified against
    the recorded sha256, complete and finite; ``CheckpointError`` naming the file otherwise."""
    from safetensors.torch import load_file

    d = Path(directory)
    if meta is None:
        meta = read_checkpoint_meta(d)
    weights = d / "model.safetensors"
    verify_weights_file(d, "model.safetensors", meta)
    try:
        tensors = load_file(str(weights))
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for a bad file
        raise CheckpointError(f"{weights}: cannot read: {e}") from None
    missing = [k for k in REQUIRED_TENSORS if k not in tensors]
    if missing:
        raise CheckpointError(f"{weights}: missing tensor(s) {missing}; not a complete weclip_infer checkpoint")
    if not any(k.startswith("decoder.") for k in tensors):
        raise CheckpointError(f"{weights}: no decoder weights (decoder.*)")
    _check_finite(tensors, str(weights))
    return tensors


def load_checkpoint(path: Union[str, os.PathLike], device=None, clip_weights: Optional[str] = None,
                    overrides=()):
    """Load a model saved by ``save_checkpoint``. ``clip_weights`` overrides the CLIP source."""
    from .model import build_model, select_device

    d = Path(path)
    if d.is_file() and d.name == "config.json":
        d = d.parent
    meta = read_checkpoint_meta(d)
    try:
        cfg = load_config(meta["config"], overrides)
    except ConfigError as e:
        raise CheckpointError(f"{d / 'config.json'}: config.{e}") from None
    own_backbone = False
    if clip_weights is None:
        clip_weights = _resolve_weights(cfg.backbone.clip_weights, d)
        own_backbone = Path(clip_weights).parent == d.resolve() and Path(clip_weights).is_file()
        if own_backbone:
            verify_weights_file(d, Path(clip_weights).name, meta)
    cfg.backbone.clip_weights = clip_weights
    tensors = read_checkpoint_tensors(d, meta)
    model = build_model(cfg, device="cpu", text_fg=tensors.pop("text_fg"), text_bg=tensors.pop("text_bg"))
    dec = {k[len("decoder."):]: v for k, v in tensors.items() if k.startswith("decoder.")}
    load_decoder_state(model, dec, str(d / "model.safetensors"))
    if own_backbone:
        _check_finite(dict(model.backbone.named_parameters()), str(clip_weights))
    return model.to(select_device(device)).eval()


def load_decoder_state(model, sd: Mapping[str, torch.Tensor], source: str) -> None:
    """Load decoder weights (our key names) into ``model.decoder``; every key and shape must
    match the model's config (``CheckpointError`` listing the differences)."""
    own = model.decoder.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    bad = [k for k in sd if k in own and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or bad:
        raise CheckpointError(f"{source}: decoder weights do not match the config (missing {missing[:4]}, "
                              f"unexpected {unexpected[:4]}, shape mismatch "
                              f"{[(k, tuple(sd[k].shape), tuple(own[k].shape)) for k in bad[:4]]})")
    model.decoder.load_state_dict({k: v.float() for k, v in sd.items()})


def reference_to_ours(sd: Mapping[str, torch.Tensor]) -> dict:
    """Map the authors' decoder keys to ours; drops ``encoder.*`` and ``par.kernel``."""
    out = {}
    for k, v in sd.items():
        if k.startswith("decoder_fts_fuse.linears_modulelist."):
            rest = k[len("decoder_fts_fuse.linears_modulelist."):]
            out["mlps." + rest] = v
        elif k.startswith("decoder_fts_fuse.linear_fuse."):
            out["fuse." + k.split(".")[-1]] = v
        elif k.startswith("decoder.transformer.resblocks."):
            out["layers." + k[len("decoder.transformer.resblocks."):]] = v
        elif k.startswith("decoder.linear_pred."):
            out["classifier." + k.split(".")[-1]] = v
    return out


def import_reference_checkpoint(path: Union[str, os.PathLike], config: Union[WeCLIPConfig, Mapping, str, None] = None,
                                device=None, model=None):
    """Load an authors' ``WeCLIP_model_iter_N.pth`` (a flat state dict) into a ``WeCLIP``.

    ``config`` must name the CLIP weights (``backbone.clip_weights``) and dataset; the
    checkpoint's own ``encoder.*`` copy of CLIP is ignored (and ``positional_embedding_new``,
    which the authors' code never uses). Pass ``model`` to load into an existing model instead of building one.
    """
    from .model import build_model, select_device

    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"reference checkpoint not found: {p}")
    try:
        sd = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{p}: cannot read as a state dict (weights_only): {e}") from None
    if isinstance(sd, dict) and "state_dict" in sd:
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise CheckpointError(f"{p}: not a state dict")
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}
    dec = reference_to_ours(sd)
    if not dec:
        raise CheckpointError(f"{p}: no WeCLIP decoder keys (decoder_fts_fuse.*, decoder.*) found")
    if model is None:
        cfg = load_config(config)
        n_cls = sd["decoder.linear_pred.weight"].shape[0] if "decoder.linear_pred.weight" in sd else None
        expected = {"voc": 21, "coco": 81}.get(cfg.text.dataset)
        if n_cls is not None and expected is not None and n_cls != expected:
            raise CheckpointError(f"{p}: classifier has {n_cls} classes but text.dataset={cfg.text.dataset} "
                                  f"has {expected}")
        model = build_model(cfg, device="cpu")
    load_decoder_state(model, dec, str(p))
    return model.to(select_device(device)).eval()


IMPORT_EPILOG = """examples:
  weclip-import WeCLIP_model_iter_30000.pth --clip /models/ViT-B-16.pt --out my_model
  weclip-import coco_iter_80000.pth --clip openai --dataset coco --out coco_model --include-backbone

The output folder is a regular weclip_infer checkpoint: load it with load_checkpoint, segment with
weclip-segment --model my_model, export it with weclip-export. Only the decoder is taken from the
authors' file; the CLIP image tower comes from --clip (the file's own copy of CLIP is ignored).
"""


def build_import_parser() -> argparse.ArgumentParser:
    """The ``weclip-import`` command line."""
    ap = argparse.ArgumentParser(
        prog="weclip-import", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=IMPORT_EPILOG,
        description="Convert a checkpoint released by the WeCLIP authors (WeCLIP_model_iter_N.pth) into this "
                    "package's checkpoint folder (config.json + model.safetensors).")
    ap.add_argument("checkpoint", help="the authors' WeCLIP_model_iter_N.pth (read as plain tensors, never unpickled)")
    ap.add_argument("--clip", required=True, help="CLIP weights: path to OpenAI's ViT-B-16.pt, or 'openai' "
                                                  "(open_clip's download cache)")
    ap.add_argument("--dataset", choices=["voc", "coco"], default="voc",
                    help="the data set the checkpoint was trained on: its classes and prompts (default: voc)")
    ap.add_argument("--out", required=True, help="output folder to write (our checkpoint format)")
    ap.add_argument("--include-backbone", action="store_true",
                    help="also store the CLIP image tower in the folder, so it needs no CLIP file to load")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace the files of an existing, non-empty --out folder (refused otherwise)")
    ap.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    return ap


def main(argv=None) -> int:
    """``weclip-import``: convert an authors' checkpoint into our format."""
    import logging

    a = build_import_parser().parse_args(argv)
    out = Path(a.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not a.overwrite:
        print(f"weclip-import: error: {out} exists and is not empty; choose another --out or pass --overwrite",
              file=sys.stderr)
        return 2
    try:
        cfg = {"backbone": {"clip_weights": a.clip}, "text": {"dataset": a.dataset}}
        model = import_reference_checkpoint(a.checkpoint, cfg, device="cpu")
        save_checkpoint(model, a.out, include_backbone=a.include_backbone,
                        extra={"imported_from": os.path.basename(a.checkpoint),
                               "source_sha256": file_sha256(a.checkpoint)})
    except Exception as e:  # noqa: BLE001 - a CLI: one line, the traceback under --debug
        if a.debug:
            logging.getLogger(__name__).exception("weclip-import failed")
        print(f"weclip-import: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Checkpoints: our format and import of the authors' WeCLIP checkpoints (spec §9).

Our format is a directory::

    config.json        {"format": "weclip_infer/1", "version", "config": WeCLIPConfig, "class_names", ...}
    model.safetensors  decoder weights (``decoder.*``) + cached text embeddings (``text_fg``, ``text_bg``)
    backbone.safetensors   optional: the CLIP image tower, so the bundle is self-contained

Serving never needs the text tower: the text embeddings travel in ``model.safetensors``.
Everything is loaded with safetensors or ``torch.load(weights_only=True)``; nothing is unpickled.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch

from .config import WeCLIPConfig, load_config, to_dict
from .io_utils import atomic_path, write_json_atomic

__all__ = [
    "CheckpointError", "save_checkpoint", "load_checkpoint", "import_reference_checkpoint",
    "reference_to_ours", "file_sha256", "main",
]

FORMAT = "weclip_infer/1"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable or does not match the model."""


def file_sha256(path: Union[str, os.PathLike]) -> str:
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
    from .backbone import BUILTIN_WEIGHTS

    if path in ("openai", "random") or path in BUILTIN_WEIGHTS or os.path.isabs(path):
        return path
    cand = base / path
    return str(cand) if cand.exists() else path


def load_checkpoint(path: Union[str, os.PathLike], device=None, clip_weights: Optional[str] = None,
                    overrides=()) :
    """Load a model saved by ``save_checkpoint``. ``clip_weights`` overrides the CLIP source."""
    from safetensors.torch import load_file

    from .model import build_model

    d = Path(path)
    if d.is_file() and d.name == "config.json":
        d = d.parent
    cfg_file, weights = d / "config.json", d / "model.safetensors"
    if not cfg_file.is_file() or not weights.is_file():
        raise CheckpointError(f"{d}: not a weclip_infer checkpoint (needs config.json and model.safetensors)")
    try:
        meta = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_file}: invalid JSON: {e}") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{cfg_file}: unsupported checkpoint format {meta.get('format')!r}")
    cfg = load_config(meta["config"], overrides)
    cfg.backbone.clip_weights = clip_weights or _resolve_weights(cfg.backbone.clip_weights, d)
    try:
        tensors = load_file(str(weights))
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{weights}: cannot read: {e}") from None
    model = build_model(cfg, device="cpu", text_fg=tensors.pop("text_fg"), text_bg=tensors.pop("text_bg"))
    dec = {k[len("decoder."):]: v for k, v in tensors.items() if k.startswith("decoder.")}
    _load_decoder(model, dec, str(weights))
    from .model import select_device

    return model.to(select_device(device)).eval()


def _load_decoder(model, sd: Mapping[str, torch.Tensor], source: str) -> None:
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
    """Map the authors' decoder keys (spec §9.1) to ours; drops ``encoder.*`` and ``par.kernel``."""
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
    """Load an authors' ``WeCLIP_model_iter_N.pth`` (flat state dict, spec §9.1) into a ``WeCLIP``.

    ``config`` must name the CLIP weights (``backbone.clip_weights``) and dataset; the
    checkpoint's own ``encoder.*`` copy of CLIP is ignored (and ``positional_embedding_new``,
    §11.2 item 19). Pass ``model`` to load into an existing model instead of building one.
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
            raise CheckpointError(f"{p}: classifier has {n_cls} classes but text.dataset={cfg.text.dataset} has {expected}")
        model = build_model(cfg, device="cpu")
    _load_decoder(model, dec, str(p))
    return model.to(select_device(device)).eval()


def main(argv=None) -> int:
    """``weclip-import``: convert an authors' checkpoint into our format."""
    ap = argparse.ArgumentParser(prog="weclip-import", description=import_reference_checkpoint.__doc__)
    ap.add_argument("checkpoint", help="the authors' WeCLIP_model_iter_N.pth")
    ap.add_argument("--clip", required=True, help="CLIP weights: path to OpenAI ViT-B-16.pt, or 'openai'")
    ap.add_argument("--dataset", choices=["voc", "coco"], default="voc")
    ap.add_argument("--out", required=True, help="output directory (our checkpoint format)")
    ap.add_argument("--include-backbone", action="store_true", help="also store the CLIP image tower in the bundle")
    a = ap.parse_args(argv)
    try:
        model = import_reference_checkpoint(a.checkpoint, {"backbone": {"clip_weights": a.clip}, "text": {"dataset": a.dataset}}, device="cpu")
        save_checkpoint(model, a.out, include_backbone=a.include_backbone,
                        extra={"imported_from": os.path.basename(a.checkpoint), "source_sha256": file_sha256(a.checkpoint)})
    except Exception as e:  # noqa: BLE001
        print(f"weclip-import: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

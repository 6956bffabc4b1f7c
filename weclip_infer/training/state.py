"""Training checkpoints and exact resume.

A checkpoint is a directory ``<out>/checkpoints/iter_<N>/`` holding

* the model in our format (``config.json`` + ``model.safetensors``, written by
  :func:`weclip_infer.checkpoint.save_checkpoint`) — loadable by ``load_checkpoint`` and usable
  for inference as is;
* ``train_config.json``: the whole resolved training config (model + train + data);
* ``train_state.pt``: optimiser state, iteration, epoch and position inside the epoch, the
  model's RFM forward counter ``iter_num``, the pseudo-label confusion matrix, and the RNG states
  of python / numpy / torch / CUDA for every process. Only tensors and plain Python values are
  stored, and it is read with ``torch.load(weights_only=True)``.

The directory is built under a temporary name and renamed into place, then the text file
``<out>/checkpoints/latest`` (``iter_<N>``) is replaced atomically, so a crash never leaves a
half-written checkpoint behind ``latest``.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch

from weclip_infer.config import ConfigError
from weclip_infer.io_utils import atomic_path, write_json_atomic

__all__ = [
    "STATE_FORMAT",
    "capture_rng",
    "restore_rng",
    "save_training_checkpoint",
    "load_train_state",
    "resolve_checkpoint",
    "latest_checkpoint",
    "prune_checkpoints",
]

STATE_FORMAT = "weclip_infer.training/1"
PathLike = Union[str, os.PathLike]


# ------------------------------------------------------------------------------------------------
# RNG states as tensors / primitives (weights_only-loadable)
# ------------------------------------------------------------------------------------------------

def capture_rng() -> dict:
    """RNG states of python ``random``, numpy's global generator, torch CPU and CUDA."""
    py = random.getstate()  # (version, tuple of 625 ints, gauss_next)
    npst = np.random.get_state()  # ('MT19937', uint32[624], pos, has_gauss, cached_gaussian)
    out = {
        "python_version": int(py[0]),
        "python_state": torch.tensor(py[1], dtype=torch.int64),
        "python_gauss": py[2],
        "numpy_name": str(npst[0]),
        "numpy_keys": torch.from_numpy(np.asarray(npst[1], dtype=np.int64)),
        "numpy_pos": int(npst[2]),
        "numpy_has_gauss": int(npst[3]),
        "numpy_gauss": float(npst[4]),
        "torch": torch.get_rng_state(),
        "cuda": [s for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
    }
    return out


def restore_rng(st: dict) -> None:
    random.setstate((st["python_version"], tuple(int(x) for x in st["python_state"].tolist()), st["python_gauss"]))
    np.random.set_state((st["numpy_name"], st["numpy_keys"].numpy().astype(np.uint32), st["numpy_pos"],
                         st["numpy_has_gauss"], st["numpy_gauss"]))
    torch.set_rng_state(st["torch"].cpu())
    cuda = st.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([c.cpu() for c in cuda])


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


# ------------------------------------------------------------------------------------------------
# writing
# ------------------------------------------------------------------------------------------------

def _replace_dir(tmp: Path, final: Path) -> None:
    """Move the finished directory ``tmp`` to ``final`` (replacing an older one)."""
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def save_training_checkpoint(out_dir: PathLike, model, optimizer: torch.optim.Optimizer, *, iteration: int,
                             epoch: int, epoch_pos: int, full_config: dict, rng_states: list,
                             pseudo_hist: Optional[torch.Tensor] = None, scaler_state: Optional[dict] = None,
                             elapsed: float = 0.0, world_size: int = 1, extra_meta: Optional[dict] = None) -> Path:
    """Write ``<out_dir>/checkpoints/iter_<iteration>/`` atomically and point ``latest`` at it.

    ``model`` is the bare ``WeCLIP`` (not a DDP wrapper); ``rng_states`` one
    :func:`capture_rng` dict per process (rank order).
    """
    from weclip_infer.checkpoint import save_checkpoint

    ck_root = Path(out_dir) / "checkpoints"
    ck_root.mkdir(parents=True, exist_ok=True)
    name = f"iter_{int(iteration)}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=ck_root))
    try:
        meta = {"iteration": int(iteration), "epoch": int(epoch)}
        if extra_meta:
            meta.update(extra_meta)
        save_checkpoint(model, tmp, include_backbone=False, extra={"training": meta})
        write_json_atomic(tmp / "train_config.json", full_config)
        state = {
            "format": STATE_FORMAT,
            "iteration": int(iteration),
            "epoch": int(epoch),
            "epoch_pos": int(epoch_pos),
            "iter_num": int(model.iter_num),
            "scheduler": {"step": int(iteration)},
            "optimizer": _to_cpu(optimizer.state_dict()),
            "scaler": scaler_state,
            "rng": [_to_cpu(s) for s in rng_states],
            "world_size": int(world_size),
            "pseudo_hist": None if pseudo_hist is None else pseudo_hist.detach().cpu().to(torch.int64),
            "elapsed": float(elapsed),
        }
        with atomic_path(tmp / "train_state.pt") as p:
            torch.save(state, str(p))
        final = ck_root / name
        _replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    with atomic_path(ck_root / "latest") as p:
        p.write_text(name + "\n")
    return final


def prune_checkpoints(out_dir: PathLike, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` ``iter_<N>`` checkpoints (never the one ``latest`` names)."""
    if keep <= 0:
        return []
    ck_root = Path(out_dir) / "checkpoints"
    found = sorted(((int(p.name[5:]), p) for p in ck_root.glob("iter_*") if p.is_dir() and p.name[5:].isdigit()))
    latest = latest_checkpoint(out_dir)
    removed = []
    for _, p in found[:-keep]:
        if latest is not None and p.resolve() == latest.resolve():
            continue
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed


# ------------------------------------------------------------------------------------------------
# reading
# ------------------------------------------------------------------------------------------------

def latest_checkpoint(out_dir: PathLike) -> Optional[Path]:
    """The checkpoint ``<out_dir>/checkpoints/latest`` names, or None."""
    ptr = Path(out_dir) / "checkpoints" / "latest"
    if not ptr.is_file():
        return None
    name = ptr.read_text().strip()
    p = ptr.parent / name
    return p if p.is_dir() else None


def resolve_checkpoint(path: PathLike) -> Path:
    """A checkpoint directory from ``path``: the checkpoint itself, a run directory (its
    ``latest``), the ``checkpoints`` folder, or the ``latest`` pointer file."""
    p = Path(path)
    if p.is_file() and p.name == "latest":
        p = p.parent.parent
    if (p / "train_state.pt").is_file():
        return p
    if p.name == "checkpoints" and (p / "latest").is_file():
        p = p.parent
    lat = latest_checkpoint(p)
    if lat is not None and (lat / "train_state.pt").is_file():
        return lat
    raise ConfigError(f"--resume {path}: no training checkpoint there (expected iter_<N>/train_state.pt "
                      "or a run folder with checkpoints/latest)")


def load_train_state(ckpt: PathLike) -> dict:
    """``train_state.pt`` of a checkpoint, read with ``weights_only=True``."""
    p = Path(ckpt) / "train_state.pt"
    try:
        st = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"{p}: cannot read training state: {e}") from None
    if not isinstance(st, dict) or st.get("format") != STATE_FORMAT:
        raise ConfigError(f"{p}: not a {STATE_FORMAT} training state")
    return st


def load_checkpoint_config(ckpt: PathLike) -> dict:
    p = Path(ckpt) / "train_config.json"
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{p}: cannot read the training config: {e}") from None


def load_decoder_weights(ckpt: PathLike) -> dict:
    """Tensors of ``model.safetensors`` (``decoder.*``, ``text_fg``, ``text_bg``)."""
    from safetensors.torch import load_file

    return load_file(str(Path(ckpt) / "model.safetensors"))


__all__ += ["load_checkpoint_config", "load_decoder_weights"]

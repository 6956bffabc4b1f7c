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

The directory is built under a temporary name (``.iter_<N>.*.tmp``), every file in it and the
directory itself are flushed to disk (fsync), it is renamed into place and the parent directory
is flushed, and only then is the text file ``<out>/checkpoints/latest`` (``iter_<N>``) replaced
atomically, so neither a crash nor a power loss leaves ``latest`` naming unwritten data.
Temporary folders left by an interrupted write are removed when a run starts
(:func:`clean_stale_temporaries`).

Resuming a run folder takes the newest checkpoint that loads (:func:`find_resumable`): a
truncated ``train_state.pt``, a deleted ``iter_<N>`` folder, damaged weights or a bad ``latest``
pointer make it fall back to the next older one, with a warning naming what was skipped.
"""
from __future__ import annotations

import logging
import os
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional, Tuple, Union

import numpy as np
import torch

from weclip_infer.config import ConfigError
from weclip_infer.io_utils import atomic_path, write_json_atomic

logger = logging.getLogger(__name__)

__all__ = [
    "STATE_FORMAT",
    "find_resumable",
    "clean_stale_temporaries",
    "checkpoint_problem",
    "resolve_resume",
    "has_checkpoints",
    "load_checkpoint_config",
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
    py: tuple = random.getstate()  # (version, tuple of 625 ints, gauss_next)
    npst: tuple = tuple(np.random.get_state())  # ('MT19937', uint32[624], pos, has_gauss, cached_gaussian)
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

def _fsync_path(path: Path) -> None:
    """Flush a file's or a directory's contents to disk (directories: where the OS allows it)."""
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if path.is_dir() else 0)
    try:
        fd = os.open(str(path), flags)
    except OSError:
        if path.is_dir():
            return  # e.g. Windows cannot open directories; the rename is still atomic
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not path.is_dir():
            raise
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """fsync every file under ``root``, then the directories bottom-up."""
    dirs = []
    for dirpath, _dirnames, filenames in os.walk(root):
        dirs.append(Path(dirpath))
        for f in filenames:
            _fsync_path(Path(dirpath) / f)
    for d in reversed(dirs):
        _fsync_path(d)


def _publish_mode(path: Path) -> None:
    """Give a directory made by ``mkdtemp`` (0700) the mode the user's umask gives new folders."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o777 & ~umask)


def _replace_dir(tmp: Path, final: Path) -> None:
    """Move the finished directory ``tmp`` to ``final`` (replacing an older one), durably."""
    _fsync_tree(tmp)
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
        os.replace(tmp, final)
        _fsync_path(final.parent)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
        _fsync_path(final.parent)


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
        _publish_mode(tmp)
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
        _fsync_path(p)
    _fsync_path(ck_root)
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


_STALE = re.compile(r"^\.(iter_\d+\..+\.tmp|iter_\d+\.old-\d+|latest\..+\.tmp)$")


def clean_stale_temporaries(out_dir: PathLike) -> list[Path]:
    """Remove what interrupted checkpoint writes left in ``<out_dir>/checkpoints``: hidden
    ``.iter_<N>.*.tmp`` folders, ``.iter_<N>.old-<pid>`` folders and ``.latest.*.tmp`` files.
    Call it before a run writes there (only one run may write a run folder at a time)."""
    ck_root = Path(out_dir) / "checkpoints"
    removed: list[Path] = []
    if not ck_root.is_dir():
        return removed
    for p in sorted(ck_root.iterdir()):
        if not _STALE.match(p.name):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    if removed:
        logger.info("removed %d leftover(s) of interrupted checkpoint writes in %s: %s", len(removed), ck_root,
                    ", ".join(p.name for p in removed))
    return removed


# ------------------------------------------------------------------------------------------------
# reading
# ------------------------------------------------------------------------------------------------

def latest_checkpoint(out_dir: PathLike) -> Optional[Path]:
    """The checkpoint ``<out_dir>/checkpoints/latest`` names, or None (no pointer, or it names
    no ``iter_<N>`` folder there)."""
    ptr = Path(out_dir) / "checkpoints" / "latest"
    if not ptr.is_file():
        return None
    try:
        name = ptr.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    if not re.fullmatch(r"iter_\d+", name):
        return None
    p = ptr.parent / name
    return p if p.is_dir() else None


def _iter_dirs(ck_root: Path) -> list[Path]:
    """``iter_<N>`` folders of a checkpoints folder, newest (highest N) first."""
    if not ck_root.is_dir():
        return []
    found = [(int(p.name[5:]), p) for p in ck_root.iterdir()
             if p.is_dir() and p.name.startswith("iter_") and p.name[5:].isdigit()]
    return [p for _, p in sorted(found, reverse=True)]


def has_checkpoints(out_dir: PathLike) -> bool:
    """Whether ``<out_dir>/checkpoints`` holds a ``latest`` pointer or any ``iter_<N>`` folder."""
    ck_root = Path(out_dir) / "checkpoints"
    return (ck_root / "latest").is_file() or bool(_iter_dirs(ck_root))


def checkpoint_problem(ckpt: PathLike) -> Tuple[Optional[str], Optional[dict]]:
    """``(None, train_state)`` when the checkpoint folder loads completely (training state,
    config, weights with their recorded sha256), else ``(reason, None)``."""
    from weclip_infer.checkpoint import CheckpointError, read_checkpoint_meta, read_checkpoint_tensors

    p = Path(ckpt)
    if not p.is_dir():
        return f"{p}: no such checkpoint folder", None
    try:
        state = load_train_state(p)
        load_checkpoint_config(p)
        read_checkpoint_tensors(p, read_checkpoint_meta(p))
    except (ConfigError, CheckpointError) as e:
        return str(e), None
    return None, state


def find_resumable(run_dir: PathLike) -> Optional[Tuple[Path, dict]]:
    """The newest checkpoint of a run folder that loads, with its training state: the one
    ``latest`` names first, then the ``iter_<N>`` folders from the newest. Checkpoints skipped
    are logged with the reason. None when the run has no checkpoint at all; ``ConfigError`` when
    it has some but none loads."""
    ck_root = Path(run_dir) / "checkpoints"
    candidates: list[Path] = []
    skipped: list[str] = []
    lat = latest_checkpoint(run_dir)
    if lat is not None:
        candidates.append(lat)
    elif (ck_root / "latest").is_file():
        skipped.append("the 'latest' pointer names no checkpoint folder")
    candidates += [p for p in _iter_dirs(ck_root) if p not in candidates]
    if not candidates:
        return None
    for c in candidates:
        reason, state = checkpoint_problem(c)
        if reason is None:
            if skipped:
                logger.warning("resuming from %s, the newest checkpoint that loads (skipped: %s)", c,
                               "; ".join(skipped))
            return c, state  # type: ignore[return-value]
        skipped.append(f"{c.name}: {reason}")
    raise ConfigError(f"{run_dir}: no checkpoint there loads ({'; '.join(skipped)})")


def resolve_checkpoint(path: PathLike) -> Path:
    """A checkpoint directory from ``path``: the checkpoint itself, a run directory, the
    ``checkpoints`` folder, or the ``latest`` pointer file. For a run, the newest checkpoint
    that loads (see :func:`find_resumable`)."""
    return resolve_resume(path)[0]


def resolve_resume(path: PathLike) -> Tuple[Path, dict]:
    """``(checkpoint folder, training state)`` to resume from ``path`` (see
    :func:`resolve_checkpoint`). A checkpoint folder named directly must load; a run folder falls
    back to its newest checkpoint that loads."""
    p = Path(path)
    if p.is_file() and p.name == "latest":
        p = p.parent.parent
    elif p.name == "checkpoints" and p.is_dir() and not (p / "train_state.pt").exists():
        p = p.parent
    if (p / "train_state.pt").exists() or re.fullmatch(r"iter_\d+", p.name):
        reason, state = checkpoint_problem(p)
        if reason is not None:
            raise ConfigError(f"--resume {path}: this checkpoint cannot be loaded: {reason} (give the run folder "
                              "to resume from its newest checkpoint that loads)")
        return p, state  # type: ignore[return-value]
    found = find_resumable(p)
    if found is None:
        raise ConfigError(f"--resume {path}: no training checkpoint there (expected iter_<N>/train_state.pt "
                          "or a run folder with checkpoints/)")
    return found


def load_train_state(ckpt: PathLike) -> dict:
    """``train_state.pt`` of a checkpoint, read with ``weights_only=True``."""
    p = Path(ckpt) / "train_state.pt"
    if not p.is_file():
        raise ConfigError(f"{p}: missing")
    try:
        st = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises several types for a damaged file
        raise ConfigError(f"{p}: cannot read training state: {e}") from None
    if not isinstance(st, dict) or st.get("format") != STATE_FORMAT:
        raise ConfigError(f"{p}: not a {STATE_FORMAT} training state")
    return st


def load_checkpoint_config(ckpt: PathLike) -> dict:
    """``train_config.json`` of a checkpoint: the whole training config of the run."""
    from weclip_infer.config import parse_config_text

    p = Path(ckpt) / "train_config.json"
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p}: cannot read the training config: {e}") from None
    data = parse_config_text(text, str(p), json_only=True)
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a JSON object")
    return data


"""Training configuration: the ``train:`` and ``data:`` sections of a training YAML.

A training YAML has three sections::

    model:  a WeCLIPConfig dict (weclip_infer.config) — the model that is trained
    train:  TrainConfig (optimiser, schedule, loop, evaluation, checkpoints, devices)
    data:   DataConfig (dataset kind, root, splits, augmentation)

Every hyperparameter of the method is a key whose default is the published recipe (the
authors' code where paper and code differ). Unknown keys and bad values raise ``ConfigError``
naming the key. ``key=value`` overrides (``train.max_iters=10``,
``model.refine.rfm_switch_iter=5``) are applied before validation.

What the data defines, the data sets: with ``data.class_names_file`` (and ``model.text.dataset:
custom``) the file's list *is* the class list (prompts default to the names); a demo world's
classes come from its ``classes.json`` (or the demo world module). Settings that follow the
backbone (``model.refine.candidate_blocks``/``static_blocks``, ``model.decoder.dim``/``num_heads``)
are derived from it unless set.

Schedule lengths belong to the run length of the config they come from: when
``train.max_iters`` is overridden to a shorter run, ``train.warmup_iters`` and
``model.refine.rfm_switch_iter`` scale with it (unless overridden too), and a schedule that cannot
fit the run is logged as a warning.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import yaml

from weclip_infer.config import (
    ConfigError,
    WeCLIPConfig,
    apply_overrides,
    check_config_depth,
    from_dict,
    model_config_from_dict,
    read_config_file,
    to_dict,
)

logger = logging.getLogger(__name__)

__all__ = [
    "TrainConfig",
    "DataConfig",
    "FullConfig",
    "load_train_config",
    "full_config_to_dict",
    "DATA_KINDS",
    "dump_yaml",
]

DATA_KINDS = ("voc", "coco", "custom", "demo")
_DEFAULT_TRAIN_SPLIT = {"voc": "train_aug", "coco": "train", "custom": "train", "demo": "train"}


@dataclass
class TrainConfig:
    """Optimiser, schedule and loop. Defaults are the VOC recipe."""

    # --- schedule ------------------------------------------------------------------
    max_iters: int = 30000  # VOC 30k, COCO 80k optimiser steps
    batch_size: int = 4  # per process (the reference trains on one GPU with 4)
    # --- optimiser: AdamW on all decoder parameters -----------------------------------
    base_lr: float = 2e-4  # config lr of the reference
    lr_mult: float = 10.0  # the seg-head parameter group runs at 10x: effective lr 2e-3
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.01  # paper says 1e-3, code 0.01; applied to every parameter
    # --- lr schedule: linear warm-up, then poly with s/max_iters -----------------------
    warmup_iters: int = 50
    warmup_ratio: float = 1e-6
    poly_power: float = 1.0
    # --- reproducibility ----------------------------------------------------------------------
    seed: int = 1
    deterministic: bool = True  # cudnn.deterministic = True, cudnn.benchmark = False
    # --- devices -----------------------------------------------------------------------------------
    device: str = "auto"  # auto (CUDA if available) | cpu | cuda | cuda:N
    amp: bool = False  # the reference runs no autocast
    amp_dtype: str = "float16"  # float16 (GradScaler on CUDA) | bfloat16 (needs a bf16-safe cam.box_mask)
    dist_backend: str = "auto"  # auto: nccl on CUDA, gloo on CPU
    find_unused_parameters: bool = False  # every decoder parameter gets a gradient
    # --- logging / evaluation / checkpoints -------------------------------------------------------
    log_every: int = 200  # console/log-file line every N iterations (log.csv gets every iteration)
    eval_every: int = 2000  # in-training evaluation (single scale, no flip); 0 = none (COCO)
    eval_at_end: bool = True  # final evaluation with the model's inference scales + flip
    eval_max_images: int = 0  # evaluate on the first N val images only (0 = all)
    num_panels: int = 4  # val images shown in the panel PNG at each evaluation
    checkpoint_every: int = 2000  # a checkpoint every N iterations (0 = only at the end)
    keep_checkpoints: int = 0  # keep only the newest N checkpoints (0 = keep all)
    progress: bool = True  # tqdm progress bar (rank 0)
    tensorboard: bool = True  # TensorBoard scalars when torch.utils.tensorboard imports
    plots: bool = True  # loss / mIoU curve PNGs
    out_dir: str = "runs/weclip"

    def validate(self) -> "TrainConfig":
        for key in ("max_iters", "batch_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"train.{key}: must be >= 1, got {getattr(self, key)}")
        for key in ("warmup_iters", "log_every", "eval_every", "eval_max_images", "num_panels",
                    "checkpoint_every", "keep_checkpoints"):
            if getattr(self, key) < 0:
                raise ConfigError(f"train.{key}: must be >= 0, got {getattr(self, key)}")
        if not self.base_lr > 0:
            raise ConfigError(f"train.base_lr: must be > 0, got {self.base_lr}")
        if not self.lr_mult > 0:
            raise ConfigError(f"train.lr_mult: must be > 0, got {self.lr_mult}")
        if len(self.betas) != 2 or not all(isinstance(b, (int, float)) and 0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"train.betas: expected two numbers in [0, 1), got {self.betas!r}")
        self.betas = [float(b) for b in self.betas]
        if not self.eps > 0:
            raise ConfigError(f"train.eps: must be > 0, got {self.eps}")
        if self.weight_decay < 0:
            raise ConfigError(f"train.weight_decay: must be >= 0, got {self.weight_decay}")
        if not 0.0 <= self.warmup_ratio <= 1.0:
            raise ConfigError(f"train.warmup_ratio: must be in [0, 1], got {self.warmup_ratio}")
        if self.poly_power < 0:
            raise ConfigError(f"train.poly_power: must be >= 0, got {self.poly_power}")
        if self.seed < 0:
            raise ConfigError(f"train.seed: must be >= 0, got {self.seed}")
        if self.amp_dtype not in ("bfloat16", "float16"):
            raise ConfigError(f"train.amp_dtype: must be one of ['bfloat16', 'float16'], got {self.amp_dtype!r}")
        if self.dist_backend not in ("auto", "nccl", "gloo"):
            raise ConfigError(f"train.dist_backend: must be one of ['auto', 'nccl', 'gloo'], got {self.dist_backend!r}")
        dev = self.device.strip().lower()
        if dev not in ("auto", "cpu", "cuda") and not (dev.startswith("cuda:") and dev[5:].isdigit()):
            raise ConfigError(f"train.device: expected auto, cpu, cuda or cuda:N, got {self.device!r}")
        self.device = dev
        if not str(self.out_dir).strip():
            raise ConfigError("train.out_dir: must not be empty")
        return self

    @property
    def lr(self) -> float:
        """Effective learning rate of the decoder parameters (``base_lr · lr_mult``, 2e-3)."""
        return self.base_lr * self.lr_mult


@dataclass
class DataConfig:
    """Where the data lives and how training crops are made.

    ``kind``: ``voc`` | ``coco`` | ``custom`` | ``demo`` (the demo world written by
    ``python -m weclip_infer.demo.make_world``: a VOC-style layout with its own class list in
    ``<root>/classes.json``). ``labels_file``, ``class_names_file`` and ``masks_dir`` given as
    relative paths are looked up in ``root`` first, then in the current directory.
    """

    kind: str = "voc"
    root: str = ""
    train_split: Optional[str] = None  # default: train_aug (VOC), train (COCO, custom, demo)
    val_split: str = "val"  # the reference's in-training VOC validation used "train"
    labels_file: Optional[str] = None  # image-level labels (default: found in the root)
    class_names_file: Optional[str] = None  # foreground class names (.txt/.json): defines the classes
    masks_dir: Optional[str] = None  # custom kind only: GT PNGs mirroring the image paths (evaluation)
    crop_size: int = 320
    scale_range: list = field(default_factory=lambda: [0.5, 2.0])
    flip: bool = True
    workers: int = 10
    prefetch_factor: int = 4

    def validate(self) -> "DataConfig":
        if self.kind not in DATA_KINDS:
            raise ConfigError(f"data.kind: must be one of {list(DATA_KINDS)}, got {self.kind!r}")
        if not str(self.root).strip():
            raise ConfigError("data.root: required (the dataset folder)")
        if self.crop_size < 1:
            raise ConfigError(f"data.crop_size: must be >= 1, got {self.crop_size}")
        if (len(self.scale_range) != 2 or not all(isinstance(s, (int, float)) and not isinstance(s, bool)
                                                   for s in self.scale_range)
                or not 0 < self.scale_range[0] <= self.scale_range[1]):
            raise ConfigError(f"data.scale_range: expected [lo, hi] with 0 < lo <= hi, got {self.scale_range!r}")
        self.scale_range = [float(s) for s in self.scale_range]
        if self.workers < 0:
            raise ConfigError(f"data.workers: must be >= 0, got {self.workers}")
        if self.prefetch_factor < 1:
            raise ConfigError(f"data.prefetch_factor: must be >= 1, got {self.prefetch_factor}")
        if self.train_split is None:
            self.train_split = _DEFAULT_TRAIN_SPLIT[self.kind]
        for key in ("labels_file", "class_names_file", "masks_dir"):
            v = getattr(self, key)
            if v is not None:
                if not str(v).strip():
                    raise ConfigError(f"data.{key}: must not be empty (leave it out instead)")
                p = Path(v)
                if not p.is_absolute() and (Path(self.root) / p).exists():
                    setattr(self, key, str(Path(self.root) / p))
        return self


@dataclass
class FullConfig:
    """A whole training run: ``model`` + ``train`` + ``data``."""

    model: WeCLIPConfig
    train: TrainConfig
    data: DataConfig


_SECTIONS = ("model", "train", "data")
_SCHEDULE_KEYS = ("train.warmup_iters", "model.refine.rfm_switch_iter")


def _read(config: Union[FullConfig, Mapping, str, os.PathLike, None]) -> dict:
    if config is None:
        return {}
    if isinstance(config, FullConfig):
        return full_config_to_dict(config)
    if isinstance(config, Mapping):
        check_config_depth(config, "config")
        return json.loads(json.dumps(dict(config)))
    if not isinstance(config, (str, os.PathLike)):
        raise ConfigError(f"config: expected a mapping or a YAML path, got {type(config).__name__}")
    return read_config_file(config)


def _demo_classes(root: str) -> dict:
    """Class lists of a demo world: its ``classes.json`` when present, else the demo world
    module's own lists (the world generator writes the same ones)."""
    p = Path(root) / "classes.json"
    if p.is_file():
        try:
            meta = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ConfigError(f"data.root: cannot read {p}: {e}") from None
        if isinstance(meta, dict) and meta.get("class_names"):
            return meta
    from weclip_infer.demo.world import BACKGROUND_NAMES, CLASS_NAMES, CLASS_PROMPTS

    return {"class_names": list(CLASS_NAMES), "class_prompts": list(CLASS_PROMPTS),
            "bg_prompts": list(BACKGROUND_NAMES)}


def _data_class_names(dcfg: "DataConfig") -> Optional[list]:
    """The class list the data gives (``data.class_names_file``), or None."""
    if dcfg.class_names_file is None:
        return None
    from weclip_infer.data import DatasetError, load_class_names

    try:
        return list(load_class_names(dcfg.class_names_file))
    except DatasetError as e:
        raise ConfigError(f"data.class_names_file: {e}") from None


def _model_config(data: Mapping, dcfg: "DataConfig") -> WeCLIPConfig:
    """WeCLIPConfig from the ``model:`` section with the classes the data defines filled in;
    error messages name the key with its ``model.`` prefix."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"model: expected a mapping, got {type(data).__name__}")
    m = dict(data)
    text = dict(m.get("text") or {})
    if text.get("dataset", "voc") == "custom":
        file_names = _data_class_names(dcfg)
        if file_names is not None:
            given = text.get("class_names")
            if given is not None and list(given) != file_names:
                raise ConfigError(f"data.class_names_file: {dcfg.class_names_file} lists classes {file_names}, but "
                                  f"model.text.class_names is set to {list(given)}; leave model.text.class_names "
                                  "out to take the file's list")
            text["class_names"] = file_names
        elif dcfg.kind == "demo" and not text.get("class_names"):
            meta = _demo_classes(dcfg.root)
            text["class_names"] = meta.get("class_names")
            for key in ("class_prompts", "bg_prompts"):
                if text.get(key) is None and meta.get(key) is not None:
                    text[key] = meta[key]
        m["text"] = text
    return model_config_from_dict(m, prefix="model.")


def _get(data: Mapping, dotted: str) -> Any:
    node: Any = data
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def _fit_schedule(cfg: "FullConfig", reference_iters: int, overridden: set) -> None:
    """Scale the schedule lengths to a run shorter than the one they were written for, and warn
    about a schedule that cannot fit the run."""
    t, r = cfg.train, cfg.model.refine
    n = t.max_iters
    if n < reference_iters:
        changes = []
        for key in _SCHEDULE_KEYS:
            if key in overridden:
                continue
            obj, attr = (t, "warmup_iters") if key.startswith("train.") else (r, "rfm_switch_iter")
            old = getattr(obj, attr)
            new = int(round(old * n / reference_iters))
            new = max(1, new) if old > 0 else 0
            if new != old:
                setattr(obj, attr, new)
                changes.append(f"{key} {old} -> {new}")
        if changes:
            logger.info("train.max_iters=%d is shorter than the %d iterations the config's schedule was written for; "
                        "scaled with it: %s (override them to keep other values)", n, reference_iters,
                        ", ".join(changes))
    if t.warmup_iters >= n:
        logger.warning("train.warmup_iters=%d >= train.max_iters=%d: the learning rate never leaves the warm-up",
                       t.warmup_iters, n)
    elif t.warmup_iters * 10 > n:
        logger.warning("train.warmup_iters=%d is more than a tenth of train.max_iters=%d: the poly decay starts "
                       "far below the warm-up's peak (set train.warmup_iters lower)", t.warmup_iters, n)
    uses_rfm = r.use_rfm and r.use_refinement and not cfg.model.decoder.fully_supervised
    if uses_rfm and r.rfm_switch_iter >= n:
        logger.warning("model.refine.rfm_switch_iter=%d >= train.max_iters=%d: RFM never switches on in this run "
                       "(static refinement only)", r.rfm_switch_iter, n)


def load_train_config(config: Union[FullConfig, Mapping, str, os.PathLike, None] = None,
                      overrides: Sequence[str] = ()) -> FullConfig:
    """Load a training config (YAML path, dict or ``FullConfig``) and apply ``key=value``
    overrides (``train.max_iters=10``, ``model.refine.rfm_switch_iter=5``, ``data.root=...``)."""
    base = _read(config)
    for o in overrides:
        key = o.split("=", 1)[0].strip()
        if "=" in o and key.split(".")[0] not in _SECTIONS:
            raise ConfigError(f"override {o!r}: key must start with one of {[s + '.' for s in _SECTIONS]}")
    data = apply_overrides(base, overrides)
    unknown = sorted(set(data) - set(_SECTIONS))
    if unknown:
        raise ConfigError(f"unknown config key(s): {', '.join(unknown)} (sections are {list(_SECTIONS)})")
    for s in _SECTIONS:
        if data.get(s) is None:
            data[s] = {}
        if not isinstance(data[s], Mapping):
            raise ConfigError(f"{s}: expected a mapping, got {type(data[s]).__name__}")
    train = from_dict(TrainConfig, data["train"], prefix="train.").validate()
    dcfg = from_dict(DataConfig, data["data"], prefix="data.").validate()
    model = _model_config(data["model"], dcfg)
    cfg = FullConfig(model=model, train=train, data=dcfg)
    ref = _get(base, "train.max_iters")
    try:
        reference_iters = int(ref) if ref is not None else TrainConfig.max_iters
    except (TypeError, ValueError):
        reference_iters = train.max_iters
    overridden = {o.split("=", 1)[0].strip() for o in overrides if "=" in o}
    _fit_schedule(cfg, reference_iters, overridden)
    return cfg


def full_config_to_dict(cfg: FullConfig) -> dict:
    """Plain nested dict (YAML/JSON serialisable) of a ``FullConfig``."""
    return {"model": to_dict(cfg.model), "train": to_dict(cfg.train), "data": to_dict(cfg.data)}


def dump_yaml(cfg: FullConfig) -> str:
    """The resolved config as YAML (what ``--print-config`` prints and a run folder keeps)."""
    return yaml.safe_dump(full_config_to_dict(cfg), sort_keys=False, default_flow_style=None)

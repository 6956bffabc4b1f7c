"""WeCLIP training (``weclip_infer.training``): loop, optimiser + schedule, DDP, checkpoints and
exact resume, evaluation, logs and plots. Library first::

    from weclip_infer.training import train
    summary = train("weclip_infer/configs/demo.yaml", overrides=["train.max_iters=100"])

The command line (``python -m weclip_infer.train`` / ``weclip-train``) is a thin layer on top.
"""
from __future__ import annotations

from .config import DataConfig, FullConfig, TrainConfig, full_config_to_dict, load_train_config
from .loop import train
from .schedule import build_optimizer, lr_at
from .state import load_train_state, resolve_checkpoint

__all__ = [
    "train",
    "TrainConfig",
    "DataConfig",
    "FullConfig",
    "load_train_config",
    "full_config_to_dict",
    "lr_at",
    "build_optimizer",
    "load_train_state",
    "resolve_checkpoint",
]

"""Device selection: the one rule every entry point (library, CLIs, training, serving) follows."""
from __future__ import annotations

from typing import Optional, Union

import torch

__all__ = ["select_device"]


def select_device(device: Optional[Union[str, torch.device]] = None, *,
                  local_rank: Optional[int] = None) -> torch.device:
    """The ``torch.device`` to run on.

    ``None`` or ``"auto"``: CUDA when available, else the CPU. Anything else is taken as given
    (``"cpu"``, ``"cuda"``, ``"cuda:1"``, a ``torch.device``); asking for CUDA where it is not
    available raises ``RuntimeError`` instead of silently running on the CPU. ``local_rank``
    (distributed training): a bare ``"cuda"`` (or ``"auto"`` resolving to CUDA) becomes
    ``cuda:<local_rank>``.
    """
    if device is None or str(device).lower() == "auto":
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        dev = torch.device(str(device).lower()) if isinstance(device, str) else torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {str(device)!r} requested but CUDA is not available (use --device cpu)")
        if dev.index is None and local_rank is not None:
            dev = torch.device("cuda", int(local_rank))
    return dev

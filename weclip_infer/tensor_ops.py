"""Small tensor helpers shared by the label and prediction paths."""
from __future__ import annotations

import torch

__all__ = ["channel_argmax"]


def channel_argmax(x: torch.Tensor, dim: int) -> torch.Tensor:
    """``x.argmax(dim)`` (first index on ties), computed over a contiguous last dimension.

    On CPU, ``argmax`` over a non-innermost dimension of a few channels is much slower than
    moving that dimension last first and reducing over contiguous memory.
    """
    return x.movedim(dim, -1).contiguous().argmax(-1)

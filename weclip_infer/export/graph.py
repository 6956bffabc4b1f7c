"""The exported graph: exactly ``WeCLIP.segment`` (normalised ``B×3×H×W`` → ``B×C×(H//p)×(W//p)``).

No copy of the model's logic lives here: ``SegmentationGraph.forward`` calls ``model.segment``.
The CLIP text tower is never part of the graph (text embeddings are only needed for pseudo
labels at training time); if the model still carries it, the graph works on a copy without it.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

__all__ = ["SegmentationGraph", "example_input"]


class SegmentationGraph(nn.Module):
    """Wrap a ``WeCLIP`` for tracing/export: ``forward(x) == model.segment(x)`` in eval mode."""

    def __init__(self, model: nn.Module):
        super().__init__()
        has_text = getattr(model.backbone, "has_text_tower", None)
        if callable(has_text) and has_text():
            model = copy.deepcopy(model)
            model.backbone.drop_text_tower()
        self.model = model.eval()
        self.patch_size = int(model.backbone.patch_size)
        self.num_classes = int(model.num_classes)
        self.train(False)

    def train(self, mode: bool = True) -> "SegmentationGraph":  # always eval (Dropout off)
        return super().train(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.segment(x)


def example_input(model: nn.Module, batch: int = 2, height: int = 224, width: int = 224, seed: int = 0,
                  device=None, dtype=torch.float32) -> torch.Tensor:
    """A deterministic normalised random image batch ``batch×3×height×width`` for ``model``."""
    g = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 256, (batch, 3, height, width), generator=g).float()
    x = (raw - model.pixel_mean.cpu()) / model.pixel_std.cpu()
    return x.to(device=device or model.pixel_mean.device, dtype=dtype)

"""The exported graph: exactly ``WeCLIP.segment`` (normalised ``B×3×H×W`` → ``B×C×(H//p)×(W//p)``).

No copy of the model's logic lives here: ``SegmentationGraph.forward`` calls ``model.segment``.
The graph holds its own copy of the model (in eval mode, on the model's device, without the CLIP
text tower, which only training needs), so building it never changes the caller's model.
"""
from __future__ import annotations

import contextlib
import copy
import warnings
from typing import Iterator

import torch
import torch.nn as nn

__all__ = ["SegmentationGraph", "export_graph", "example_input", "export_warnings_filtered"]


@contextlib.contextmanager
def export_warnings_filtered() -> Iterator[None]:
    """Silence only the notices every export emits and that we handle: the TorchScript/legacy-ONNX
    deprecation notices, and tracer warnings about shapes turned into Python numbers (the exported
    graphs are checked at other sizes than traced, so a baked-in shape fails loudly instead)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.jit\.\w+.* is deprecated")
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=r".*legacy TorchScript-based ONNX export")
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=r"The feature will be removed")
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        yield


class SegmentationGraph(nn.Module):
    """Wrap a copy of a ``WeCLIP`` for tracing/export: ``forward(x) == model.segment(x)`` in eval
    mode. The caller's model keeps its mode, device and parameters."""

    def __init__(self, model: nn.Module):
        super().__init__()
        model = copy.deepcopy(model)
        has_text = getattr(model.backbone, "has_text_tower", None)
        if callable(has_text) and has_text():
            model.backbone.drop_text_tower()
        self.model = model.eval()
        self.patch_size = int(model.backbone.patch_size)
        self.num_classes = int(model.num_classes)
        self.train(False)

    def train(self, mode: bool = True) -> "SegmentationGraph":  # always eval (Dropout off)
        return super().train(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.segment(x)


def export_graph(model: nn.Module, fp16: bool = False) -> SegmentationGraph:
    """The :class:`SegmentationGraph` to export; ``fp16`` (CUDA only) puts its backbone copy in
    half precision (the decoder stays fp32: ``segment`` casts the features with ``.float()``)."""
    graph = SegmentationGraph(model)
    if fp16:
        if model.pixel_mean.device.type != "cuda":
            raise ValueError("fp16 export is only meaningful on CUDA (use --device cuda); CPU exports stay fp32")
        graph.model.backbone.half()  # the graph's own copy: the caller's model stays fp32
    return graph


def example_input(model: nn.Module, batch: int = 2, height: int = 224, width: int = 224, seed: int = 0,
                  device=None, dtype=torch.float32) -> torch.Tensor:
    """A deterministic normalised random image batch ``batch×3×height×width`` for ``model``."""
    g = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 256, (batch, 3, height, width), generator=g).float()
    x = (raw - model.pixel_mean.cpu()) / model.pixel_std.cpu()
    return x.to(device=device or model.pixel_mean.device, dtype=dtype)

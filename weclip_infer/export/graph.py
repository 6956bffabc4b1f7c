"""The exported graph: exactly ``WeCLIP.segment`` (normalised ``B×3×H×W`` → ``B×C×(H//p)×(W//p)``).

No copy of the model's logic lives here: ``SegmentationGraph.forward`` calls ``model.segment``.
The graph holds its own copy of the model (in eval mode, on the model's device, without the CLIP
text tower, which only training needs), so building it never changes the caller's model.
"""
from __future__ import annotations

import contextlib
import copy
import warnings
from typing import Any, Iterator, Optional, Union

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
        warnings.filterwarnings("ignore", category=DeprecationWarning,
                                message=r".*legacy TorchScript-based ONNX export")
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=r"The feature will be removed")
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        yield


class SegmentationGraph(nn.Module):
    """Wrap a copy of a ``WeCLIP`` for tracing/export: ``forward(x) == model.segment(x)`` in eval
    mode. The caller's model keeps its mode, device and parameters."""

    def __init__(self, model: nn.Module):
        super().__init__()
        own: Any = copy.deepcopy(model)  # a WeCLIP, used through its backbone, num_classes and segment
        has_text = getattr(own.backbone, "has_text_tower", None)
        if callable(has_text) and has_text():
            own.backbone.drop_text_tower()
        self.model = own.eval()
        self.patch_size = int(own.backbone.patch_size)
        self.num_classes = int(own.num_classes)
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
                  device: Optional[Union[str, torch.device]] = None, dtype: torch.dtype = torch.float32
                  ) -> torch.Tensor:
    """A deterministic normalised random image batch ``batch×3×height×width`` for ``model``."""
    mean, std = model.pixel_mean, model.pixel_std
    assert isinstance(mean, torch.Tensor) and isinstance(std, torch.Tensor)  # WeCLIP's normalisation buffers
    g = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 256, (batch, 3, height, width), generator=g).float()
    x = (raw - mean.cpu()) / std.cpu()
    return x.to(device=device or mean.device, dtype=dtype)


"""TorchScript export via ``torch.jit.trace``.

Tracing at one size keeps batch, H and W dynamic: the patch grid ``H//p``, the positional-embedding
interpolation and every reshape are recorded as shape arithmetic, not constants (checked by
``check_dynamic`` and, more thoroughly, by ``weclip_infer.export.parity``).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence, Tuple, Union

import torch

from weclip_infer.io_utils import atomic_path

from .graph import SegmentationGraph, example_input, export_graph, export_warnings_filtered

__all__ = ["trace_model", "export_torchscript", "check_dynamic"]


def trace_model(model, trace_size: Tuple[int, int] = (224, 224), batch: int = 2, fp16: bool = False):
    """``torch.jit.trace`` the ``SegmentationGraph`` of ``model`` on its current device.

    ``fp16`` (CUDA only): the CLIP backbone runs in half precision (the decoder always runs in
    fp32 — ``segment`` casts the features with ``.float()``), so the output stays fp32.
    """
    graph = export_graph(model, fp16)
    dev = model.pixel_mean.device
    x = example_input(model, batch, *trace_size, device=dev)
    with export_warnings_filtered(), torch.no_grad():
        traced = torch.jit.trace(graph, (x,), check_trace=False, strict=True)
    return traced


def check_dynamic(traced, model, sizes: Sequence[Tuple[int, int, int]] = ((1, 160, 224),), atol: float = 1e-4) -> None:
    """Run the traced graph at other (batch, H, W) than traced; raise if shapes or values differ."""
    dev = model.pixel_mean.device
    graph = SegmentationGraph(model)
    for b, h, w in sizes:
        x = example_input(model, b, h, w, seed=1, device=dev)
        with torch.inference_mode():
            ref = graph(x)
            out = traced(x)
        p = graph.patch_size
        if tuple(out.shape) != (b, graph.num_classes, h // p, w // p) or tuple(out.shape) != tuple(ref.shape):
            raise RuntimeError(f"traced graph is not dynamic: input {b}×3×{h}×{w} gave {tuple(out.shape)}, "
                               f"eager {tuple(ref.shape)}")
        scale = max(1.0, ref.abs().max().item())
        if (out.float() - ref.float()).abs().max().item() > atol * scale:
            raise RuntimeError(f"traced graph differs from eager at {b}×3×{h}×{w}")


def export_torchscript(model, path: Union[str, os.PathLike], trace_size: Tuple[int, int] = (224, 224),
                       fp16: bool = False, check: bool = True):
    """Trace and save ``model.segment`` to ``path`` (atomically). Returns the traced module."""
    traced = trace_model(model, trace_size, fp16=fp16)
    if check and not fp16:
        h, w = trace_size
        check_dynamic(traced, model, sizes=((1, h + 32, w + 16 + 5),))
    with atomic_path(Path(path)) as tmp, export_warnings_filtered():
        torch.jit.save(traced, str(tmp))
    return traced

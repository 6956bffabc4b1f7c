"""ONNX export with the legacy (TorchScript-based) exporter.

``dynamo=False``, opset 17, dynamic axes batch/height/width. This works because our attention is
written by hand (``in_proj`` → reshape → ``scaled_dot_product_attention`` → ``out_proj``): with
``nn.MultiheadAttention`` the legacy exporter bakes the token count in. Weights are stored inside
the single ``.onnx`` file (protobuf limit 2 GB; ViT-B/16 is ≈ 345 MB).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Tuple, Union

import torch

from weclip_infer.io_utils import atomic_path

from .graph import example_input, export_graph, export_warnings_filtered

__all__ = ["export_onnx", "INPUT_NAME", "OUTPUT_NAME", "DEFAULT_OPSET"]

INPUT_NAME = "images"
OUTPUT_NAME = "logits"
DEFAULT_OPSET = 17
_PROTOBUF_LIMIT = 2 * 1024 ** 3


def export_onnx(model, path: Union[str, os.PathLike], opset: int = DEFAULT_OPSET,
                trace_size: Tuple[int, int] = (224, 224), fp16: bool = False, check: bool = True) -> Path:
    """Export ``model.segment`` to ``path`` (atomically); returns the path.

    ``fp16`` (CUDA only): the backbone weights are stored in half precision; the input stays fp32
    (the graph casts it) and the output is fp32. Run such a model with the CUDA provider.
    """
    graph = export_graph(model, fp16)
    dev = model.pixel_mean.device
    nbytes = sum(p.numel() * p.element_size() for p in graph.parameters())
    if nbytes >= _PROTOBUF_LIMIT * 0.95:
        raise ValueError(f"model weights ({nbytes / 2**30:.2f} GiB) do not fit in one ONNX file (2 GB limit)")
    x = example_input(model, 2, *trace_size, device=dev)
    path = Path(path)
    with atomic_path(path) as tmp, export_warnings_filtered(), torch.no_grad():
        torch.onnx.export(
            graph, (x,), str(tmp), dynamo=False, opset_version=int(opset), do_constant_folding=True,
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch", 2: "height", 3: "width"},
                          OUTPUT_NAME: {0: "batch", 2: "grid_h", 3: "grid_w"}},
        )
        if check:
            import onnx

            onnx.checker.check_model(str(tmp))
    return path

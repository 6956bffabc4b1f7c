"""Export of ``WeCLIP.segment`` to TorchScript and ONNX, with parity checks and a bundle manifest.

``write_bundle(model, out)`` / ``export_checkpoint(ckpt_dir, out)`` write ``model.ts.pt``,
``model.onnx`` and ``manifest.json``; ``weclip_infer.bundle.load_bundle_backend`` reads them.
CLI: ``weclip-export`` / ``python -m weclip_infer.export``.
"""
from __future__ import annotations

from .bundle_writer import BUNDLE_FORMAT, FILES, export_checkpoint, write_bundle
from .graph import SegmentationGraph, example_input
from .onnx_export import export_onnx
from .parity import ParityError, check_parity
from .torchscript import export_torchscript, trace_model

__all__ = ["BUNDLE_FORMAT", "FILES", "SegmentationGraph", "example_input", "export_onnx", "export_torchscript",
           "trace_model", "check_parity", "ParityError", "write_bundle", "export_checkpoint"]

"""``weclip-export CHECKPOINT_DIR --out BUNDLE_DIR``: TorchScript + ONNX bundle with a parity report.

fp32 is the default and the only precision for CPU exports. ``--fp16`` (needs ``--device cuda``)
stores the CLIP backbone in half precision; the decoder and the logits stay fp32; parity is then
checked with looser fp16 tolerances and the ONNX model needs onnxruntime-gpu to run.
"""
from __future__ import annotations

import argparse
import sys


def _size(s: str):
    h, _, w = s.lower().partition("x")
    return int(h), int(w or h)


def _cases(s: str):
    """``"2x320x320,384x512"`` → ``[(2,320,320), (1,384,512)]``."""
    out = []
    for item in s.split(","):
        parts = [int(p) for p in item.lower().split("x") if p]
        if len(parts) == 1:
            parts = [1, parts[0], parts[0]]
        elif len(parts) == 2:
            parts = [1, *parts]
        if len(parts) != 3:
            raise argparse.ArgumentTypeError(f"bad parity size {item!r} (use HxW or BxHxW)")
        out.append(tuple(parts))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="weclip-export", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="our checkpoint directory (config.json + model.safetensors)")
    ap.add_argument("--out", required=True, help="bundle directory to write")
    ap.add_argument("--formats", default="torchscript,onnx", help="comma list of torchscript, onnx")
    ap.add_argument("--opset", type=int, default=17, help="ONNX opset (legacy exporter; default 17)")
    ap.add_argument("--device", default="cpu", help="export/trace device (cpu or cuda)")
    ap.add_argument("--fp16", action="store_true", help="half-precision backbone (CUDA only)")
    ap.add_argument("--clip", default=None, help="override the checkpoint's CLIP weights source")
    ap.add_argument("--trace-size", type=_size, default=(224, 224), help="HxW of the trace example (default 224x224)")
    ap.add_argument("--parity-sizes", type=_cases, default=None,
                    help="comma list of BxHxW or HxW (default 2x320x320,384x512,512x512)")
    ap.add_argument("--triton", default=None, metavar="DIR",
                    help="also write a Triton model repository entry DIR/<name>/ (config.pbtxt + 1/model.onnx)")
    ap.add_argument("--triton-name", default="weclip", help="model name in the Triton repository (default weclip)")
    a = ap.parse_args(argv)
    try:
        from .bundle_writer import export_checkpoint, parse_formats
        from .parity import DEFAULT_CASES

        formats = parse_formats(a.formats)
        if a.triton:
            from pathlib import Path

            if "onnx" not in formats:
                raise ValueError("--triton needs the onnx format (--formats ...,onnx)")
            if (Path(a.triton) / a.triton_name).exists():  # fail before the (long) export
                raise FileExistsError(f"{Path(a.triton) / a.triton_name} exists; remove it or use --triton-name")
        if a.fp16 and not str(a.device).startswith("cuda"):
            raise ValueError("--fp16 is only meaningful with --device cuda (CPU exports are fp32)")
        man = export_checkpoint(a.checkpoint, a.out, device=a.device, clip_weights=a.clip, formats=formats,
                                opset=a.opset, fp16=a.fp16, trace_size=a.trace_size,
                                parity_cases=a.parity_sizes or DEFAULT_CASES)
        if a.triton:
            from .triton import write_triton_repository

            triton_dir = write_triton_repository(a.out, a.triton, a.triton_name)
    except Exception as e:  # noqa: BLE001
        print(f"weclip-export: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    for name in formats:
        r = man["parity"].get(name, {})
        print(f"{name}: max|Δ| {r.get('max_abs', float('nan')):.3g}, argmax agreement {r.get('min_agreement', 0):.4%}")
    print(f"wrote {a.out} ({', '.join(f['path'] for f in man['files'].values())}, manifest.json)")
    if a.triton:
        print(f"wrote Triton model {triton_dir} (config.pbtxt, 1/model.onnx)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

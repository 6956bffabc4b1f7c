"""Numerical parity of the exported graphs with the eager model.

For each case ``(batch, H, W)`` the same normalised random input goes through the eager
``model.segment``, the TorchScript module and the ONNX Runtime session; we report the max abs
difference of the logits and the argmax agreement on the patch grid.

Threshold (fp32): ``max_abs <= rel_tol * max(1, max|eager logits|)`` with ``rel_tol = 1e-4``.
Exported graphs compute the same fp32 operations in a different order (ORT fuses LayerNorm,
GELU and attention; MatMul blocking differs), which for 12 pre-LN ViT blocks + the decoder gives
differences of ~1e-6–1e-5 relative to the logit magnitude (measured: see the manifest). 1e-4 is
>10× that headroom, while any real export fault (a baked-in shape, a wrong op, a missing
interpolation) gives errors of the order of the logits themselves. Scaling by ``max(1, ·)`` keeps
the bound meaningful for both tiny random logits and large trained ones.

Argmax agreement must be ≥ 99.9 %. A pixel whose two best eager logits are within the allowed
abs error of each other is a tie at fp32 precision, so either class counts as agreeing
(``agreement``); the raw exact-match fraction is reported as well (``agreement_raw``).
fp16 (CUDA) exports are checked with ``rel_tol = 1e-2`` and ≥ 99 % agreement.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

import torch

from weclip_infer.bundle import onnx_runner

from .graph import SegmentationGraph, example_input, export_warnings_filtered

__all__ = ["ParityError", "check_parity", "compare_logits", "FP32_REL_TOL", "MIN_AGREEMENT",
           "DEFAULT_CASES"]

FP32_REL_TOL = 1e-4
FP16_REL_TOL = 1e-2
MIN_AGREEMENT = 0.999
FP16_MIN_AGREEMENT = 0.99
DEFAULT_CASES: Tuple[Tuple[int, int, int], ...] = ((2, 320, 320), (1, 384, 512), (1, 512, 512))


class ParityError(RuntimeError):
    """An exported graph does not reproduce the eager model within tolerance."""


def compare_logits(ref: torch.Tensor, out: torch.Tensor, rel_tol: float) -> dict:
    """Max abs diff, tolerance and argmax agreement of ``out`` against ``ref`` (both ``B×C×h×w``)."""
    ref = ref.detach().float().cpu()
    out = out.detach().float().cpu()
    if ref.shape != out.shape:
        return {"shape": list(out.shape), "expected_shape": list(ref.shape), "max_abs": float("inf"),
                "tolerance": 0.0, "agreement": 0.0, "agreement_raw": 0.0, "ok": False}
    scale = max(1.0, ref.abs().max().item())
    tol = rel_tol * scale
    max_abs = (out - ref).abs().max().item() if ref.numel() else 0.0
    a_ref, a_out = ref.argmax(1), out.argmax(1)
    equal = a_ref == a_out
    top2 = ref.topk(2, dim=1).values if ref.shape[1] > 1 else torch.cat([ref, ref - 1e9], 1)
    tie = (top2[:, 0] - top2[:, 1]) <= 2 * tol
    n = max(equal.numel(), 1)
    agree = (equal | tie).sum().item() / n
    return {"shape": list(out.shape), "max_abs": float(max_abs), "logit_scale": float(scale),
            "tolerance": float(tol), "rel_max_abs": float(max_abs / scale),
            "agreement": float(agree), "agreement_raw": float(equal.sum().item() / n)}


def check_parity(model, torchscript=None, onnx_path=None, cases: Sequence[Tuple[int, int, int]] = DEFAULT_CASES,
                 rel_tol: Optional[float] = None, min_agreement: Optional[float] = None, fp16: bool = False,
                 onnx_device: Union[str, torch.device] = "cpu", seed: int = 0, raise_on_failure: bool = True) -> dict:
    """Compare eager vs TorchScript (a module or path) vs ONNX Runtime (a path) on ``cases``.

    ``onnx_device``: where the ONNX Runtime session runs (``"cpu"`` by default, whatever the
    model's device). Returns a JSON-serialisable report; raises ``ParityError`` (after building the whole report)
    when any backend exceeds the tolerance or falls below the agreement threshold.
    """
    rel_tol = float(rel_tol if rel_tol is not None else (FP16_REL_TOL if fp16 else FP32_REL_TOL))
    min_agreement = float(min_agreement if min_agreement is not None
                          else (FP16_MIN_AGREEMENT if fp16 else MIN_AGREEMENT))
    dev = model.pixel_mean.device
    graph = SegmentationGraph(model)
    backends: Dict[str, Callable] = {}
    if torchscript is not None:
        ts = torchscript
        if isinstance(torchscript, (str, os.PathLike)):
            with export_warnings_filtered():
                ts = torch.jit.load(str(torchscript), map_location=dev)
        backends["torchscript"] = ts
    if onnx_path is not None:
        backends["onnx"] = onnx_runner(onnx_path, onnx_device)
    report: Dict[str, Any] = {
        "rel_tol": rel_tol, "min_agreement": min_agreement, "precision": "fp16" if fp16 else "fp32",
        "rule": "max_abs <= rel_tol * max(1, max|eager logits|) and argmax agreement >= min_agreement "
                "(ties within 2*tolerance count as agreeing)",
        "cases": [], "ok": True}
    failures: list[str] = []
    for i, (b, h, w) in enumerate(cases):
        x = example_input(model, b, h, w, seed=seed + i, device=dev)
        with torch.inference_mode():
            ref = graph(x).float()
        case: Dict[str, Any] = {"input": [int(b), 3, int(h), int(w)], "output": list(ref.shape), "backends": {}}
        for name, fn in backends.items():
            with torch.inference_mode():
                out = fn(x)
            r = compare_logits(ref, out, rel_tol)
            r["ok"] = bool(r["max_abs"] <= r["tolerance"] and r["agreement"] >= min_agreement)
            case["backends"][name] = r
            if not r["ok"]:
                failures.append(f"{name} @ {b}×3×{h}×{w}: max_abs={r['max_abs']:.3g} (tol {r['tolerance']:.3g}), "
                                f"agreement={r['agreement']:.4%} (min {min_agreement:.2%})")
        report["cases"].append(case)
    for name in backends:
        rows = [c["backends"][name] for c in report["cases"]]
        report[name] = {"max_abs": max(r["max_abs"] for r in rows), "min_agreement": min(r["agreement"] for r in rows),
                        "max_rel": max(r.get("rel_max_abs", float("inf")) for r in rows),
                        "ok": all(r["ok"] for r in rows)}
    report["ok"] = not failures
    if failures:
        report["failures"] = failures
        if raise_on_failure:
            err = ParityError("exported graph does not match the eager model: " + "; ".join(failures))
            err.report = report  # type: ignore[attr-defined]
            raise err
    return report

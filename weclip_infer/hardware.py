"""What the processor offers, and which compute path each stage should take on it.

On x86 CPUs with AVX-512, ONNX Runtime's MLAS kernels run fp32 matrix products about twice as
fast as PyTorch's eager fp32 path, and AVX512_BF16 / AMX make bf16 products faster still; on
AVX2-only CPUs eager PyTorch and ONNX Runtime are on par. :func:`cpu_features` reads the
instruction-set extensions once, :func:`inference_path` turns them into a choice with a reason
that callers log, and :func:`matmul_peaks` measures the peak of each path on the current machine
(the benchmarks report every stage as a fraction of it).
"""
from __future__ import annotations

import contextlib
import functools
import logging
import platform
import threading
import time
from dataclasses import dataclass, field
from typing import Dict, FrozenSet, Iterator, Optional, Tuple

__all__ = ["CpuFeatures", "cpu_features", "inference_path", "matmul_peaks", "fast_fp32_matmul_available",
           "frozen_clip_arithmetic"]

log = logging.getLogger(__name__)

_INTERESTING = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "amx_tile",
                "amx_bf16", "amx_int8", "asimd", "sve", "bf16")


@dataclass(frozen=True)
class CpuFeatures:
    """The processor model and the instruction-set extensions that matter for our kernels."""

    model: str
    arch: str
    flags: FrozenSet[str] = field(default_factory=frozenset)

    @property
    def isa(self) -> str:
        """The best level: ``amx`` > ``avx512_bf16`` > ``avx512`` > ``avx2`` > ``baseline``."""
        f = self.flags
        if {"amx_tile", "amx_bf16"} <= f:
            return "amx"
        if "avx512_bf16" in f:
            return "avx512_bf16"
        if "avx512f" in f:
            return "avx512"
        if "avx2" in f:
            return "avx2"
        return "baseline"

    @property
    def fast_bf16(self) -> bool:
        """bf16 matrix products run natively (AVX512_BF16 or AMX)."""
        return self.isa in ("amx", "avx512_bf16")

    def as_dict(self) -> Dict[str, object]:
        return {"model": self.model, "arch": self.arch, "isa": self.isa, "flags": sorted(self.flags)}


def _parse_cpuinfo(text: str) -> Tuple[str, FrozenSet[str]]:
    model, flags = "", set[str]()

    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "cpu model", "hardware") and not model:
            model = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = set(value.split())
    return model, frozenset(f for f in flags if f in _INTERESTING)


@functools.lru_cache(maxsize=1)
def cpu_features() -> CpuFeatures:
    """This machine's processor (read from ``/proc/cpuinfo`` on Linux; empty flags elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            model, flags = _parse_cpuinfo(f.read())
    except OSError:
        model, flags = platform.processor(), frozenset()
    return CpuFeatures(model or platform.processor() or "unknown", platform.machine(), flags)


def _ort_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def inference_path(device: str = "cpu", features: Optional[CpuFeatures] = None,
                   ort_available: Optional[bool] = None, precision: str = "fp32") -> Tuple[str, str]:
    """``(backend, reason)`` for running a checkpoint's network on ``device`` at ``precision``.

    ``onnx`` (ONNX Runtime on a cached export) for fp32 on CPUs with AVX-512, where its fp32
    kernels are about twice as fast as eager PyTorch; ``eager`` for bf16 (the exported graphs
    are fp32), on CUDA, and on AVX2-only CPUs, where the two tie and eager avoids the one-time
    export.
    """
    if precision != "fp32":
        return "eager", f"{precision} inference: eager PyTorch (the exported graphs are fp32)"
    if str(device).startswith("cuda"):
        return "eager", "CUDA device: eager PyTorch"
    feats = features or cpu_features()
    ort = _ort_available() if ort_available is None else ort_available
    if feats.isa in ("avx512", "avx512_bf16", "amx"):
        if ort:
            return "onnx", f"CPU with {feats.isa.upper()}: ONNX Runtime (its fp32 kernels outrun eager PyTorch here)"
        return "eager", f"CPU with {feats.isa.upper()}, but onnxruntime is not installed: eager PyTorch"
    return "eager", f"CPU with {feats.isa.upper()}: eager PyTorch (ONNX Runtime is not faster here)"


def _gflops(fn, flop: float, min_time: float = 0.3) -> float:
    fn()  # warm-up
    n, t0 = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        dt = time.perf_counter() - t0
        if dt >= min_time and n >= 3:
            return flop * n / dt / 1e9


def matmul_peaks(m: int = 1604, k: int = 768, n: int = 3072, min_time: float = 0.3) -> Dict[str, float]:
    """Same-run GFLOP/s of an ``m×k @ k×n`` product on each CPU path (the ViT-B/16 MLP shape at
    400 tokens × 4 images): ``torch_fp32``, ``torch_bf16``, ``torch_fp32_bf16_flag`` (fp32 tensors
    with oneDNN's bf16 matmul precision) and ``ort_fp32`` (when onnxruntime is installed)."""
    import numpy as np
    import torch

    flop = 2.0 * m * k * n
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(m, k, generator=g), torch.randn(k, n, generator=g)
    out: Dict[str, float] = {"torch_fp32": _gflops(lambda: torch.mm(a, b), flop, min_time)}
    ab, bb = a.bfloat16(), b.bfloat16()
    out["torch_bf16"] = _gflops(lambda: torch.mm(ab, bb), flop, min_time)
    prec = getattr(torch.backends.mkldnn, "matmul", None)
    if prec is not None and hasattr(prec, "fp32_precision"):
        old = prec.fp32_precision
        try:
            prec.fp32_precision = "bf16"
            out["torch_fp32_bf16_flag"] = _gflops(lambda: torch.mm(a, b), flop, min_time)
        finally:
            prec.fp32_precision = old
    if _ort_available():
        import onnxruntime as ort
        from onnx import TensorProto, helper

        graph = helper.make_graph([helper.make_node("MatMul", ["A", "B"], ["C"])], "mm",
                                  [helper.make_tensor_value_info("A", TensorProto.FLOAT, [m, k]),
                                   helper.make_tensor_value_info("B", TensorProto.FLOAT, [k, n])],
                                  [helper.make_tensor_value_info("C", TensorProto.FLOAT, [m, n])])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        so = ort.SessionOptions()
        so.intra_op_num_threads = max(1, torch.get_num_threads())
        sess = ort.InferenceSession(model.SerializeToString(),
                                    so, providers=["CPUExecutionProvider"])
        feeds = {"A": a.numpy(), "B": np.ascontiguousarray(b.numpy())}
        out["ort_fp32"] = _gflops(lambda: sess.run(None, feeds), flop, min_time)
    return out


def _matmul_precision_flag():
    import torch

    mk = getattr(torch.backends, "mkldnn", None)
    prec = getattr(mk, "matmul", None)
    if mk is None or not mk.is_available() or prec is None or not hasattr(prec, "fp32_precision"):
        return None
    return prec


# oneDNN's matmul precision is one process-wide setting, while fp32_matmul may be entered from
# several threads at once (a server answering requests in parallel): the first entrant saves and
# sets it, the last one to leave puts the saved value back.
_FLAG_LOCK = threading.Lock()
_flag_users = 0
_flag_saved: Optional[str] = None


@functools.lru_cache(maxsize=1)
def fast_fp32_matmul_available() -> Tuple[bool, str]:
    """Whether oneDNN's fp32 matmul with ``fp32_precision="bf16"`` keeps fp32 accuracy here.

    On CPUs with native bf16, oneDNN then computes fp32 products from split bf16 parts, about twice
    as fast as the default fp32 kernels with an error of the same order as fp32 rounding. Where the
    setting would fall back to plain bf16 (an error ~1e4 times larger) it is not used: a product
    is checked against float64 once per process.
    """
    import torch

    prec = _matmul_precision_flag()
    if prec is None:
        return False, "oneDNN matmul precision control unavailable"
    if not cpu_features().fast_bf16:
        return False, f"no native bf16 on this CPU ({cpu_features().isa})"
    g = torch.Generator().manual_seed(0)
    a = torch.randn(256, 768, generator=g, dtype=torch.float64)
    b = torch.randn(768, 256, generator=g, dtype=torch.float64)

    ref = a @ b
    with _FLAG_LOCK:  # not while fp32_matmul is being entered or left in another thread
        old = prec.fp32_precision
        try:
            prec.fp32_precision = "bf16"
            got = torch.mm(a.float(), b.float()).double()
        finally:
            prec.fp32_precision = old
    rel = float((got - ref).abs().max() / ref.abs().max())
    if rel > 1e-5:
        return False, f"oneDNN bf16 matmul is plain bf16 here (relative error {rel:.1e})"
    return True, f"oneDNN split-bf16 fp32 matmul (relative error {rel:.1e} vs float64)"


@contextlib.contextmanager
def fp32_matmul(device_type: str) -> Iterator[str]:
    """Context for fp32 work: on CPU, oneDNN's fp32-accurate fast matmul where
    :func:`fast_fp32_matmul_available` says so, else the default kernels. Yields the path used
    and restores the global setting when the last thread inside leaves. The training step
    (forward, backward, optimiser) runs in it.
    """
    global _flag_users, _flag_saved
    if device_type != "cpu" or not fast_fp32_matmul_available()[0]:
        yield "fp32"
        return
    prec = _matmul_precision_flag()
    with _FLAG_LOCK:
        if _flag_users == 0:
            _flag_saved = prec.fp32_precision
            prec.fp32_precision = "bf16"
        _flag_users += 1
    try:
        yield "fp32 (oneDNN split-bf16)"
    finally:
        with _FLAG_LOCK:
            _flag_users -= 1
            if _flag_users == 0:
                prec.fp32_precision = _flag_saved


@contextlib.contextmanager
def frozen_clip_arithmetic(precision: str, device_type: str) -> Iterator[str]:
    """Context for running the frozen CLIP blocks: yields the path used, restores global state.

    ``bf16``: bfloat16 autocast. ``fp32``: :func:`fp32_matmul`.
    """
    import torch

    if precision == "bf16":
        with torch.autocast(device_type=device_type, dtype=torch.bfloat16):
            yield "bf16 autocast"
        return
    with fp32_matmul(device_type) as path:
        yield path

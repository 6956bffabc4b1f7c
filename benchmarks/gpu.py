"""GPU checks and figures: one prepared, time-boxed run on a CUDA machine.

What it measures (random full-size ViT-B/16, VOC classes; every check is recorded, a failing one
as ``{"error": ...}``, one the time budget leaves no room for as ``{"skipped": ...}``):

* ``env``: GPU, driver, torch / CUDA / cuDNN / ONNX Runtime versions and providers, TF32 flags.
* ``serve_fp32``, ``serve_bf16``: serving images/s at 512×384 (512 long side), scales
  {1, 0.75} + flip, no CRF, with ``precision`` fp32 and bf16 (bf16 autocast on CUDA):
  (a) ``sequential``: one ``Segmenter.predict`` at a time; (b) ``network_batch``: B = 1, 4, 8,
  16 same-size requests per round through ``BatchedNetwork.run`` (the serving layer's batch
  path: each request keeps its own ``predict``, their network passes run as one call per scale);
  (c) ``threads``: 1, 4, 8 Python threads calling one ``Segmenter`` concurrently; and
  ``service_batch8``: ``SegmentationService.handle`` on 8 JPEG requests (decode, predict,
  PNG encode). fp32 also once with TF32 on (``sequential_tf32``); the TF32 flags in force are
  recorded with every figure.
* ``bf16_weights``: bf16 serving (one at a time, and a batch of 16) with the frozen CLIP's
  ready bf16 weights against autocast's cast at every call, alternated; label maps compared.
* ``crf_torch``: ``dense_crf_torch`` on the GPU: ms per image at 375×500 and 384×512 (H×W),
  21 and 9 labels, batches of 1 and 8 images (first call of a size: lattice cache cleared).
* ``serve_crf_torch``: serving images/s with ``crf=True, crf_backend="torch"``.
* ``train_profile_fp32``, ``train_profile_bf16``: one training step split into stages
  (``model.timings`` with ``{"_sync": True}``: CLIP, decoder, GradCAM, refinement, PAR, loss;
  then backward and the AdamW step), for ``backbone.precision`` fp32 and bf16; and per stage, from
  ``torch.profiler`` on an unsynchronised step, the host time and the device-kernel count and
  time, so launch-bound stages (host time ≫ kernel time) are visible.
* ``train_fp32`` (``--iters``, default 500), ``train_bf16_backbone`` (200), ``train_amp_fp16``
  (``--amp-iters``): forward (GradCAM, RFM, PAR, decoder, losses) + backward + AdamW at batch 4,
  320², 1–3 classes per image, timed end to end with one sync; projected to 30k iterations.
* ``onnx_cuda``: where ``onnxruntime`` offers ``CUDAExecutionProvider``: the model exported with
  ``write_bundle``, run by ``Segmenter.from_pretrained(bundle, backend="onnx", device="cuda")``,
  logits compared with eager torch on CUDA and images/s; elsewhere the reason it was skipped.
* ``parity_cpu_vs_cuda``: CPU vs CUDA training forward (TF32 off): seg logits, CAMs, labels.
* ``train_cli_cuda``: the real training CLI for a few iterations on a generated demo world.

Results go to ``$OUT/gpu-<UTC time>.json`` and ``.md`` (``--out``; default ``$OUT``, else
``benchmarks/results``), rewritten after every check so that a run cut short keeps what it
measured. ``--budget-s`` (default 420) bounds the run: measuring loops stop early when it runs
out and later checks are skipped.

On the lent GPU machine (no network; its own ``python3`` with torch 2.11, without open_clip_torch
and ftfy), two steps:

1. here: ``bash scripts/gpu_wheels.sh`` (downloads open_clip_torch, ftfy and wcwidth wheels into
   the git-ignored ``.whl/``);
2. one device ``run`` of ``bash scripts/gpu_check.sh`` with ``carry [".whl"]`` and
   ``timeout_s`` about 560: it installs the wheels to ``/tmp/site``, prints the GPU and torch
   versions and runs this script with ``--budget-s 420 --out $OUT`` under ``timeout``.

``python benchmarks/gpu.py --smoke-cpu [--out DIR]`` runs every check on the CPU with a tiny
model and tiny counts (no figures; checks the script itself, see tests/test_gpu_script.py).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from weclip_infer.io_utils import atomic_write_bytes

REPO = Path(__file__).resolve().parents[1]
FULL_CFG: Dict[str, Any] = {"backbone": {"clip_weights": "random", "seed": 0}, "text": {"dataset": "voc"}}
ORT_SKIP = "onnxruntime-gpu not installed on the device (its wheel exceeds the 64 MiB carry limit)"


# ---- plan and budget ---------------------------------------------------------------------------------
@dataclass
class Plan:
    """Sizes and counts of every check: the GPU run's, or tiny ones for ``--smoke-cpu``."""

    device: str = "cuda"
    model_cfg: Dict[str, Any] = field(default_factory=lambda: copy.deepcopy(FULL_CFG))
    serve_hw: Tuple[int, int] = (384, 512)  # H×W: 512×384 images, 512 long side
    long_side: int = 512
    warmup: int = 5
    serve_images: int = 100  # sequential images per figure (capped by time)
    net_batches: Tuple[int, ...] = (1, 4, 8, 16)
    batch_images: int = 64  # images per network-batch figure
    threads: Tuple[int, ...] = (1, 4, 8)
    thread_images: int = 64
    service_batch: int = 8
    service_rounds: int = 6
    crf_sizes: Tuple[Tuple[int, int], ...] = ((375, 500), (384, 512))
    crf_labels: Tuple[int, ...] = (21, 9)
    crf_batches: Tuple[int, ...] = (1, 8)
    crf_repeats: int = 5
    serve_crf_images: int = 30
    train_hw: int = 320
    train_batch: int = 4
    train_warmup: int = 10
    train_iters: int = 500
    train_bf16_iters: int = 200
    amp_iters: int = 200
    profile_steps: int = 5
    onnx_images: int = 50
    cli_iters: int = 40
    cli_world: Tuple[int, int] = (64, 16)
    section_cap_s: float = 30.0  # longest a single measuring loop may run
    par_compile: bool = True  # par_variants also times torch.compile (minutes of C++ compile on a CPU)


def smoke_plan() -> Plan:
    """Every check on the CPU with the tiny model, small images and counts of one or two."""
    from weclip_infer.testing import tiny_config

    return Plan(device="cpu", model_cfg=tiny_config(), serve_hw=(48, 64), long_side=64, warmup=1, serve_images=2,
                net_batches=(1, 2), batch_images=2, threads=(1, 2), thread_images=2, service_batch=2,
                service_rounds=1, crf_sizes=((24, 32),), crf_labels=(4, 3), crf_batches=(1, 2), crf_repeats=1,
                serve_crf_images=1, train_hw=64, train_batch=2, train_warmup=1, train_iters=1, train_bf16_iters=1,
                amp_iters=1, profile_steps=1, onnx_images=1, cli_iters=4, cli_world=(8, 4), section_cap_s=10.0,
                par_compile=False)


class Budget:
    """Seconds left of the whole run (``--budget-s``); measuring loops take ``cap()`` at most."""

    def __init__(self, seconds: float, section_cap_s: float):
        self.t0 = time.perf_counter()
        self.seconds = float(seconds)
        self.section_cap_s = section_cap_s

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.t0)

    def cap(self) -> float:
        """Time one measuring loop may take: the section cap, less when the budget is nearly spent."""
        return max(0.5, min(self.section_cap_s, self.left() / 2))


def _sync(device: str) -> Callable[[], None]:
    return torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)


def _timed(fn: Callable[[int], Any], n: int, cap_s: float, sync: Callable[[], None]) -> Tuple[int, float]:
    """Call ``fn(i)`` for ``i < n``, stopping early once ``cap_s`` seconds have passed; returns
    (calls made, seconds until the device finished them)."""
    sync()
    t0 = time.perf_counter()
    k = 0
    while k < n:
        fn(k)
        k += 1
        if time.perf_counter() - t0 > cap_s:
            break
    sync()
    return k, time.perf_counter() - t0


def _rate(n: int, dt: float, unit: str = "images") -> Dict[str, float]:
    return {unit: n, "seconds": dt, f"{unit}_per_s": n / dt if dt > 0 else float("nan"),
            "ms_per_" + unit.rstrip("s"): 1000 * dt / n if n else float("nan")}


# ---- shared inputs and models --------------------------------------------------------------------------
_MODELS: Dict[str, Any] = {}


def _serve_model(plan: Plan):
    """The eval model shared by the serving, CRF-serving and ONNX checks (built once)."""
    if "serve" not in _MODELS:
        from weclip_infer import build_model

        torch.manual_seed(0)
        _MODELS["serve"] = build_model(plan.model_cfg, device=plan.device).eval()
    return _MODELS["serve"]


def _train_model(plan: Plan, precision: str):
    """The training model shared by the training checks, switched to ``backbone.precision``."""
    if "train" not in _MODELS:
        from weclip_infer import build_model

        torch.manual_seed(0)
        _MODELS["train"] = build_model(plan.model_cfg, device=plan.device)
    model = _MODELS["train"]
    model.cfg.backbone.precision = precision
    model.iter_num = 0
    model.train()
    return model


def _free_models() -> None:
    _MODELS.clear()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _photos(hw: Tuple[int, int], n: int) -> List[np.ndarray]:
    """``n`` distinct photo-like ``H×W×3`` uint8 pictures (sky, hills, a ball; shifted copies):
    smooth regions and edges, so the CRF lattice is that of a photo, not of noise."""
    from weclip_infer.quickstart import _photo_like

    base = _photo_like(*hw)
    return [np.ascontiguousarray(np.roll(base, 37 * k, axis=1)) for k in range(n)]


def _probs(hw: Tuple[int, int], labels: int, seed: int, device: str) -> torch.Tensor:
    """Smooth ``C×H×W`` class probabilities (softmax of upsampled coarse random logits)."""
    g = torch.Generator().manual_seed(seed)
    h, w = hw
    coarse = 3 * torch.randn(1, labels, max(1, h // 16), max(1, w // 16), generator=g)
    up = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)[0]
    return torch.softmax(up, 0).to(device)


def tf32_state() -> Dict[str, Any]:
    """The TF32 switches as torch reports them (read-only; an unreadable one is given as text: torch
    refuses the global ``get_float32_matmul_precision`` once any backend's new-style
    ``fp32_precision`` was set, which the library's CPU ``fp32_matmul`` does on CPUs with bf16)."""
    out: Dict[str, Any] = {}
    for key, get in (("matmul_allow_tf32", lambda: torch.backends.cuda.matmul.allow_tf32),
                     ("cudnn_allow_tf32", lambda: torch.backends.cudnn.allow_tf32),
                     ("float32_matmul_precision", torch.get_float32_matmul_precision),
                     # the per-backend settings (torch >= 2.9); absent ones read as None
                     ("cuda_matmul_fp32_precision", lambda: getattr(torch.backends.cuda.matmul, "fp32_precision",
                                                                    None)),
                     ("cudnn_conv_fp32_precision", lambda: getattr(getattr(torch.backends.cudnn, "conv", None),
                                                                   "fp32_precision", None))):
        try:
            out[key] = get()
        except Exception as e:  # noqa: BLE001 - recorded, not fatal
            out[key] = f"unreadable: {type(e).__name__}: {e}"
    return out


@contextlib.contextmanager
def tf32(enabled: bool) -> Iterator[None]:
    """TF32 for CUDA matmuls and convolutions on or off inside the block (legacy flags, the ones
    the library and torch 2.11 use), restored afterwards."""
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


# ---- checks ----------------------------------------------------------------------------------------------
def env_info(plan: Plan, budget: Budget) -> dict:
    """Machine and library versions, and the TF32 flags at start."""
    out: Dict[str, Any] = {"device": plan.device, "torch": torch.__version__, "cuda": torch.version.cuda,
                           "python": platform.python_version(), "cpus": os.cpu_count(),
                           "torch_threads": torch.get_num_threads(), "tf32": tf32_state()}
    if torch.device(plan.device).type == "cuda":
        p = torch.cuda.get_device_properties(0)
        out.update(gpu=torch.cuda.get_device_name(0), multiprocessors=p.multi_processor_count,
                   gpu_memory_gib=p.total_memory / 2 ** 30, cudnn=torch.backends.cudnn.version(),
                   capability=list(torch.cuda.get_device_capability(0)))
    try:
        q = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                            "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
        out["nvidia_smi"] = q.stdout.strip() or q.stderr.strip()
        out["driver"] = q.stdout.split(",")[1].strip() if q.returncode == 0 and "," in q.stdout else None
    except (OSError, subprocess.SubprocessError) as e:
        out["nvidia_smi"], out["driver"] = f"unavailable: {e}", None
    try:
        import onnxruntime as ort

        out["onnxruntime"] = ort.__version__
        out["onnxruntime_providers"] = ort.get_available_providers()
    except Exception as e:  # noqa: BLE001 - optional
        out["onnxruntime"] = f"not importable: {type(e).__name__}: {e}"
    try:
        import open_clip

        out["open_clip"] = getattr(open_clip, "__version__", "?")
    except Exception as e:  # noqa: BLE001
        out["open_clip"] = f"not importable: {type(e).__name__}: {e}"
    return out


def serve_throughput(plan: Plan, budget: Budget, precision: str) -> dict:
    """Images/s of ``Segmenter`` serving: sequential, network batches, threads, the service."""
    from weclip_infer import Segmenter
    from weclip_infer.serving.batching import BatchedNetwork

    model = _serve_model(plan)
    sync = _sync(plan.device)
    opts = dict(scales=(1.0, 0.75), flip=True, crf=False, long_side=plan.long_side, precision=precision)
    seg = Segmenter(model, **opts)
    imgs = _photos(plan.serve_hw, 8)
    out: Dict[str, Any] = {"precision": precision, "hw": list(plan.serve_hw), "scales": [1.0, 0.75], "flip": True,
                           "crf": False, "tf32": tf32_state()}
    for i in range(plan.warmup):
        seg.predict(imgs[i % 8])
    last: Dict[str, Any] = {}

    def one(i: int) -> None:
        last["r"] = seg.predict(imgs[i % 8])

    n, dt = _timed(one, plan.serve_images, budget.cap(), sync)
    out["sequential"] = {**_rate(n, dt), "last_timings": last["r"].timings}
    if precision == "fp32":  # (TF32 flags change nothing on the CPU: there it only runs the code)
        with tf32(True):
            seg.predict(imgs[0])
            n, dt = _timed(one, plan.serve_images, budget.cap(), sync)
            out["sequential_tf32"] = {**_rate(n, dt), "tf32": tf32_state()}

    # (b) B same-size requests per round, their network passes batched (a flipped copy is a row)
    rows_per_image = 2
    batches: Dict[str, Any] = {}
    for B in plan.net_batches:
        seg_b = Segmenter(model, **opts)
        net = BatchedNetwork(seg_b.backend, max_rows=rows_per_image * B)
        seg_b.backend = net
        tasks = [(lambda k=k, s=seg_b: s.predict(imgs[k % 8])) for k in range(B)]

        def round_(_: int, tasks=tasks, net=net) -> None:
            for r in net.run(tasks):
                if isinstance(r, BaseException):
                    raise r

        round_(0)  # warm-up: the batch shapes
        net.network_calls = net.batched_rows = 0
        net.network_seconds = 0.0
        rounds, dt = _timed(round_, max(1, math.ceil(plan.batch_images / B)), budget.cap(), sync)
        batches[str(B)] = {**_rate(rounds * B, dt), "rounds": rounds, "network_calls": net.network_calls,
                           "rows_per_call": net.batched_rows / max(1, net.network_calls),
                           "network_host_s_share": net.network_seconds / dt if dt > 0 else None}
    out["network_batch"] = batches

    # (c) T threads sharing one Segmenter, each predicting until the images are used up
    thr: Dict[str, Any] = {}
    for T in plan.threads:
        thr[str(T)] = _threads_rate(seg, imgs, T, plan.thread_images, budget.cap(), sync)
    out["threads"] = thr

    # the serving layer end to end: JPEG requests → PNG label maps, one batch per handle()
    from PIL import Image

    from weclip_infer.serving.service import SegmentationService

    bodies = []
    for k in range(plan.service_batch):
        buf = io.BytesIO()
        Image.fromarray(imgs[k % 8]).save(buf, format="JPEG", quality=90)
        bodies.append(buf.getvalue())
    svc = SegmentationService(Segmenter(model, **opts), seg.max_pixels)
    requests = [({"body": bytearray(b)}, {}) for b in bodies]

    def handle(_: int) -> None:
        bad = [r.status for r in svc.handle(requests) if r.status != 200]
        if bad:
            raise RuntimeError(f"service answered {bad}")

    handle(0)
    rounds, dt = _timed(handle, plan.service_rounds, budget.cap(), sync)
    out["service"] = {**_rate(rounds * plan.service_batch, dt), "requests_per_batch": plan.service_batch,
                      "network_batch": svc.network.max_rows, "last_batch": svc.last_batch}
    return out


def _threads_rate(seg, imgs: Sequence[np.ndarray], threads: int, images: int, cap_s: float,
                  sync: Callable[[], None]) -> dict:
    """Images/s of ``threads`` Python threads calling ``seg.predict`` until ``images`` are done."""
    lock = threading.Lock()
    state = {"next": 0, "done": 0}
    errors: List[BaseException] = []
    t0 = [0.0]

    def worker() -> None:
        while True:
            with lock:
                if state["next"] >= images or (state["next"] and time.perf_counter() - t0[0] > cap_s):
                    return
                k = state["next"]
                state["next"] += 1
            try:
                seg.predict(imgs[k % len(imgs)])
            except BaseException as e:  # noqa: BLE001 - raised in the caller
                errors.append(e)
                return
            with lock:
                state["done"] += 1

    for k in range(threads):  # warm-up: each thread's first call
        seg.predict(imgs[k % len(imgs)])
    sync()
    t0[0] = time.perf_counter()
    ts = [threading.Thread(target=worker, daemon=True) for _ in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    sync()
    dt = time.perf_counter() - t0[0]
    if errors:
        raise errors[0]
    return {**_rate(state["done"], dt), "threads": threads}


def bf16_weights(plan: Plan, budget: Budget) -> dict:
    """bf16 serving with the frozen CLIP's ready bf16 weights (``weclip_infer.packed_linear``;
    cast copies on GPUs, packed ones on CPUs with native bf16) against autocast casting every
    weight at every call: images/s one at a time and per 16-request network batch, alternating
    the two forms, and whether their label maps are identical (they should be)."""
    from weclip_infer import Segmenter
    from weclip_infer.backbone import FrozenCLIP
    from weclip_infer.serving.batching import BatchedNetwork

    model = _serve_model(plan)
    sync = _sync(plan.device)
    opts = dict(scales=(1.0, 0.75), flip=True, crf=False, long_side=plan.long_side, precision="bf16")
    imgs = _photos(plan.serve_hw, 8)
    ready = FrozenCLIP.packed_linears
    B = max(plan.net_batches)
    out: Dict[str, Any] = {"batch": B, "rounds": {}}
    labels: Dict[str, list] = {}
    for _rep in range(2):
        for form in ("ready weights", "cast per call"):
            FrozenCLIP.packed_linears = ready if form == "ready weights" else (  # type: ignore[method-assign]
                lambda self, precision, device_type: None)
            try:
                seg = Segmenter(model, **opts)
                labels[form] = [seg.predict(im).labels for im in imgs[:2]]
                n, dt = _timed(lambda i, s=seg: s.predict(imgs[i % 8]), plan.serve_images, budget.cap() / 4, sync)
                seg_b = Segmenter(model, **opts)
                net = BatchedNetwork(seg_b.backend, max_rows=2 * B)
                seg_b.backend = net
                tasks = [(lambda k=k, s=seg_b: s.predict(imgs[k % 8])) for k in range(B)]
                net.run(tasks)
                rounds, dtb = _timed(lambda _, n=net, t=tasks: n.run(t), max(1, math.ceil(plan.batch_images / B)),
                                     budget.cap() / 4, sync)
            finally:
                FrozenCLIP.packed_linears = ready  # type: ignore[method-assign]
            out["rounds"].setdefault(form, []).append({"sequential": _rate(n, dt),
                                                        "network_batch": _rate(rounds * B, dtb)})
    out["labels_identical"] = all(np.array_equal(a, b) for a, b in zip(labels["ready weights"],
                                                                        labels["cast per call"]))
    return out


def crf_torch(plan: Plan, budget: Budget) -> dict:
    """``dense_crf_torch`` on the device: ms per image by size, label count and batch."""
    from weclip_infer.crf import dense_crf_torch, permutohedral

    sync = _sync(plan.device)
    cuda = torch.device(plan.device).type == "cuda"
    rows = []
    for hw in plan.crf_sizes:
        photos = [torch.from_numpy(p).to(plan.device) for p in _photos(hw, max(plan.crf_batches))]
        for C in plan.crf_labels:
            probs = [_probs(hw, C, seed, plan.device) for seed in range(len(photos))]
            for B in plan.crf_batches:
                permutohedral._CACHE.clear()  # the first call of a size builds its smoothness lattice
                sync()
                t = time.perf_counter()
                dense_crf_torch(photos[:B], probs[:B])
                sync()
                first = time.perf_counter() - t
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                reps, dt = _timed(lambda _, B=B, im=photos, pr=probs: dense_crf_torch(im[:B], pr[:B]),
                                  plan.crf_repeats, budget.cap(), sync)
                rows.append({"hw": list(hw), "labels": C, "batch": B, "repeats": reps,
                             "ms_per_image": 1000 * dt / (reps * B), "ms_per_call": 1000 * dt / reps,
                             "first_call_ms": 1000 * first,
                             "peak_cuda_gib": torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else None})
    return {"mean_field_iters": 10, "rows": rows}


def serve_crf(plan: Plan, budget: Budget) -> dict:
    """Serving images/s with the torch CRF on the model's device."""
    from weclip_infer import Segmenter

    seg = Segmenter(_serve_model(plan), scales=(1.0, 0.75), flip=True, crf=True, crf_backend="torch",
                    long_side=plan.long_side)
    imgs = _photos(plan.serve_hw, 8)
    for i in range(max(1, plan.warmup // 2)):
        seg.predict(imgs[i % 8])
    last: Dict[str, Any] = {}

    def one(i: int) -> None:
        last["r"] = seg.predict(imgs[i % 8])

    n, dt = _timed(one, plan.serve_crf_images, budget.cap(), _sync(plan.device))
    return {"hw": list(plan.serve_hw), "crf_backend": "torch", **_rate(n, dt), "crf_size": last["r"].crf_size,
            "last_timings": last["r"].timings}


def _train_batches(plan: Plan, n_fg: int, cuda: bool) -> list:
    rng = np.random.default_rng(0)
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(8):  # a few distinct batches, cycled (host → device copy every iteration)
        x = torch.randint(0, 256, (plan.train_batch, 3, plan.train_hw, plan.train_hw), dtype=torch.uint8, generator=g)
        cls = torch.zeros(plan.train_batch, n_fg)
        for b in range(plan.train_batch):
            cls[b, rng.choice(n_fg, size=int(rng.integers(1, min(3, n_fg) + 1)), replace=False)] = 1
        out.append((x.pin_memory(), cls.pin_memory()) if cuda else (x, cls))
    return out


class _Trainer:
    """One optimiser step of the benchmark: the decoder under AdamW, like the training loop."""

    def __init__(self, plan: Plan, model, amp: bool = False):
        self.dev = torch.device(plan.device)
        self.cuda = self.dev.type == "cuda"
        self.model = model
        self.amp = amp and self.cuda
        self.opt = torch.optim.AdamW(model.decoder.parameters(), lr=2e-4, weight_decay=0.01)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        self.batches = _train_batches(plan, model.num_classes - 1, self.cuda)

    def forward(self, i: int):
        x, cls = self.batches[i % len(self.batches)]
        x = self.model.normalize(x.to(self.dev, non_blocking=True).float())
        with torch.autocast(self.dev.type, dtype=torch.float16, enabled=self.amp):
            return self.model(x, cls.to(self.dev, non_blocking=True), use_rfm=True)

    def backward(self, out) -> None:
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(out["loss"]).backward()

    def update(self) -> None:
        self.scaler.step(self.opt)
        self.scaler.update()

    def step(self, i: int):
        out = self.forward(i)
        self.backward(out)
        self.update()
        return out["loss"]


def train_speed(plan: Plan, budget: Budget, iters: int, amp: bool = False, precision: str = "fp32") -> dict:
    """Seconds per training iteration over ``iters`` iterations, one sync at the end."""
    tr = _Trainer(plan, _train_model(plan, precision), amp)
    sync = _sync(plan.device)
    for i in range(plan.train_warmup):  # cuDNN autotune, allocator
        tr.step(i)
    sync()
    if tr.cuda:
        torch.cuda.reset_peak_memory_stats()
    loss: Dict[str, Any] = {}
    cap = max(1.0, min(3 * plan.section_cap_s, budget.left() / 2))
    n, dt = _timed(lambda i: loss.__setitem__("v", tr.step(i)), iters, cap, sync)
    return {"iters": n, "iters_asked": iters, "amp": amp, "backbone_precision": precision, "seconds": dt,
            "s_per_iter": dt / n, "projected_30k_iters_h": dt / n * 30000 / 3600,
            "peak_cuda_gb": torch.cuda.max_memory_allocated() / 1024 ** 3 if tr.cuda else None,
            "final_loss": float(loss["v"]), "batch": plan.train_batch, "size": plan.train_hw}


def train_profile(plan: Plan, budget: Budget, precision: str) -> dict:
    """One training step by stage (synchronised stage timers) and by device kernels (profiler)."""
    model = _train_model(plan, precision)
    tr = _Trainer(plan, model)
    sync = _sync(plan.device)
    for i in range(max(2, plan.train_warmup // 2)):
        tr.step(i)
    # steps without any sync inside: the figure the stage timers are compared with
    steps, dt = _timed(tr.step, plan.profile_steps * 2, budget.cap(), sync)
    out: Dict[str, Any] = {"backbone_precision": precision, "batch": plan.train_batch, "size": plan.train_hw,
                           "step_ms_unsynced": 1000 * dt / steps}
    sums: Dict[str, float] = {}
    model.timings = {"_sync": True}
    try:
        for i in range(plan.profile_steps):
            sync()
            t0 = time.perf_counter()
            res = tr.forward(i)
            sync()
            t1 = time.perf_counter()
            tr.backward(res)
            sync()
            t2 = time.perf_counter()
            tr.update()
            sync()
            t3 = time.perf_counter()
            for k, v in (("forward", t1 - t0), ("backward", t2 - t1), ("optimizer", t3 - t2), ("step", t3 - t0)):
                sums[k] = sums.get(k, 0.0) + v
        stages = {k: 1000 * v / plan.profile_steps for k, v in model.timings.items() if k != "_sync"}
    finally:
        model.timings = None
    ms = {k: 1000 * v / plan.profile_steps for k, v in sums.items()}
    stages["forward_other"] = ms["forward"] - sum(stages.values())
    out.update(stages_ms_synced=stages, forward_ms=ms["forward"], backward_ms=ms["backward"],
               optimizer_ms=ms["optimizer"], step_ms_synced=ms["step"])
    try:
        out["profiler"] = _kernel_profile(tr, sync)
        k = out["profiler"].get("total", {}).get("kernel_ms")
        if k is not None:
            out["gpu_busy_fraction"] = k / out["step_ms_unsynced"]
    except Exception as e:  # noqa: BLE001 - the synchronised figures above stand on their own
        out["profiler"] = {"error": f"{type(e).__name__}: {e}"}
    return out


def _kernel_profile(tr: _Trainer, sync: Callable[[], None]) -> dict:
    """Host time, device-kernel count and kernel time per model stage of one unsynchronised step.

    Each stage of ``weclip_infer.model`` (its ``_stage`` timer) is wrapped in a profiler range for
    the duration; backward runs on autograd's own thread, so its kernels appear in ``total`` only.
    """
    from torch.profiler import ProfilerActivity, profile, record_function

    import weclip_infer.model as wm

    orig = wm._stage

    @contextlib.contextmanager
    def traced(owner, name: str) -> Iterator[None]:
        with record_function(f"stage:{name}"), orig(owner, name):
            yield

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if tr.cuda else [])
    wm._stage = traced
    try:
        sync()
        with profile(activities=acts) as prof:
            with record_function("stage:forward"):
                res = tr.forward(0)
            with record_function("stage:backward_launch"):
                tr.backward(res)
            with record_function("stage:optimizer"):
                tr.update()
            sync()
    finally:
        wm._stage = orig
    events = list(prof.events())

    def gather(ev) -> Tuple[int, float, int]:
        n, us, ops = len(ev.kernels), sum(k.duration for k in ev.kernels), 1
        for c in ev.cpu_children:
            a, b, o = gather(c)
            n, us, ops = n + a, us + b, ops + o
        return n, us, ops

    stages: Dict[str, Dict[str, float]] = {}
    for ev in events:
        if not ev.name.startswith("stage:"):
            continue
        n, us, ops = gather(ev)
        s = stages.setdefault(ev.name[6:], {"host_ms": 0.0, "kernels": 0, "kernel_ms": 0.0, "host_ops": 0})
        s["host_ms"] += ev.cpu_time_total / 1000
        s["kernels"] += n
        s["kernel_ms"] += us / 1000
        s["host_ops"] += ops - 1
    total_k = sum(len(ev.kernels) for ev in events)
    total_us = sum(k.duration for ev in events for k in ev.kernels)
    return {"stages": stages, "total": {"kernels": total_k, "kernel_ms": total_us / 1000 if tr.cuda else None}}


def par_variants(plan: Plan, budget: Budget) -> dict:
    """PAR (20 iterations, 48 neighbours) at the training size, B=4, 1+3 channels, five ways:
    the sliced form (CPU's), the gathered form (the library's default off CPU), the sparse form
    (CSR products, ``par.PAR_OFF_CPU_FORM = "sparse"``), the sliced form replayed from a CUDA
    graph, and the sliced form under ``torch.compile``. Milliseconds per call and the largest
    difference from the sliced form."""
    from weclip_infer import par

    dev = torch.device(plan.device)
    sync = _sync(plan.device)
    hw = plan.train_hw
    g = torch.Generator().manual_seed(0)
    img = torch.randn(plan.train_batch, 3, hw, hw, generator=g).to(dev)
    cams = torch.rand(plan.train_batch, 4, hw, hw, generator=g).to(dev)
    dil = (1, 2, 4, 8, 12, 24)
    kern = par.par_kernel(img, dil)

    def sliced(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        for _ in range(20):
            nbs = par._neighbours(x, dil)
            acc = torch.mul(nbs[0], k[:, 0:1])
            for i in range(1, len(nbs)):
                acc.addcmul_(nbs[i], k[:, i : i + 1])
            x = acc
        return x

    res: Dict[str, Any] = {"batch": plan.train_batch, "channels": 4, "size": hw}
    ref = sliced(cams, kern)
    variants: Dict[str, Callable[[], torch.Tensor]] = {
        "sliced": lambda: sliced(cams, kern),
        "gathered": lambda: par._refine_gathered(img, cams, dil, 20, 0.3, 0.01),
        "sparse": lambda: par._refine_sparse(img, cams, dil, 20, 0.3, 0.01),
    }
    if dev.type == "cuda":
        try:
            static_x, static_k = cams.clone(), kern.clone()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                sliced(static_x, static_k)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = sliced(static_x, static_k)

            def replay() -> torch.Tensor:
                static_x.copy_(cams)
                static_k.copy_(kern)
                graph.replay()
                return static_out

            variants["sliced_cuda_graph"] = replay
        except Exception as e:  # noqa: BLE001 - recorded, the others still run
            res["sliced_cuda_graph"] = {"error": f"{type(e).__name__}: {e}"}
    if not plan.par_compile:
        res["sliced_compiled"] = {"skipped": "not asked for (Plan.par_compile)"}
    else:
        try:
            compiled = torch.compile(sliced, dynamic=False)
            t = time.perf_counter()
            compiled(cams, kern)
            sync()
            res["compile_s"] = time.perf_counter() - t
            variants["sliced_compiled"] = lambda: compiled(cams, kern)
        except Exception as e:  # noqa: BLE001 - recorded, the others still run
            res["sliced_compiled"] = {"error": f"{type(e).__name__}: {e}"[:1000]}
    for name, fn in variants.items():
        try:
            out = fn()
            n, dt = _timed(lambda _, fn=fn: fn(), 20, budget.cap() / 4, sync)
            res[name] = {"ms": 1000 * dt / n, "calls": n, "max_abs_diff": float((out - ref).abs().max())}
        except Exception as e:  # noqa: BLE001
            res[name] = {"error": f"{type(e).__name__}: {e}"[:1000]}
    return res


def traces(plan: Plan, budget: Budget, out_dir: Path) -> dict:
    """Profiler traces (Chrome format, gzipped, into ``out_dir``) of one batched serving round
    (16 requests, bf16) and of three training steps (fp32), with each one's top host operators:
    where the host time that keeps the GPU waiting goes."""
    import gzip

    from torch.profiler import ProfilerActivity, profile

    from weclip_infer import Segmenter
    from weclip_infer.serving.batching import BatchedNetwork

    sync = _sync(plan.device)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.device(plan.device).type == "cuda" else [])
    res: Dict[str, Any] = {}

    def save(prof, name: str) -> dict:
        raw = out_dir / f"{name}.json"
        prof.export_chrome_trace(str(raw))
        gz = out_dir / f"{name}.json.gz"
        atomic_write_bytes(gz, gzip.compress(raw.read_bytes(), 6))
        raw.unlink()
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60)
        return {"file": gz.name, "bytes": gz.stat().st_size, "top_host_ops": table}

    B = max(plan.net_batches)
    seg = Segmenter(_serve_model(plan), scales=(1.0, 0.75), flip=True, crf=False, long_side=plan.long_side,
                    precision="bf16")
    net = BatchedNetwork(seg.backend, max_rows=2 * B)
    seg.backend = net
    imgs = _photos(plan.serve_hw, 8)
    tasks = [(lambda k=k: seg.predict(imgs[k % 8])) for k in range(B)]
    for _ in range(2):
        net.run(tasks)
    sync()
    with profile(activities=acts) as prof:
        t = time.perf_counter()
        net.run(tasks)
        sync()
        res["serve_round_s"] = time.perf_counter() - t
    res["serve"] = save(prof, f"trace-serve-bf16-b{B}")
    if budget.left() < 10:
        return res
    tr = _Trainer(plan, _train_model(plan, "fp32"))
    for i in range(3):
        tr.step(i)
    sync()
    with profile(activities=acts) as prof:
        t = time.perf_counter()
        for i in range(3):
            tr.step(i)
        sync()
        res["train_3_steps_s"] = time.perf_counter() - t
    res["train"] = save(prof, "trace-train-fp32")
    return res


def onnx_cuda(plan: Plan, budget: Budget) -> dict:
    """The exported ONNX graph under ONNX Runtime's CUDA provider vs eager torch on CUDA."""
    try:
        import onnxruntime as ort
    except ImportError as e:
        return {"skipped": f"onnxruntime not importable ({e})"}
    providers = ort.get_available_providers()
    cuda = torch.device(plan.device).type == "cuda"
    if cuda and "CUDAExecutionProvider" not in providers:
        return {"skipped": ORT_SKIP, "onnxruntime": ort.__version__, "providers": providers}
    if budget.left() < 60:
        return {"skipped": f"time budget: {budget.left():.0f} s left, the export needs ~60 s"}
    from weclip_infer import Segmenter
    from weclip_infer.export import write_bundle

    model = _serve_model(plan)
    out: Dict[str, Any] = {"onnxruntime": ort.__version__, "providers": providers}
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        cpu_model = copy.deepcopy(model).cpu()
        write_bundle(cpu_model, tmp, formats=("onnx",))
        del cpu_model
        out["export_s"] = time.perf_counter() - t
        seg = Segmenter.from_pretrained(tmp, backend="onnx", device=plan.device, long_side=plan.long_side)
        out["session_providers"] = getattr(getattr(seg.backend, "session", None), "get_providers", lambda: None)()
        eager = Segmenter(model, scales=seg.scales, flip=seg.flip, crf=False, long_side=plan.long_side)
        img = _photos(plan.serve_hw, 1)[0]
        x = eager.preprocess(img)
        x = torch.cat([x, x.flip(-1)], 0)
        with torch.inference_mode():
            a = eager.backend(x).float()
            b = seg.backend(x).float().to(a.device)
        err = (a - b).abs().max()
        out.update(max_abs_err=float(err), max_rel_err=float(err / (a.abs().max() + 1e-12)),
                   argmax_agreement=float((a.argmax(1) == b.argmax(1)).float().mean()))
        imgs = _photos(plan.serve_hw, 8)
        for i in range(plan.warmup):
            seg.predict(imgs[i % 8])
        n, dt = _timed(lambda i: seg.predict(imgs[i % 8]), plan.onnx_images, budget.cap(), _sync(plan.device))
        out["sequential"] = _rate(n, dt)
    return out


def parity(plan: Plan, budget: Budget) -> dict:
    """CPU vs ``plan.device`` training forward of the same weights, TF32 off (fp32 on both)."""
    from weclip_infer import build_model

    with tf32(False):
        torch.manual_seed(0)
        m_cpu = build_model(plan.model_cfg, device="cpu")
        m_gpu = build_model(plan.model_cfg, device=plan.device)
        m_gpu.decoder.load_state_dict(m_cpu.decoder.state_dict())
        m_cpu.eval(), m_gpu.eval()  # decoder dropout off: same function on both devices
        n_fg = m_cpu.num_classes - 1
        g = torch.Generator().manual_seed(1)
        x = m_cpu.normalize(torch.randint(0, 256, (2, 3, plan.train_hw, plan.train_hw), generator=g).float())
        cls = torch.zeros(2, n_fg)
        cls[0, [4, 11] if n_fg > 11 else [0, n_fg - 1]] = 1
        cls[1, [0]] = 1
        out = {}
        for use_rfm in (False, True):
            a = m_cpu.intermediates(x, cls, use_rfm=use_rfm)
            b = m_gpu.intermediates(x.to(plan.device), cls.to(plan.device), use_rfm=use_rfm)

            def rel(u, v) -> float:
                return float((u.float() - v.float().cpu()).abs().max() / (u.float().abs().max() + 1e-12))

            key = "rfm" if use_rfm else "static"
            out[key] = {
                "seg_logits_rel": rel(a["seg_logits"], b["seg_logits"]),
                "cam_init_rel": max(rel(u, v) for u, v in zip(a["cam_init"], b["cam_init"])),
                "pseudo_label_agreement": float((a["pseudo_label"] == b["pseudo_label"].cpu()).float().mean()),
                "cam_refined_rel": max(rel(u, v) for u, v in zip(a["cam_refined"], b["cam_refined"])),
                "cam_par_rel": rel(a["cam_par"], b["cam_par"]),
                "loss_cpu": float(a["loss"]), "loss_device": float(b["loss"]),
            }
            if use_rfm:
                out[key].update(affinity_rel=rel(a["affinity"], b["affinity"]),
                                transition_rel=rel(a["transition"], b["transition"]),
                                layer_keep_equal=bool(torch.equal(a["layer_keep"], b["layer_keep"].cpu())),
                                layer_scores_rel=rel(a["layer_scores"], b["layer_scores"]))
        # the serving path end to end (preprocessing on the device included), with and without CRF
        from weclip_infer import Segmenter

        img = _photos(plan.serve_hw, 1)[0]
        for crf in (False, True):
            opts = dict(scales=(1.0, 0.75), flip=True, crf=crf, crf_backend="torch", long_side=plan.long_side)
            ra = Segmenter(m_cpu, **opts).predict(img)
            rb = Segmenter(m_gpu, **opts).predict(img)
            out["predict_crf" if crf else "predict"] = {
                "label_agreement": float((ra.labels == rb.labels).mean()),
                "logits_rel": float(np.abs(ra.logits.numpy() - rb.logits.numpy()).max()
                                    / (np.abs(ra.logits.numpy()).max() + 1e-12))}
    return out


def cli_run(plan: Plan, budget: Budget) -> dict:
    """The training CLI on the device for ``plan.cli_iters`` iterations of a generated demo world."""
    n_train, n_val = plan.cli_world
    iters = plan.cli_iters
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        world = tmp / "world"
        env = dict(os.environ)
        subprocess.run([sys.executable, "-m", "weclip_infer.demo.make_world", "--out", str(world), "--n-train",
                        str(n_train), "--n-val", str(n_val), "--seed", "0"], check=True, env=env, capture_output=True,
                       timeout=max(30.0, budget.left()))
        t = time.perf_counter()
        p = subprocess.run([sys.executable, "-m", "weclip_infer.train", "--config", "weclip_infer/configs/demo.yaml",
                            f"data.root={world}", f"train.out_dir={tmp / 'run'}", f"train.device={plan.device}",
                            f"train.max_iters={iters}", f"model.refine.rfm_switch_iter={iters // 2}",
                            "train.eval_every=0", f"train.checkpoint_every={iters // 2}", "train.tensorboard=false",
                            "train.plots=false", "data.workers=2"],
                           env=env, capture_output=True, text=True, cwd=REPO, timeout=max(30.0, budget.left()))
        summary = {}
        if (tmp / "run" / "summary.json").is_file():
            summary = json.loads((tmp / "run" / "summary.json").read_text())
        res = {"returncode": p.returncode, "seconds": time.perf_counter() - t, "device": summary.get("device"),
               "final_loss": summary.get("final_loss"), "val_miou": (summary.get("eval") or {}).get("miou")}
        if p.returncode != 0:
            res["error"] = f"training CLI exited {p.returncode}: {p.stderr[-1500:]}"
        return res


# ---- the run ---------------------------------------------------------------------------------------------
def checks(plan: Plan, args: argparse.Namespace, out_dir: Path) -> List[Tuple[str, Callable[[Budget], dict], float]]:
    """(name, check, seconds it needs at least to be worth starting), most important first."""
    return [
        ("env", lambda b: env_info(plan, b), 0),
        ("serve_fp32", lambda b: serve_throughput(plan, b, "fp32"), 15),
        ("serve_bf16", lambda b: serve_throughput(plan, b, "bf16"), 15),
        ("bf16_weights", lambda b: bf16_weights(plan, b), 10),
        ("crf_torch", lambda b: crf_torch(plan, b), 10),
        ("serve_crf_torch", lambda b: serve_crf(plan, b), 10),
        ("train_profile_fp32", lambda b: train_profile(plan, b, "fp32"), 10),
        ("train_profile_bf16", lambda b: train_profile(plan, b, "bf16"), 10),
        ("train_fp32", lambda b: train_speed(plan, b, args.iters), 35),
        ("train_bf16_backbone", lambda b: train_speed(plan, b, plan.train_bf16_iters, precision="bf16"), 20),
        ("onnx_cuda", lambda b: onnx_cuda(plan, b), 0),  # checks the budget after the provider
        ("parity_cpu_vs_cuda", lambda b: parity(plan, b), 20),
        ("train_amp_fp16", lambda b: train_speed(plan, b, args.amp_iters, amp=True), 20),
        ("train_cli_cuda", lambda b: cli_run(plan, b), 40),
        ("traces", lambda b: traces(plan, b, out_dir), 15),
        ("par_variants", lambda b: par_variants(plan, b), 20),
    ]


def _flat(prefix: str, v: Any, out: List[Tuple[str, str]]) -> None:
    if isinstance(v, dict):
        for k, x in v.items():
            _flat(f"{prefix}.{k}" if prefix else str(k), x, out)
    elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
        for i, x in enumerate(v):
            _flat(f"{prefix}[{i}]", x, out)
    elif isinstance(v, float):
        out.append((prefix, f"{v:.4g}"))
    elif isinstance(v, str) and len(v) > 300:
        out.append((prefix, v[:300].replace("|", "/").replace("\n", " ") + " …"))
    else:
        out.append((prefix, str(v).replace("|", "/").replace("\n", " ")))


def to_markdown(res: dict) -> str:
    """The results as markdown: a headline table (machine and main figures), then every figure."""
    env = res.get("env", {})
    lines = [f"# GPU checks ({res.get('started')})", "",
             "| | |", "| --- | --- |"]
    for k in ("gpu", "driver", "torch", "cuda", "cudnn", "onnxruntime", "open_clip", "python", "cpus"):
        if k in env:
            lines.append(f"| {k} | {env[k]} |")
    lines.append(f"| TF32 at start | {env.get('tf32')} |")
    lines.append(f"| budget | {res.get('budget_s')} s, used {res.get('elapsed_s', 0):.0f} s |")
    head = []
    for p in ("fp32", "bf16"):
        s = res.get(f"serve_{p}", {})
        if "sequential" in s:
            head.append((f"serving {p}, one at a time", f"{s['sequential']['images_per_s']:.1f} images/s"))
        if "sequential_tf32" in s:
            head.append((f"serving {p} + TF32, one at a time", f"{s['sequential_tf32']['images_per_s']:.1f} images/s"))
        for B, r in s.get("network_batch", {}).items():
            head.append((f"serving {p}, network batch B={B} requests", f"{r['images_per_s']:.1f} images/s"))
        for T, r in s.get("threads", {}).items():
            head.append((f"serving {p}, T={T} threads", f"{r['images_per_s']:.1f} images/s"))
        if "service" in s:
            head.append((f"serving {p}, SegmentationService.handle, {s['service']['requests_per_batch']} JPEG "
                         "requests per batch", f"{s['service']['images_per_s']:.1f} images/s"))
    for r in res.get("crf_torch", {}).get("rows", []):
        head.append((f"torch CRF {r['hw'][0]}x{r['hw'][1]}, {r['labels']} labels, batch {r['batch']}",
                     f"{r['ms_per_image']:.1f} ms/image (first call {r['first_call_ms']:.0f} ms)"))
    if "images_per_s" in res.get("serve_crf_torch", {}):
        head.append(("serving with torch CRF", f"{res['serve_crf_torch']['images_per_s']:.1f} images/s"))
    for k in ("train_fp32", "train_bf16_backbone", "train_amp_fp16"):
        if "s_per_iter" in res.get(k, {}):
            head.append((k, f"{1000 * res[k]['s_per_iter']:.1f} ms/iter ({res[k]['iters']} iters, "
                            f"30k ≈ {res[k]['projected_30k_iters_h']:.2f} h)"))
    if "sequential" in res.get("onnx_cuda", {}):
        rate = res["onnx_cuda"]["sequential"]["images_per_s"]
        head.append((f"ONNX Runtime on {env.get('device')}, one at a time", f"{rate:.1f} images/s"))
    if head:
        lines += ["", "| figure | value |", "| --- | --- |"] + [f"| {a} | {b} |" for a, b in head]
    for name, v in res.items():
        if not isinstance(v, dict) or name == "env":
            continue
        rows: List[Tuple[str, str]] = []
        _flat("", v, rows)
        lines += ["", f"## {name}", "", "| key | value |", "| --- | --- |"] + [f"| {a} | {b} |" for a, b in rows]
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budget-s", type=float, default=420.0,
                    help="seconds for the whole run: loops stop early and later checks are skipped (default 420)")
    ap.add_argument("--iters", type=int, default=500, help="iterations of train_fp32 (default 500)")
    ap.add_argument("--amp-iters", type=int, default=200)
    ap.add_argument("--serve-images", type=int, default=None, help="images per sequential serving figure")
    ap.add_argument("--out", default=None, help="folder for gpu-<time>.json/.md (default: $OUT, else "
                                                "benchmarks/results; --smoke-cpu: a temporary folder)")
    ap.add_argument("--only", default=None, help="comma-separated prefixes of the checks to run (env always runs)")
    ap.add_argument("--smoke-cpu", action="store_true", help="check this script on CPU with a tiny model and tiny "
                                                             "counts (no figures)")
    args = ap.parse_args(argv)
    if args.smoke_cpu:
        plan = smoke_plan()
        args.iters, args.amp_iters = plan.train_iters, plan.amp_iters
    else:
        if not torch.cuda.is_available():
            print("no CUDA device (use --smoke-cpu to check the script on the CPU)", file=sys.stderr)
            return 2
        plan = Plan()
    if args.serve_images:
        plan = replace(plan, serve_images=args.serve_images)
    with contextlib.ExitStack() as stack:
        if args.out:
            out_dir = Path(args.out)
        elif args.smoke_cpu:  # no figures: nothing to keep unless --out asks for it
            out_dir = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        else:
            out_dir = Path(os.environ.get("OUT") or REPO / "benchmarks" / "results")
        out_dir.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        json_path, md_path = out_dir / f"gpu-{stamp}.json", out_dir / f"gpu-{stamp}.md"
        budget = Budget(args.budget_s, plan.section_cap_s)
        res: Dict[str, Any] = {"started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                               "smoke_cpu": bool(args.smoke_cpu), "budget_s": args.budget_s}
        only = [p.strip() for p in args.only.split(",")] if args.only else None

        def save() -> None:
            res["elapsed_s"] = time.perf_counter() - budget.t0
            atomic_write_bytes(json_path, (json.dumps(res, indent=2, default=str) + "\n").encode())
            try:
                md = to_markdown(res)
            except Exception as e:  # noqa: BLE001 - the JSON holds every figure; never lose the run to the table
                md = f"# GPU checks\n\nmarkdown table failed ({type(e).__name__}: {e}); see {json_path.name}\n"
            atomic_write_bytes(md_path, md.encode())

        for name, fn, need_s in checks(plan, args, out_dir):
            if only and name != "env" and not any(name.startswith(p) for p in only):
                continue
            t = time.perf_counter()
            if budget.left() < need_s:
                res[name] = {"skipped": f"time budget: {budget.left():.0f} s left, this check needs ~{need_s:.0f} s"}
            else:
                try:
                    res[name] = fn(budget)
                except Exception as e:  # noqa: BLE001 - record and go on to the next check
                    res[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
            res[name]["wall_s"] = time.perf_counter() - t
            save()
            status = "error" if "error" in res[name] else ("skipped" if "skipped" in res[name] else "ok")
            print(f"[gpu.py] {name}: {status} ({res[name]['wall_s']:.1f} s; {budget.left():.0f} s of the budget "
                  f"left)", flush=True)
        _free_models()
        save()
        print(md_path.read_text()[:8000], flush=True)
        print(f"[gpu.py] wrote {json_path} and {md_path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

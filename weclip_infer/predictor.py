"""``Segmenter``: image in → label map + per-class scores out.

One object, loaded once. Pre-processing (decode, normalise, resize), the multi-scale + flip
fusion, the optional DenseCRF and the label hint exist only here; the batch CLI, the evaluation
CLI, training-time evaluation and the TorchServe handler all call it. The network itself is a
*backend*: a callable ``B×3×H×W`` normalised → ``B×C×(H//p)×(W//p)`` logits — the eager model's
``segment`` or an exported TorchScript / ONNX Runtime graph.

Bounded cost per image (see ``docs/limits.md``): the network always runs at ``long_side``; the
label map is produced at the original resolution from the low-resolution logits in bands of
rows, so no full-resolution ``C``-channel map is held unless ``keep_probs=True`` asks for one;
DenseCRF refines at most ``crf_max_pixels`` pixels (larger images are refined at a reduced size
and the label map is scaled up).
"""
from __future__ import annotations

import copy
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from .imageio import DEFAULT_MAX_PIXELS, ImageSource, load_image
from .normalization import mean_std
from .tensor_ops import channel_argmax, to_device

__all__ = ["ATTENTION_TOKENS", "CHECKPOINT_BACKENDS", "CRF_VERTICES_PER_PIXEL", "DEFAULT_CRF_MAX_PIXELS",
           "SegmentationResult", "network_cost", "Segmenter", "fuse_multiscale", "labels_from_logits",
           "pad_to_patch", "resize_long_side"]

log = logging.getLogger(__name__)

#: backends that can run one of our checkpoint directories (bundles also take ``torchscript``)
CHECKPOINT_BACKENDS = ("auto", "eager", "onnx")

Backend = Callable[[torch.Tensor], torch.Tensor]

#: Largest image (pixels) that DenseCRF refines at full resolution; larger ones are refined at a
#: reduced size with this many pixels and their label map is scaled up (nearest neighbour).
DEFAULT_CRF_MAX_PIXELS = 500_000
#: The torch CRF's content cap: lattice vertices allowed per pixel of ``crf_max_pixels`` (smooth
#: photos need far below one; per-pixel noise needs about five).
CRF_VERTICES_PER_PIXEL = 1.0
#: Up to this many elements (classes × pixels) the full-resolution logit map is built in one
#: piece; above it, in bands of rows of about ``_BAND_ELEMENTS`` elements.
_DENSE_MAP_ELEMENTS = 1 << 24
_BAND_ELEMENTS = 1 << 22
#: Above this many pixels, the resize to the network size reads only the rows/columns it needs.
_GATHER_PIXELS = 4_000_000
#: Above this many pixels, per-class scores are taken over a regular subsample of about this size.
_SCORE_PIXELS = 1 << 20


@dataclass
class SegmentationResult:
    """Output of ``Segmenter.predict``.

    ``labels``: ``H0×W0`` int64 class indices at the original resolution (0 = background);
    ``scores``: ``C`` per-class confidence (max softmax probability over pixels);
    ``logits``: ``C×h×w`` fused logits on the scale-1 patch grid (torch, CPU);
    ``class_names``: names incl. ``"background"`` first; ``timings``: seconds per stage;
    ``crf_size``: ``(H, W)`` at which DenseCRF ran (``None`` without CRF) — smaller than the
    image when it has more than ``crf_max_pixels`` pixels.
    """

    labels: np.ndarray
    scores: np.ndarray
    logits: torch.Tensor
    class_names: list
    timings: dict = field(default_factory=dict)
    probs: Optional[np.ndarray] = None  # ``C×H0×W0`` softmax, only with ``predict(keep_probs=True)``
    crf_size: Optional[tuple] = None

    def areas(self) -> dict:
        """Pixel count per present class name."""
        ids, counts = np.unique(self.labels, return_counts=True)
        return {self.class_names[i] if i < len(self.class_names) else str(i): int(c) for i, c in zip(ids, counts)}


def resize_long_side(x: torch.Tensor, long_side: int) -> torch.Tensor:
    """Scale ``B×3×H×W`` so that ``max(H, W) == long_side`` (bilinear,
    ``align_corners=False``, sizes truncated with ``int``; small images are upscaled)."""
    if not long_side:
        return x
    H, W = x.shape[-2:]
    f = long_side / max(H, W)
    size = (max(int(H * f), 1), max(int(W * f), 1))
    if size == (H, W):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


#: Attention's share of a ViT's work grows with the token count L: per block the linear layers
#: cost ~24·L·D² and attention ~4·L²·D multiply-adds, equal at L = 6·D (4608 for ViT-B's D = 768).
ATTENTION_TOKENS = 6 * 768


def network_cost(hw: tuple[int, int], long_side: int, patch: int, scales: Sequence[float], flip: bool) -> float:
    """The network work of multi-scale (+ flip) inference on an ``H×W`` image, in token
    equivalents: each pass of ``L`` tokens counts ``L + L²/ATTENTION_TOKENS`` (linear layers plus
    attention, weighted as in ViT-B), a flipped copy as a second pass. Sizes follow the long-side
    resize and each scale's resize (``int`` truncation), like :func:`fuse_multiscale`."""
    H, W = int(hw[0]), int(hw[1])
    if long_side:
        f = long_side / max(H, W)
        H, W = max(int(H * f), 1), max(int(W * f), 1)
    total = 0.0
    for s in scales:
        L = max(int(H * s) // patch, 1) * max(int(W * s) // patch, 1) + 1
        total += (L + L * L / ATTENTION_TOKENS) * (2 if flip else 1)
    return total


def fuse_multiscale(backend: Backend, x: torch.Tensor, scales: Sequence[float] = (1.0, 0.75), flip: bool = True,
                    patch: int = 16, timings: Optional[dict] = None) -> torch.Tensor:
    """Multi-scale + flip fusion for one image ``1×3×H×W`` (already resized to the long side).

    Each scale runs as one batch ``[x_s, flip(x_s)]``; flipped logits are flipped back and
    averaged; other scales are resized to the grid of the largest scale; scales are fused by the
    mean of raw logits. Returns ``1×C×h×w``.
    """
    ref_scale = max(scales)
    outs = []
    grid = None
    for s in sorted(scales, reverse=True):
        xs = x if s == 1.0 else F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False)
        if xs.shape[-2] < patch or xs.shape[-1] < patch:
            raise ValueError(f"image too small at scale {s}: {tuple(xs.shape[-2:])} (needs at least {patch}×{patch})")
        batch = torch.cat([xs, xs.flip(-1)], 0) if flip else xs
        t0 = time.perf_counter()
        logits = backend(batch).float()
        if timings is not None:
            timings[f"network@{s:g}"] = timings.get(f"network@{s:g}", 0.0) + time.perf_counter() - t0
        out = (logits[:1] + logits[1:2].flip(-1)) / 2 if flip else logits[:1]
        if s == ref_scale:
            grid = out.shape[-2:]
        outs.append(out)
    fused = [o if o.shape[-2:] == grid else F.interpolate(o, size=grid, mode="bilinear", align_corners=False)
             for o in outs]
    return torch.stack(fused, 0).mean(0)


def pad_to_patch(x: torch.Tensor, scales: Sequence[float], patch: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Pad ``B×3×H×W`` at the bottom/right (edge pixels repeated) so that every scale in
    ``scales`` leaves at least one ``patch×patch`` cell; very elongated images (e.g. 4096×64)
    would otherwise have a side below the patch size after the long-side resize. Returns the
    (possibly) padded tensor and the unpadded ``(H, W)``."""
    H, W = x.shape[-2:]
    s_min = min(scales)

    def needed(side: int) -> int:
        target = max(side, math.ceil(patch / s_min))
        while int(target * s_min) < patch:
            target += 1
        return target

    Hp, Wp = (H if int(H * s_min) >= patch else needed(H)), (W if int(W * s_min) >= patch else needed(W))
    if (Hp, Wp) == (H, W):
        return x, (H, W)
    return F.pad(x, (0, Wp - W, 0, Hp - H), mode="replicate"), (H, W)


def _linear_taps(n_in: int, n_out: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Source indices and weights of 1-D linear resizing ``n_in → n_out``, the same numbers as
    ``F.interpolate(mode="bilinear", align_corners=False)`` uses (its float32 scale, and the
    source coordinate rounded once)."""
    scale = float(torch.tensor(n_in, dtype=torch.float32) / n_out)
    dst = torch.arange(n_out, dtype=torch.float64, device=device)
    src = (scale * (dst + 0.5) - 0.5).float().clamp_(min=0)
    i0 = src.floor().long().clamp_(max=n_in - 1)
    w1 = (src - i0.float()).clamp_(0, 1)
    i1 = torch.where(i0 < n_in - 1, i0 + 1, i0)
    return i0, i1, 1 - w1, w1


def _lerp(a: torch.Tensor, wa: torch.Tensor, b: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """``a·wa + b·wb`` rounded as ``F.interpolate`` rounds it on CPU (``b·wb`` rounded, then a
    fused multiply-add), so the banded label map matches the one-piece map bit for bit."""
    return (a.double() * wa.double() + (b * wb).double()).float()


def _upsampled_logits(logits: torch.Tensor, size: tuple[int, int], allowed: Optional[torch.Tensor]) -> torch.Tensor:
    """``C×h×w`` logits resized bilinearly (``align_corners=False``) to ``size`` in one piece, fp32,
    with classes outside ``allowed`` (a ``C`` bool mask) set to −inf."""
    up = F.interpolate(logits.float()[None], size=tuple(size), mode="bilinear", align_corners=False)[0]
    if allowed is not None:
        up.masked_fill_(~allowed.to(up.device)[:, None, None], float("-inf"))
    return up


def labels_from_logits(logits: torch.Tensor, size: tuple[int, int], allowed: Optional[torch.Tensor] = None,
                       keep_probs: bool = False) -> tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]:
    """Label map, per-class scores and (optionally) probabilities at ``size`` from ``C×h×w`` logits.

    The logits are resized bilinearly to ``size`` (``H×W``), classes outside ``allowed`` (a
    ``C`` bool mask) are excluded, and per pixel the argmax is the label; ``scores`` is the
    highest softmax probability of each class over the pixels. Small maps (``C·H·W`` up to
    16 Mi elements) are computed in one piece. Larger ones never exist at full resolution:

    * labels: a pixel between four grid points whose logits all pick the same class takes that
      class (a weighted mean of logit vectors that agree on their maximum keeps it), so only the
      grid cells that straddle a class boundary are interpolated, band by band, with the same
      arithmetic as ``F.interpolate`` — the label map is the one-piece map;
    * scores: the maximum over a regular subsample of at most ``_SCORE_PIXELS`` pixels (exact
      below that), which differs from the maximum over all pixels by a tiny amount because the
      logits are smooth at that scale;
    * probabilities (``keep_probs``): computed band by band into a ``4·C`` bytes-per-pixel array.

    Returns numpy ``(labels int64 H×W, scores float32 C, probs float32 C×H×W or None)``.
    """
    C, h, w = logits.shape
    H, W = size
    logits = logits.float()
    if C * H * W <= _DENSE_MAP_ELEMENTS:
        up = _upsampled_logits(logits, (H, W), allowed)
        probs = torch.softmax(up, dim=0)
        scores = probs.flatten(1).max(dim=1).values.cpu().numpy()
        labels = channel_argmax(up, 0).cpu().numpy().astype(np.int64)
        return labels, scores, (probs.cpu().numpy() if keep_probs else None)
    dev = logits.device
    allowed = allowed.to(dev) if allowed is not None else None
    cols_t = _linear_taps(w, W, dev)
    rows_t = _linear_taps(h, H, dev)
    if keep_probs:
        return _banded_full(logits, rows_t, cols_t, allowed)
    labels = _labels_by_cells(logits, rows_t, cols_t, allowed)
    step = max(1, math.ceil(math.sqrt(H * W / _SCORE_PIXELS)))
    ri = torch.arange(0, H, step, device=dev)
    ci = torch.arange(0, W, step, device=dev)
    sub_rows = tuple(t[ri] for t in rows_t)
    sub_cols = tuple(t[ci] for t in cols_t)
    _, scores, _ = _banded_full(logits, sub_rows, sub_cols, allowed, want_labels=False)
    return labels, scores, None


def _banded_full(logits: torch.Tensor, rows_t: tuple, cols_t: tuple, allowed: Optional[torch.Tensor],
                 want_labels: bool = True, want_probs: bool = True):
    """Labels, scores and probabilities at every (row, column) tap, band by band."""
    C = logits.shape[0]
    r0, r1, rw0, rw1 = rows_t
    c0, c1, cw0, cw1 = cols_t
    H, W = r0.shape[0], c0.shape[0]
    cols = _lerp(logits[:, :, c0], cw0, logits[:, :, c1], cw1)  # C×h×W: resized along the width only
    labels = np.empty((H, W), dtype=np.int64) if want_labels else None
    probs_np = np.empty((C, H, W), dtype=np.float32) if (want_labels and want_probs) else None
    scores = torch.zeros(C, device=logits.device)
    band = max(1, _BAND_ELEMENTS // (C * W))
    for a in range(0, H, band):
        b = min(H, a + band)
        up = _lerp(cols[:, r0[a:b]], rw0[a:b, None], cols[:, r1[a:b]], rw1[a:b, None])
        if allowed is not None:
            up.masked_fill_(~allowed[:, None, None], float("-inf"))
        p = torch.softmax(up, dim=0)
        scores = torch.maximum(scores, p.flatten(1).max(dim=1).values)
        if labels is not None:
            labels[a:b] = channel_argmax(up, 0).cpu().numpy()
        if probs_np is not None:
            probs_np[:, a:b] = p.cpu().numpy()
    return labels, scores.cpu().numpy(), probs_np


def _segments(i0: torch.Tensor, i1: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Start/end of the runs of output positions that share the same pair of source taps."""
    i0n, i1n = i0.cpu().numpy(), i1.cpu().numpy()
    change = np.flatnonzero((i0n[1:] != i0n[:-1]) | (i1n[1:] != i1n[:-1])) + 1
    starts = np.concatenate([[0], change])
    return starts, np.concatenate([change, [i0n.shape[0]]])


def _labels_by_cells(logits: torch.Tensor, rows_t: tuple, cols_t: tuple, allowed: Optional[torch.Tensor]) -> np.ndarray:
    """The label map of :func:`labels_from_logits`, interpolating only the grid cells whose four
    corners disagree on the class (see there)."""
    r0, r1, rw0, rw1 = rows_t
    c0, c1, cw0, cw1 = cols_t
    H, W = r0.shape[0], c0.shape[0]
    masked = logits if allowed is None else logits.masked_fill(~allowed[:, None, None], float("-inf"))
    corner = channel_argmax(masked, 0).cpu()  # h×w class of each grid point
    masked_cpu = masked.cpu()
    cs, ce = _segments(c0, c1)
    widths = ce - cs
    seg_c0, seg_c1 = c0.cpu()[cs], c1.cpu()[cs]
    rs, re = _segments(r0, r1)
    r0c, r1c = r0.cpu(), r1.cpu()
    labels = np.empty((H, W), dtype=np.int64)
    for a, b in zip(rs.tolist(), re.tolist()):
        y0, y1 = int(r0c[a]), int(r1c[a])
        k00, k01 = corner[y0, seg_c0], corner[y0, seg_c1]
        k10, k11 = corner[y1, seg_c0], corner[y1, seg_c1]
        agree = ((k00 == k01) & (k00 == k10) & (k00 == k11)).numpy()
        labels[a:b] = np.repeat(k00.numpy(), widths)[None, :]
        if agree.all():
            continue
        bad = torch.from_numpy(np.flatnonzero(~agree))
        # Inside a cell every class's interpolated logit lies between its corner values, so only
        # classes whose largest corner value reaches the best smallest corner value can win there.
        corners = torch.stack([masked_cpu[:, y0, seg_c0[bad]], masked_cpu[:, y0, seg_c1[bad]],
                               masked_cpu[:, y1, seg_c0[bad]], masked_cpu[:, y1, seg_c1[bad]]])  # 4×C×n
        hi, lo = corners.amax(0), corners.amin(0)
        cand = torch.nonzero((hi >= lo.amax(0, keepdim=True)).any(1)).squeeze(1)  # ascending class ids
        idx = torch.from_numpy(np.flatnonzero(np.repeat(~agree, widths))).to(logits.device)
        sub = logits[cand.to(logits.device)]
        t0 = _lerp(sub[:, y0, c0[idx]], cw0[idx], sub[:, y0, c1[idx]], cw1[idx])  # K×n: source row y0
        t1 = _lerp(sub[:, y1, c0[idx]], cw0[idx], sub[:, y1, c1[idx]], cw1[idx])
        idx_np = idx.cpu().numpy()
        cand_np = cand.numpy()
        band = max(1, _BAND_ELEMENTS // (len(cand_np) * idx_np.shape[0]))
        for u in range(a, b, band):
            v = min(b, u + band)
            up = _lerp(t0[:, None, :], rw0[u:v, None], t1[:, None, :], rw1[u:v, None])
            labels[u:v, idx_np] = cand_np[channel_argmax(up, 0).cpu().numpy()]
    return labels


def _nearest_resize_labels(labels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of an ``h×w`` label map to ``size`` (``H×W``)."""
    h, w = labels.shape
    H, W = size
    rows = np.minimum(np.arange(H, dtype=np.int64) * h // H, h - 1)
    cols = np.minimum(np.arange(W, dtype=np.int64) * w // W, w - 1)
    return labels[rows][:, cols]


class _EvalModeSegment:
    """``model.segment`` in eval mode without changing the caller's model: each call records the
    train/eval flag of every submodule, switches to eval, and puts the flags back afterwards."""

    def __init__(self, model: torch.nn.Module, precision: str):
        self.model = model
        self.precision = precision
        self._segment = model.segment

    def segment(self, x: torch.Tensor) -> torch.Tensor:
        return self._segment(x, precision=self.precision)  # type: ignore[operator]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        modules = list(self.model.modules())
        training = [m.training for m in modules]
        if not any(training):
            return self.segment(x)
        try:
            for m in modules:
                m.training = False
            return self.segment(x)
        finally:
            for m, t in zip(modules, training):
                m.training = t


class Segmenter:
    """Segment images with a WeCLIP model or an exported graph.

    ``Segmenter(model)`` wraps an eager ``WeCLIP``; ``Segmenter.from_pretrained(path)`` loads one
    of our checkpoint directories, an exported bundle (``manifest.json``: TorchScript or ONNX) or
    an unpacked ``.mar``. Options (defaults from the model config): ``scales``, ``flip``,
    ``crf``, ``long_side``, ``precision`` (``fp32`` or ``bf16`` arithmetic of the network;
    bf16 needs an eager model); ``crf_backend`` (``auto`` = the torch CRF on the model's device,
    ``torch``, or ``densecrf`` = pydensecrf) and ``crf_max_pixels`` (the largest image refined at
    full resolution); ``max_pixels`` (largest image decoded); ``device`` auto-selects CUDA.

    The caller's model is used as it is: it is never moved and its train/eval state is left
    alone (each forward runs in eval mode and restores the flags). Only when ``device`` names
    another device than the model's is a copy made there (one more model in memory).
    ``normalize``, ``patch_size`` and ``class_names`` come from the model; passing a different
    value together with a model is an error.
    """

    def __init__(self, model=None, *, backend: Optional[Backend] = None, class_names: Optional[Sequence[str]] = None,
                 scales: Optional[Sequence[float]] = None, flip: Optional[bool] = None, crf: Optional[bool] = None,
                 long_side: Optional[int] = None, normalize: Optional[str] = None, patch_size: Optional[int] = None,
                 device=None, max_pixels: int = DEFAULT_MAX_PIXELS, crf_backend: str = "auto",
                 crf_max_pixels: int = DEFAULT_CRF_MAX_PIXELS, precision: Optional[str] = None):
        from .config import PRECISIONS
        from .model import select_device

        if model is None and backend is None:
            raise ValueError("Segmenter needs a model or a backend")
        if model is not None and backend is not None:
            raise ValueError("Segmenter takes a model or a backend, not both")
        inf = model.cfg.inference if model is not None else None
        self.scales = tuple(float(s) for s in (scales if scales is not None else (inf.scales if inf else (1.0, 0.75))))
        self.flip = bool(flip if flip is not None else (inf.flip if inf else True))
        self.crf = bool(crf if crf is not None else (inf.crf if inf else False))
        self.long_side = int(long_side if long_side is not None else (inf.long_side if inf else 512))
        self.precision = str(precision if precision is not None else (inf.precision if inf else "fp32"))
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        if model is None and self.precision != "fp32":
            raise ValueError("precision='bf16' needs an eager model (a checkpoint directory); exported graphs run "
                             "in fp32")
        if model is not None:
            own = {"normalize": model.cfg.backbone.normalize, "patch_size": int(model.backbone.patch_size),
                   "class_names": ["background", *model.classes.names]}
            given = {"normalize": normalize, "patch_size": patch_size,
                     "class_names": list(class_names) if class_names is not None else None}
            for key, value in given.items():
                if value is not None and value != own[key]:
                    raise ValueError(f"Segmenter: {key}={value!r} conflicts with the model's {own[key]!r}; "
                                     f"with a model, leave {key} unset (it comes from the model's config)")
            normalize, patch_size, class_names = own["normalize"], own["patch_size"], own["class_names"]
            current = next(model.parameters()).device
            self.device = current if device is None else select_device(device)
            if self.device != current:
                model = copy.deepcopy(model).to(self.device)  # the caller's model stays where it is
            backend = _EvalModeSegment(model, self.precision)
        else:
            self.device = select_device(device)
        self.model = model
        assert backend is not None  # a model or a backend was checked above
        self.backend: Backend = backend
        self.patch_size = int(patch_size if patch_size is not None else 16)
        self.class_names = list(class_names) if class_names is not None else None
        mean, std = mean_std(normalize if normalize is not None else "imagenet")
        self._mean = torch.tensor(mean, dtype=torch.float32).reshape(1, 3, 1, 1)
        self._std = torch.tensor(std, dtype=torch.float32).reshape(1, 3, 1, 1)
        self.max_pixels = self._positive_int(max_pixels, "max_pixels")
        self.crf_max_pixels = self._positive_int(crf_max_pixels, "crf_max_pixels")
        from .crf import CRF_BACKENDS

        if crf_backend not in CRF_BACKENDS:
            raise ValueError(f"crf_backend must be one of {', '.join(CRF_BACKENDS)}, got {crf_backend!r}")
        self.crf_backend = crf_backend
        # Runs each CRF refinement (a thunk); None runs it in place. A server that answers
        # several requests from threads sets it to hand the work to one thread (serving.batching).
        self.crf_runner: Optional[Callable[[Callable[[], Any]], Any]] = None
        self._validate(self.scales, self.flip, self.crf)

    @staticmethod
    def _positive_int(value, key: str) -> int:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{key} must be a positive integer (pixels), got {value!r}")
        return int(value)

    # ---- construction ---------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: Union[str, Path], device=None, backend: str = "auto", **options) -> "Segmenter":
        """Load from our checkpoint directory or an exported bundle directory (``manifest.json``).

        ``backend`` for a bundle: ``auto`` | ``torchscript`` | ``onnx``. For a checkpoint directory:
        ``eager`` (PyTorch), ``onnx`` (ONNX Runtime on an export cached by content, see
        :mod:`weclip_infer.onnx_cache`) or ``auto``, which picks by processor
        (:func:`weclip_infer.hardware.inference_path`; the environment variable ``WECLIP_BACKEND``
        overrides it) and logs the choice. ``precision="bf16"`` (or a checkpoint whose
        ``inference.precision`` is bf16) runs eager: the exported graphs are fp32.
        """
        p = Path(path)
        if (p / "manifest.json").is_file():
            from .bundle import load_bundle_backend

            fn, meta, dev = load_bundle_backend(p, backend=backend, device=device)
            inf = meta.get("inference", {})
            opts = {"scales": inf.get("scales"), "flip": inf.get("flip"), "crf": inf.get("crf"),
                    "long_side": inf.get("long_side")}
            opts.update({k: v for k, v in options.items()})
            return cls(backend=fn, class_names=meta["class_names"], normalize=meta.get("normalize", "imagenet"),
                       patch_size=meta.get("patch_size", 16), device=dev, **opts)
        if backend not in CHECKPOINT_BACKENDS:
            raise ValueError(f"backend {backend!r} needs an export bundle (manifest.json); for a checkpoint "
                             f"directory use one of {CHECKPOINT_BACKENDS}")
        precision = options.get("precision")
        # auto and onnx depend on the checkpoint's own inference.precision; eager runs either
        if precision is None and backend != "eager":
            from .checkpoint import read_checkpoint_meta

            inf_cfg = read_checkpoint_meta(p)["config"].get("inference")
            precision = inf_cfg.get("precision", "fp32") if isinstance(inf_cfg, dict) else "fp32"
        if backend == "auto":
            from .hardware import inference_path
            from .model import select_device

            backend, reason = inference_path(str(select_device(device)), precision=str(precision))
            override = os.environ.get("WECLIP_BACKEND", "").strip().lower()
            if override:
                if override not in ("eager", "onnx"):
                    raise ValueError(f"WECLIP_BACKEND: must be 'eager' or 'onnx', got {override!r}")
                backend, reason = override, f"set by WECLIP_BACKEND={override}"
            log.info("inference path for %s: %s (%s)", p, backend, reason)
        if backend == "onnx" and precision != "fp32":
            raise ValueError(f"precision={precision!r} runs in eager PyTorch; the ONNX Runtime path is fp32 "
                             "(use backend='eager' or 'auto')")
        if backend == "onnx":
            from .onnx_cache import cached_onnx_bundle

            return cls.from_pretrained(cached_onnx_bundle(p), device=device, backend="onnx", **options)
        from .checkpoint import load_checkpoint

        model = load_checkpoint(p, device=device)
        return cls(model, **options)

    @staticmethod
    def _validate(scales, flip, crf) -> None:
        from .config import validate_scales

        validate_scales(list(scales), "scales")
        if not isinstance(flip, bool) or not isinstance(crf, bool):
            raise ValueError("flip and crf must be booleans")

    def request_cost(self, hw: tuple[int, int], scales: Optional[Sequence[float]] = None,
                     flip: Optional[bool] = None) -> float:
        """The network work of ``predict`` on an ``H×W`` image with these ``scales``/``flip``,
        relative to this Segmenter's own options on the same image (1.0 = the default request;
        :func:`network_cost`). Servers use it to bound what one request may ask for."""
        scales = tuple(float(s) for s in scales) if scales is not None else self.scales
        flip = self.flip if flip is None else flip
        own = network_cost(hw, self.long_side, self.patch_size, self.scales, self.flip)
        return network_cost(hw, self.long_side, self.patch_size, scales, flip) / own

    # ---- inference ------------------------------------------------------------------------------
    def preprocess(self, image: np.ndarray) -> torch.Tensor:
        """``H×W×3`` uint8 → normalised ``1×3×H×W`` on the device, resized to the long side.

        Above ``_GATHER_PIXELS`` pixels only the image rows and columns that the bilinear resize
        reads are converted to float (the cost follows the network size, not the image size)."""
        arr = np.ascontiguousarray(image)
        H, W = arr.shape[:2]
        if self.long_side and H * W > _GATHER_PIXELS:
            f = self.long_side / max(H, W)
            h, w = max(int(H * f), 1), max(int(W * f), 1)
            r0, r1, rw0, rw1 = _linear_taps(H, h, "cpu")
            c0, c1, cw0, cw1 = _linear_taps(W, w, "cpu")

            def rows(idx: torch.Tensor) -> torch.Tensor:  # h×W×3 normalised, then resized along the width
                x = torch.from_numpy(arr[idx.numpy()]).float()
                x.sub_(self._mean.view(1, 1, 3)).div_(self._std.view(1, 1, 3))
                return _lerp(x[:, c0], cw0[:, None], x[:, c1], cw1[:, None])

            small = _lerp(rows(r0), rw0[:, None, None], rows(r1), rw1[:, None, None])  # h×w×3
            return small.permute(2, 0, 1)[None].contiguous().to(self.device)
        if not arr.flags.writeable:
            arr = arr.copy()
        if self.device.type != "cpu":
            # The uint8 image goes to the device (a quarter of the float bytes, queued without
            # waiting for the device) and is normalised there: the same arithmetic as below.
            x = to_device(torch.from_numpy(arr), self.device).permute(2, 0, 1)[None].float()
            mean, std = self._device_norm()
            x.sub_(mean).div_(std)
            return resize_long_side(x, self.long_side)
        x = torch.from_numpy(arr).permute(2, 0, 1)[None].float()
        x.sub_(self._mean).div_(self._std)  # in place: one float copy of the image, not three
        return resize_long_side(x, self.long_side)

    def _device_norm(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalisation mean and std on the model's device (copied there once)."""
        cached = self.__dict__.get("_norm_on_device")
        if cached is None or cached[0] != self.device:
            cached = (self.device, to_device(self._mean, self.device), to_device(self._std, self.device))
            self.__dict__["_norm_on_device"] = cached
        return cached[1], cached[2]

    @torch.inference_mode()
    def predict_logits(self, image: np.ndarray, scales=None, flip=None, timings: Optional[dict] = None) -> torch.Tensor:
        """Fused logits ``C×h×w`` (scale-1 grid) for an ``H×W×3`` uint8 image.

        Images with a side below the patch size after resizing (aspect ratios beyond ~30:1) are
        padded with their edge pixels first; the logits are cut back to the cells that cover the
        image."""
        scales = tuple(scales or self.scales)
        x = self.preprocess(image)
        x, (H, W) = pad_to_patch(x, scales, self.patch_size)
        flip = self.flip if flip is None else flip
        logits = fuse_multiscale(self.backend, x, scales, flip, self.patch_size, timings)[0]
        Hp, Wp = x.shape[-2:]
        if (Hp, Wp) != (H, W):
            h, w = logits.shape[-2:]
            logits = logits[:, : max(1, math.ceil(h * H / Hp)), : max(1, math.ceil(w * W / Wp))]
        return logits

    def predict(self, image: ImageSource, *, scales: Optional[Sequence[float]] = None, flip: Optional[bool] = None,
                crf: Optional[bool] = None, labels_hint: Optional[Sequence[Union[int, str]]] = None,
                keep_probs: bool = False) -> SegmentationResult:
        """Segment one image (path, bytes, PIL image or array; any mode, EXIF-rotated).

        ``labels_hint``: class ids (1-based) or names that may appear; output is restricted to
        them plus background. ``keep_probs``: also return the ``C×H0×W0`` probabilities (e.g. to
        run a CRF elsewhere; ``4·C`` bytes per pixel). Returns a ``SegmentationResult`` at the
        original resolution.
        """
        scales = tuple(float(s) for s in scales) if scales is not None else self.scales
        flip = self.flip if flip is None else flip
        crf = self.crf if crf is None else crf
        self._validate(scales, flip, crf)
        timings: dict = {}
        t0 = time.perf_counter()
        img = load_image(image, max_pixels=self.max_pixels)
        timings["decode"] = time.perf_counter() - t0
        logits = self.predict_logits(img, scales, flip, timings)
        t1 = time.perf_counter()
        H0, W0 = img.shape[:2]
        allowed = self._hint_mask(labels_hint, logits.shape[0]) if labels_hint is not None else None
        crf_full = crf and H0 * W0 <= self.crf_max_pixels
        crf_on_device = False
        if crf_full:
            from .crf import resolve_crf_backend

            crf_on_device = resolve_crf_backend(self.crf_backend) == "torch"
        crf_probs: Union[np.ndarray, torch.Tensor, None] = None
        scores_t = None
        with torch.inference_mode():
            if crf_on_device:
                # The torch CRF refines on the model's device: its input is made there (the
                # arithmetic of labels_from_logits' one-piece map), and only the CRF's label map
                # and the scores come back (the probabilities too with keep_probs).
                crf_probs = torch.softmax(_upsampled_logits(logits, (H0, W0), allowed), dim=0)
                scores_t = crf_probs.flatten(1).max(dim=1).values
                probs_np = crf_probs.cpu().numpy() if keep_probs else None
            else:
                labels, scores, probs_np = labels_from_logits(logits, (H0, W0), allowed,
                                                              keep_probs=keep_probs or crf_full)
                crf_probs = probs_np if crf_full else None
        timings["fuse"] = time.perf_counter() - t1
        crf_size = None
        if crf:
            t2 = time.perf_counter()
            labels, crf_size = self._crf(img, logits, allowed, crf_probs)
            timings["crf"] = time.perf_counter() - t2
        if scores_t is not None:
            scores = scores_t.cpu().numpy()
        timings["total"] = time.perf_counter() - t0
        names = self.class_names or [str(i) for i in range(logits.shape[0])]
        return SegmentationResult(labels, scores, logits.cpu(), names, timings, probs_np if keep_probs else None,
                                  crf_size)

    def _crf(self, img: np.ndarray, logits: torch.Tensor, allowed: Optional[torch.Tensor],
             probs: Union[np.ndarray, torch.Tensor, None]) -> tuple[np.ndarray, tuple[int, int]]:
        """DenseCRF labels at the original size. Images above ``crf_max_pixels`` are refined at a
        reduced size (same aspect ratio, antialiased image, probabilities resized from the
        logits) and the refined label map is scaled up with nearest neighbour. With the torch
        backend the work is also capped by content: an image whose colours spread over more
        than ``CRF_VERTICES_PER_PIXEL × crf_max_pixels`` lattice vertices (noise-like content,
        where a fully connected CRF costs most) is refined at the size that fits. ``probs``: the
        full-size probabilities when the image is within ``crf_max_pixels`` (for the torch
        backend a tensor on the model's device, whose label map alone comes back to the host)."""
        from PIL import Image

        from .crf import refine, refine_labels, resolve_crf_backend
        from .crf.permutohedral import LatticeTooLargeError

        backend = resolve_crf_backend(self.crf_backend)
        H0, W0 = img.shape[:2]
        budget = min(self.crf_max_pixels, H0 * W0)
        max_vertices = int(CRF_VERTICES_PER_PIXEL * self.crf_max_pixels)
        for _ in range(4):
            if probs is not None and budget >= H0 * W0:
                hc, wc, small = H0, W0, img
                p = probs if isinstance(probs, torch.Tensor) else torch.from_numpy(probs)
            else:
                f = math.sqrt(budget / (H0 * W0))
                hc, wc = max(1, int(H0 * f)), max(1, int(W0 * f))
                small = np.asarray(Image.fromarray(img).resize((wc, hc), Image.Resampling.BILINEAR))
                with torch.inference_mode():
                    p = torch.softmax(_upsampled_logits(logits, (hc, wc), allowed), dim=0)
            def run_crf(small=small, p=p):
                with torch.inference_mode():
                    if backend == "torch":  # the label map, on the device
                        small_t = torch.from_numpy(np.require(small, requirements=["C", "W"])).to(self.device)
                        return refine_labels(small_t, p.to(self.device), max_vertices=max_vertices)
                    return refine(small, p.cpu().numpy(), backend)  # the marginals, numpy

            try:
                out = run_crf() if self.crf_runner is None else self.crf_runner(run_crf)
                break
            except LatticeTooLargeError as e:  # shrink so that the vertex count fits, then retry
                budget = max(1, int(hc * wc * 0.9 * max_vertices / e.vertices))
        else:
            raise RuntimeError("CRF: the image is too complex to refine within the CRF budget")
        labels = out.cpu().numpy() if isinstance(out, torch.Tensor) else out.argmax(0).astype(np.int64)
        if (hc, wc) != (H0, W0):
            labels = _nearest_resize_labels(labels, (H0, W0))
        return labels, (hc, wc)

    def _hint_mask(self, hint: Sequence[Union[int, str]], C: int) -> torch.Tensor:
        allowed = torch.zeros(C, dtype=torch.bool)
        allowed[0] = True
        for h in hint:
            if isinstance(h, str):
                if not self.class_names or h not in self.class_names:
                    raise ValueError(f"labels_hint: unknown class name {h!r}")
                idx = self.class_names.index(h)
            else:
                idx = int(h)
            if not 0 <= idx < C:
                raise ValueError(f"labels_hint: class id {idx} out of range [0, {C})")
            allowed[idx] = True
        return allowed

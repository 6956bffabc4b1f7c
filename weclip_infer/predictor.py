"""``Segmenter``: image in → label map + per-class scores out (spec §8).

One object, loaded once. Pre-processing (decode, normalise, resize), the multi-scale + flip
fusion, the optional DenseCRF and the label hint exist only here; the batch CLI, the evaluation
CLI, training-time evaluation and the TorchServe handler all call it. The network itself is a
*backend*: a callable ``B×3×H×W`` normalised → ``B×C×(H//p)×(W//p)`` logits — the eager model's
``segment`` or an exported TorchScript / ONNX Runtime graph.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from .normalization import mean_std
from .imageio import DEFAULT_MAX_PIXELS, ImageSource, load_image
from .tensor_ops import channel_argmax

__all__ = ["SegmentationResult", "Segmenter", "fuse_multiscale", "resize_long_side", "CHECKPOINT_BACKENDS"]

log = logging.getLogger(__name__)

#: backends that can run one of our checkpoint directories (bundles also take ``torchscript``)
CHECKPOINT_BACKENDS = ("auto", "eager", "onnx")

Backend = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class SegmentationResult:
    """Output of ``Segmenter.predict``.

    ``labels``: ``H0×W0`` int64 class indices at the original resolution (0 = background);
    ``scores``: ``C`` per-class confidence (max softmax probability over pixels);
    ``logits``: ``C×h×w`` fused logits on the scale-1 patch grid (torch, CPU);
    ``class_names``: names incl. ``"background"`` first; ``timings``: seconds per stage.
    """

    labels: np.ndarray
    scores: np.ndarray
    logits: torch.Tensor
    class_names: list
    timings: dict = field(default_factory=dict)
    probs: Optional[np.ndarray] = None  # ``C×H0×W0`` softmax, only with ``predict(keep_probs=True)``

    def areas(self) -> dict:
        """Pixel count per present class name."""
        ids, counts = np.unique(self.labels, return_counts=True)
        return {self.class_names[i] if i < len(self.class_names) else str(i): int(c) for i, c in zip(ids, counts)}


def resize_long_side(x: torch.Tensor, long_side: int) -> torch.Tensor:
    """Spec §8.1 step 2: scale ``B×3×H×W`` so that ``max(H, W) == long_side`` (bilinear,
    ``align_corners=False``, sizes truncated with ``int``; small images are upscaled)."""
    if not long_side:
        return x
    H, W = x.shape[-2:]
    f = long_side / max(H, W)
    size = (max(int(H * f), 1), max(int(W * f), 1))
    if size == (H, W):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def fuse_multiscale(backend: Backend, x: torch.Tensor, scales: Sequence[float] = (1.0, 0.75), flip: bool = True,
                    patch: int = 16, timings: Optional[dict] = None) -> torch.Tensor:
    """Spec §8.1 steps 3–6 for one image ``1×3×H×W`` (already resized to the long side).

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
    fused = [o if o.shape[-2:] == grid else F.interpolate(o, size=grid, mode="bilinear", align_corners=False) for o in outs]
    return torch.stack(fused, 0).mean(0)


class Segmenter:
    """Segment images with a WeCLIP model or an exported graph.

    ``Segmenter(model)`` wraps an eager ``WeCLIP``; ``Segmenter.from_pretrained(path)`` loads one
    of our checkpoint directories, an exported bundle (``manifest.json``: TorchScript or ONNX) or
    an unpacked ``.mar``. Options (defaults from the model config, spec §8): ``scales``,
    ``flip``, ``crf``, ``long_side``; ``device`` auto-selects CUDA when available.
    """

    def __init__(self, model=None, *, backend: Optional[Backend] = None, class_names: Optional[Sequence[str]] = None,
                 scales: Optional[Sequence[float]] = None, flip: Optional[bool] = None, crf: Optional[bool] = None,
                 long_side: Optional[int] = None, normalize: str = "imagenet", patch_size: int = 16,
                 device=None, max_pixels: int = DEFAULT_MAX_PIXELS):
        from .model import select_device

        if model is None and backend is None:
            raise ValueError("Segmenter needs a model or a backend")
        self.model = model
        inf = model.cfg.inference if model is not None else None
        self.scales = tuple(float(s) for s in (scales if scales is not None else (inf.scales if inf else (1.0, 0.75))))
        self.flip = bool(flip if flip is not None else (inf.flip if inf else True))
        self.crf = bool(crf if crf is not None else (inf.crf if inf else False))
        self.long_side = int(long_side if long_side is not None else (inf.long_side if inf else 512))
        if model is not None:
            normalize = model.cfg.backbone.normalize
            patch_size = model.backbone.patch_size
            class_names = ["background", *model.classes.names]
            self.device = next(model.decoder.parameters()).device if device is None else select_device(device)
            model.to(self.device).eval()
            backend = model.segment
        else:
            self.device = select_device(device)
        self.backend = backend
        self.patch_size = int(patch_size)
        self.class_names = list(class_names) if class_names is not None else None
        mean, std = mean_std(normalize)
        self._mean = torch.tensor(mean, dtype=torch.float32).reshape(1, 3, 1, 1)
        self._std = torch.tensor(std, dtype=torch.float32).reshape(1, 3, 1, 1)
        self.max_pixels = max_pixels
        self._validate(self.scales, self.flip, self.crf)

    # ---- construction ---------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: Union[str, Path], device=None, backend: str = "auto", **options) -> "Segmenter":
        """Load from our checkpoint directory or an exported bundle directory (``manifest.json``).

        ``backend`` for a bundle: ``auto`` | ``torchscript`` | ``onnx``. For a checkpoint directory:
        ``eager`` (PyTorch), ``onnx`` (ONNX Runtime on an export cached by content, see
        :mod:`weclip_infer.onnx_cache`) or ``auto``, which picks by processor
        (:func:`weclip_infer.hardware.inference_path`; the environment variable ``WECLIP_BACKEND``
        overrides it) and logs the choice.
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
        if backend == "auto":
            from .hardware import inference_path
            from .model import select_device

            backend, reason = inference_path(str(select_device(device)))
            override = os.environ.get("WECLIP_BACKEND", "").strip().lower()
            if override:
                if override not in ("eager", "onnx"):
                    raise ValueError(f"WECLIP_BACKEND: must be 'eager' or 'onnx', got {override!r}")
                backend, reason = override, f"set by WECLIP_BACKEND={override}"
            log.info("inference path for %s: %s (%s)", p, backend, reason)
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

    # ---- inference ------------------------------------------------------------------------------
    def preprocess(self, image: np.ndarray) -> torch.Tensor:
        """``H×W×3`` uint8 → normalised ``1×3×H×W`` on the device, resized to the long side."""
        arr = np.ascontiguousarray(image)
        if not arr.flags.writeable:
            arr = arr.copy()
        x = torch.from_numpy(arr).permute(2, 0, 1)[None].float()
        x = (x - self._mean) / self._std
        return resize_long_side(x.to(self.device), self.long_side)

    @torch.inference_mode()
    def predict_logits(self, image: np.ndarray, scales=None, flip=None, timings: Optional[dict] = None) -> torch.Tensor:
        """Fused logits ``C×h×w`` (scale-1 grid) for an ``H×W×3`` uint8 image."""
        x = self.preprocess(image)
        return fuse_multiscale(self.backend, x, scales or self.scales, self.flip if flip is None else flip,
                               self.patch_size, timings)[0]

    def predict(self, image: ImageSource, *, scales: Optional[Sequence[float]] = None, flip: Optional[bool] = None,
                crf: Optional[bool] = None, labels_hint: Optional[Sequence[Union[int, str]]] = None,
                keep_probs: bool = False) -> SegmentationResult:
        """Segment one image (path, bytes, PIL image or array; any mode, EXIF-rotated).

        ``labels_hint``: class ids (1-based) or names that may appear; output is restricted to
        them plus background. ``keep_probs``: also return the ``C×H0×W0`` probabilities (e.g. to
        run :func:`crf_labels` elsewhere). Returns a ``SegmentationResult`` at the original resolution.
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
        with torch.inference_mode():
            up = F.interpolate(logits[None], size=(H0, W0), mode="bilinear", align_corners=False)[0]
            if labels_hint is not None:
                allowed = self._hint_mask(labels_hint, up.shape[0])
                up = up.masked_fill(~allowed.to(up.device)[:, None, None], float("-inf"))
            probs = torch.softmax(up, dim=0)
            scores = probs.flatten(1).max(dim=1).values.cpu().numpy()
            labels = channel_argmax(up, 0).cpu().numpy().astype(np.int64)
        timings["fuse"] = time.perf_counter() - t1
        probs_np = probs.cpu().numpy() if (crf or keep_probs) else None
        if crf:
            from .crf import crf_labels

            labels, timings["crf"] = crf_labels(img, probs_np)
        timings["total"] = time.perf_counter() - t0
        names = self.class_names or [str(i) for i in range(logits.shape[0])]
        return SegmentationResult(labels, scores, logits.cpu(), names, timings, probs_np if keep_probs else None)

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

"""Image normalisation and the training augmentation of WeCLIP.

The training augmentation follows the authors' ``datasets/transforms.py`` + ``datasets/voc.py``
exactly, in this order:

1. random rescale, ratio ``r ~ U(0.5, 2.0)``, new size ``(int(r·W0), int(r·H0))``, PIL bilinear
   on the uint8 image (nearest for the GT mask);
2. horizontal flip with probability 0.5 (the reference flips when ``random() > 0.5``);
3. random 320×320 crop; an image smaller than 320 in a dimension is first placed at a uniformly
   random offset inside a zero-filled (black) canvas of size max(320,H)×max(320,W) — the GT mask
   is padded with 255 (ignore);
4. normalise with the ImageNet mean/std on 0..255 RGB, HWC → CHW.

There is no colour jitter and the padded area is black *before*
normalisation, so it reads ≈ (−2.118, −2.036, −1.804) afterwards.

Randomness comes from one generator passed to ``__call__``: a ``random.Random`` (the reference
uses python's ``random`` for scale/flip/crop and ``np.random`` for the pad offset; we draw all of
them from the one generator, in the reference's order), a ``numpy.random.Generator``, or an int
seed.
"""
from __future__ import annotations

import random
from typing import Optional, Tuple, Union

import numpy as np
import torch
from PIL import Image

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "CLIP_MEAN",
    "CLIP_STD",
    "NORMALIZATIONS",
    "IGNORE_INDEX",
    "CropBox",
    "RandomSource",
    "normalize",
    "denormalize",
    "TrainTransform",
    "EvalTransform",
]

# Normalisation constants: owned by weclip_infer.normalization, re-exported for the data API.
from ..normalization import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, NORMALIZATIONS  # noqa: E402
from ..normalization import mean_std as _named_mean_std  # noqa: E402

IGNORE_INDEX = 255  # GT-mask value for "ignore" and for the padded area of a crop

#: ``(h_start, h_end, w_start, w_end)`` of the valid (non-padded) image region inside the output,
#: end-exclusive (the reference's ``img_box``). Training does not need it; it tells a caller
#: where the image lies inside a padded crop.
CropBox = Tuple[int, int, int, int]
RandomSource = Union[random.Random, np.random.Generator, int, None]


def _mean_std(kind: str) -> Tuple[np.ndarray, np.ndarray]:
    mean, std = _named_mean_std(kind)
    return np.asarray(mean, dtype=np.float32), np.asarray(std, dtype=np.float32)


def normalize(img: np.ndarray, kind: str = "imagenet") -> np.ndarray:
    """Normalise an RGB image on the 0..255 scale.

    ``img``: H×W×3 (uint8 or float, values 0..255). Returns a contiguous float32 array 3×H×W,
    ``(img − mean) / std`` per channel, computed in float32 like the reference ``normalize_img``.
    """
    arr = np.asarray(img)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"normalize: expected an H×W×3 image, got shape {arr.shape}")
    mean, std = _mean_std(kind)
    out = (arr.astype(np.float32) - mean) / std
    return np.ascontiguousarray(out.transpose(2, 0, 1))


def denormalize(chw: Union[np.ndarray, torch.Tensor], kind: str = "imagenet") -> np.ndarray:
    """Inverse of :func:`normalize`: 3×H×W float → H×W×3 uint8 (rounded, clipped). For display."""
    arr = chw.detach().cpu().numpy() if isinstance(chw, torch.Tensor) else np.asarray(chw)
    mean, std = _mean_std(kind)
    hwc = arr.transpose(1, 2, 0).astype(np.float32) * std + mean
    return np.clip(np.rint(hwc), 0, 255).astype(np.uint8)


class _Rng:
    """Uniform interface over ``random.Random`` / ``numpy.random.Generator`` (python-random style)."""

    def __init__(self, rng: RandomSource):
        if rng is None:
            rng = random.Random()
        elif isinstance(rng, (int, np.integer)) and not isinstance(rng, bool):
            rng = random.Random(int(rng))
        if not isinstance(rng, (random.Random, np.random.Generator)):
            raise TypeError(f"rng must be random.Random, numpy.random.Generator, int or None, got {type(rng).__name__}")
        self._r = rng

    def uniform(self, a: float, b: float) -> float:
        return float(self._r.uniform(a, b))

    def random(self) -> float:
        return float(self._r.random())

    def randint(self, n: int) -> int:
        """Uniform integer in ``[0, n)`` (``n ≥ 1``)."""
        if isinstance(self._r, random.Random):
            return self._r.randrange(0, n)
        return int(self._r.integers(0, n))


def _check_inputs(img: np.ndarray, mask: Optional[np.ndarray]) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    img = np.asarray(img)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"expected an H×W×3 image, got shape {img.shape}")
    if img.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got dtype {img.dtype}")
    if mask is not None:
        mask = np.asarray(mask)
        if mask.shape != img.shape[:2]:
            raise ValueError(f"mask shape {mask.shape} does not match image shape {img.shape[:2]}")
    return img, mask


def _mask_tensor(mask: Optional[np.ndarray]) -> Optional[torch.Tensor]:
    if mask is None:
        return None
    return torch.from_numpy(np.ascontiguousarray(mask).astype(np.int64))


class TrainTransform:
    """WeCLIP training augmentation: rescale → h-flip → random crop (zero pad) → normalise.

    ``crop_size``: side of the square crop (320); ``None`` disables cropping. ``scale_range``:
    ``(lo, hi)`` of the rescale ratio, ``None`` disables rescaling. ``flip``: random horizontal
    flip with p = 0.5. ``normalize``: ``"imagenet"`` (reference code) or ``"clip"``.

    ``__call__(img, rng, mask=None)`` with ``img`` H×W×3 uint8 and ``mask`` H×W integer (or None)
    returns ``(image, mask, box)``: image float32 tensor 3×S×S (S = crop_size), mask int64
    tensor S×S with 255 in the padded area (or None when no mask was given), and the
    ``CropBox`` of the valid region.
    """

    def __init__(
        self,
        crop_size: Optional[int] = 320,
        scale_range: Optional[Tuple[float, float]] = (0.5, 2.0),
        flip: bool = True,
        normalize: str = "imagenet",
    ):
        if crop_size is not None and int(crop_size) < 1:
            raise ValueError(f"crop_size must be ≥ 1, got {crop_size}")
        if scale_range is not None:
            lo, hi = float(scale_range[0]), float(scale_range[1])
            if not (0 < lo <= hi):
                raise ValueError(f"scale_range must satisfy 0 < lo ≤ hi, got {scale_range}")
            scale_range = (lo, hi)
        _mean_std(normalize)  # validates the kind
        self.crop_size = None if crop_size is None else int(crop_size)
        self.scale_range = scale_range
        self.flip = bool(flip)
        self.normalize = normalize

    def __repr__(self) -> str:
        return (f"TrainTransform(crop_size={self.crop_size}, scale_range={self.scale_range}, "
                f"flip={self.flip}, normalize={self.normalize!r})")

    def __call__(
        self, img: np.ndarray, rng: RandomSource = None, mask: Optional[np.ndarray] = None
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor], CropBox]:
        img, mask = _check_inputs(img, mask)
        r = _Rng(rng)
        # 1. random rescale (reference `random_scaling` / `_img_rescaling`): PIL size is (W, H).
        if self.scale_range is not None:
            ratio = r.uniform(*self.scale_range)
            h0, w0 = img.shape[:2]
            new_size = (max(1, int(ratio * w0)), max(1, int(ratio * h0)))  # max(1, ·): tiny inputs only
            img = np.asarray(Image.fromarray(img).resize(new_size, resample=Image.Resampling.BILINEAR))
            if mask is not None:
                mask = np.asarray(Image.fromarray(mask.astype(np.uint8)).resize(new_size,
                                                                                 resample=Image.Resampling.NEAREST))

        # 2. random horizontal flip (reference `random_fliplr`: flip when random() > 0.5).
        if self.flip and r.random() > 0.5:
            img = img[:, ::-1]
            if mask is not None:
                mask = mask[:, ::-1]
        # 3. random crop with zero padding (reference `random_crop`, mean_rgb = [0, 0, 0]).
        h, w = img.shape[:2]
        if self.crop_size is not None:
            cs = self.crop_size
            big_h, big_w = max(cs, h), max(cs, w)
            h_pad = r.randint(big_h - h + 1)  # offset of the image inside the canvas
            w_pad = r.randint(big_w - w + 1)
            canvas = np.zeros((big_h, big_w, 3), dtype=np.uint8)  # black, before normalisation
            canvas[h_pad:h_pad + h, w_pad:w_pad + w] = img
            h0c = r.randint(big_h - cs + 1)  # crop window start
            w0c = r.randint(big_w - cs + 1)
            out_img = canvas[h0c:h0c + cs, w0c:w0c + cs]
            out_mask = None
            if mask is not None:
                mcanvas = np.full((big_h, big_w), IGNORE_INDEX, dtype=np.int64)
                mcanvas[h_pad:h_pad + h, w_pad:w_pad + w] = mask
                out_mask = mcanvas[h0c:h0c + cs, w0c:w0c + cs]
            box: CropBox = (
                max(h_pad - h0c, 0),
                min(cs, h + h_pad - h0c),
                max(w_pad - w0c, 0),
                min(cs, w + w_pad - w0c),
            )
        else:
            out_img, out_mask, box = img, mask, (0, h, 0, w)
        # 4. normalise, HWC → CHW.
        tensor = torch.from_numpy(normalize(out_img, self.normalize))
        return tensor, _mask_tensor(out_mask), box


class EvalTransform:
    """No augmentation: the normalised image at its original size.

    ``__call__(img, rng=None, mask=None)`` → ``(image 3×H×W float32, mask H×W int64 or None,
    (0, H, 0, W))``. ``rng`` is accepted (and ignored) so both transforms share one signature.
    """

    def __init__(self, normalize: str = "imagenet"):
        _mean_std(normalize)
        self.normalize = normalize

    def __repr__(self) -> str:
        return f"EvalTransform(normalize={self.normalize!r})"

    def __call__(
        self, img: np.ndarray, rng: RandomSource = None, mask: Optional[np.ndarray] = None
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor], CropBox]:
        img, mask = _check_inputs(img, mask)
        h, w = img.shape[:2]
        return torch.from_numpy(normalize(img, self.normalize)), _mask_tensor(mask), (0, h, 0, w)

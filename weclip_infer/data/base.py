"""The base dataset shared by VOC, COCO and custom folders, and the batch collate function.

See :mod:`weclip_infer.data.datasets` for the item layout and the determinism rules.
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from ..imageio import DEFAULT_MAX_PIXELS, ImageDecodeError, load_image
from ..labelmap import read_label_png
from .label_files import DatasetError, _report, labels_from_mask
from .transforms import IGNORE_INDEX, EvalTransform

__all__ = ["Sample", "SegmentationDataset", "collate", "mask_path"]

PathLike = Union[str, os.PathLike]
Transform = Callable[..., Any]


@dataclass(frozen=True)
class Sample:
    """One listed image. ``label`` None → derived from the GT mask at ``__getitem__``."""

    name: str
    image: Path
    mask: Optional[Path] = None
    label: Optional[np.ndarray] = None


class SegmentationDataset(Dataset):
    """Base: a list of :class:`Sample` + class names + a transform (see module docstring).

    ``class_names``: foreground names (length C−1); ``num_classes`` = C includes background.
    ``require_labels``: every item needs a non-empty image-level label (WeCLIP needs ≥ 1 class
    per image); False allows missing/empty labels (e.g. VOC ``test``).
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        class_names: Sequence[str],
        transform: Optional[Transform] = None,
        rng_seed: int = 0,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        require_labels: bool = True,
    ):
        if int(rng_seed) < 0:
            raise DatasetError(f"rng_seed must be ≥ 0, got {rng_seed}")
        self.samples: list[Sample] = list(samples)
        self.class_names: list[str] = list(class_names)
        self.num_classes: int = len(self.class_names) + 1
        self.transform: Transform = transform if transform is not None else EvalTransform()
        self.rng_seed = int(rng_seed)
        self.max_pixels = int(max_pixels)
        self.require_labels = bool(require_labels)
        self.epoch = 0
        if not self.samples:
            raise DatasetError(f"{type(self).__name__}: no images listed")
        self._check_files()
        self._check_labels()

    # ---- construction-time checks ------------------------------------------------------
    def _check_files(self) -> None:
        missing = [str(s.image) for s in self.samples if not s.image.is_file()]
        missing += [str(s.mask) for s in self.samples if s.mask is not None and not s.mask.is_file()]
        if missing:
            raise DatasetError(_report(f"{type(self).__name__}: listed files are missing", missing))

    def _check_labels(self) -> None:
        C1 = len(self.class_names)
        bad_len = [f"{s.name}: length {len(s.label)}" for s in self.samples
                   if s.label is not None and len(s.label) != C1]
        if bad_len:
            raise DatasetError(_report(f"label vectors must have length {C1} (foreground classes)", bad_len))
        bad_val = [s.name for s in self.samples if s.label is not None and not np.all((s.label == 0) | (s.label == 1))]
        if bad_val:
            raise DatasetError(_report("label vectors must contain only 0/1", bad_val))
        if self.require_labels:
            nolabel = [s.name for s in self.samples if s.label is None and s.mask is None]
            if nolabel:
                raise DatasetError(_report("images without an image-level label (not in the label file and no GT mask "
                                           "to derive it from)", nolabel))
            empty = [s.name for s in self.samples if s.label is not None and not s.label.any()]
            if empty:
                raise DatasetError(_report("images with an empty label set (WeCLIP needs ≥ 1 foreground class per "
                                           "image; pass require_labels=False for inference-only lists)", empty))

    # ---- public API --------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return [s.name for s in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose augmentation is drawn (seeds depend on (rng_seed, epoch, index))."""
        self.epoch = int(epoch)

    def item_rng(self, index: int) -> random.Random:
        """The per-item generator for ``index`` in the current epoch."""
        state = np.random.SeedSequence([self.rng_seed, self.epoch, int(index)]).generate_state(2, dtype=np.uint32)
        return random.Random((int(state[0]) << 32) | int(state[1]))

    def load_mask(self, sample: Sample, image_hw: Optional[tuple[int, int]] = None) -> Optional[np.ndarray]:
        """GT mask H×W uint8 of ``sample`` (None when it has none). Values must lie in
        0..C−1 or be 255; size must equal ``image_hw`` when given."""
        if sample.mask is None:
            return None
        path = str(sample.mask)
        arr = read_label_png(sample.mask)
        if arr.dtype != np.uint8:
            if arr.size and (arr.min() < 0 or arr.max() > 255):
                raise ImageDecodeError(path, f"mask values must be 0..255, found {arr.min()}..{arr.max()}")
            arr = arr.astype(np.uint8)
        if image_hw is not None and arr.shape != tuple(image_hw):
            raise DatasetError(f"{path}: mask size {arr.shape[1]}x{arr.shape[0]} does not match image "
                               f"{sample.image} size {image_hw[1]}x{image_hw[0]}")
        vals = np.unique(arr)
        bad = vals[(vals >= self.num_classes) & (vals != IGNORE_INDEX)]
        if bad.size:
            raise DatasetError(f"{path}: mask values {bad[:10].tolist()} are neither a class index "
                               f"0..{self.num_classes - 1} nor {IGNORE_INDEX}")
        return arr

    def cls_label(self, sample: Sample, mask: Optional[np.ndarray]) -> np.ndarray:
        """Multi-hot float32 [C−1] for ``sample`` (from the label file, else from the full GT mask)."""
        if sample.label is not None:
            label = sample.label
        elif mask is not None:
            label = labels_from_mask(mask, len(self.class_names))
        else:
            label = np.zeros(len(self.class_names), dtype=np.float32)
        if self.require_labels and not label.any():
            raise DatasetError(f"{sample.name}: empty label set (mask {sample.mask} has no foreground class); "
                               "WeCLIP needs ≥ 1 class per image")
        return label

    def __getitem__(self, index: int) -> dict[str, Any]:
        """Dict with ``name``, ``image`` (3×H×W float32), ``cls_label`` ([C−1] float32), ``mask``
        (H×W int64, all 255 without GT) and ``has_mask`` (bool)."""
        if index < 0:
            index += len(self)
        sample = self.samples[index]
        img = load_image(sample.image, self.max_pixels)
        mask = self.load_mask(sample, img.shape[:2])
        label = self.cls_label(sample, mask)  # from the whole image, before cropping
        image, mask_t, _ = self.transform(img, self.item_rng(index), mask)
        has_mask = mask_t is not None
        if mask_t is None:
            mask_t = torch.full(tuple(image.shape[1:]), IGNORE_INDEX, dtype=torch.int64)
        return {
            "name": sample.name,
            "image": image,
            "cls_label": torch.from_numpy(np.array(label, dtype=np.float32)),
            "mask": mask_t,
            "has_mask": has_mask,
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self)} images, {self.num_classes} classes, transform={self.transform!r})"



def mask_path(p: Path, require_masks: Optional[bool]) -> Optional[Path]:
    """The GT mask path to list for an image: ``None`` when masks are off (``require_masks=False``)
    or optional (``None``) and ``p`` does not exist; else ``p`` (a missing required file is then
    reported by the dataset's file check)."""
    if require_masks is False:
        return None
    if require_masks is None and not p.is_file():
        return None
    return p


def collate(batch: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Stack items of equal size: ``image`` B×3×H×W, ``cls_label`` B×(C−1), ``mask`` B×H×W,
    ``has_mask`` B (bool); ``name`` stays a list. Training crops are all
    320×320; evaluation images of different sizes need ``batch_size=1``."""
    if not batch:
        raise ValueError("collate: empty batch")
    shapes = {tuple(b["image"].shape) for b in batch}
    if len(shapes) > 1:
        raise ValueError(f"collate: images of different sizes {sorted(shapes)} cannot be stacked; "
                         "use batch_size=1 for evaluation at original size")
    return {
        "name": [b["name"] for b in batch],
        "image": torch.stack([b["image"] for b in batch]),
        "cls_label": torch.stack([b["cls_label"] for b in batch]),
        "mask": torch.stack([b["mask"] for b in batch]),
        "has_mask": torch.tensor([bool(b.get("has_mask", True)) for b in batch]),
    }

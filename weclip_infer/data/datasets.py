"""Datasets for WeCLIP training and evaluation: PASCAL VOC, COCO (VOC-style) and custom folders.

All datasets share :class:`SegmentationDataset`; ``__getitem__`` returns a dict

=============  ==============================================================================
``name``       str, the image id (VOC id, full ``COCO_train2014_…`` name, or the custom image's
               path relative to its root without extension)
``image``      float32 tensor 3×H×W, normalised; 3×320×320 with ``TrainTransform``
``cls_label``  float32 tensor [C−1], multi-hot image-level label, background excluded; index
               k ↔ class k+1, i.e. ascending class order
``mask``       int64 tensor H×W, GT segmentation (0 = background, 255 = ignore/padding); all
               255 when the image has no GT mask (sentinel)
``has_mask``   bool, whether ``mask`` is a real GT mask
=============  ==============================================================================

The GT mask is only for measuring pseudo-label / prediction mIoU; weak supervision never trains
on it. Construction checks that every listed file exists (reporting all missing paths at once)
but decodes no image; a corrupt image raises ``ImageDecodeError`` (naming the path) in
``__getitem__``.

Determinism: item ``i`` of epoch ``e`` draws its augmentation from a ``random.Random`` seeded by
``(rng_seed, e, i)`` (via ``numpy.random.SeedSequence``), so a run is reproducible whatever the
number of DataLoader workers. Call ``set_epoch(e)`` before creating each epoch's iterator (do not
use ``persistent_workers=True``, whose worker copies would not see the new epoch).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Union

from .base import Sample, SegmentationDataset, collate
from .custom import CustomFolderDataset
from .label_files import (
    IMAGE_EXTENSIONS,
    DatasetError,
    _find_file,
    labels_from_mask,
    load_class_names,
    load_cls_labels,
    read_split_file,
)
from .transforms import EvalTransform, TrainTransform
from .voc import COCO_CLASSES, VOC_CLASSES, COCODataset, VOCDataset

__all__ = [
    "DatasetError",
    "VOC_CLASSES",
    "COCO_CLASSES",
    "IMAGE_EXTENSIONS",
    "Sample",
    "SegmentationDataset",
    "VOCDataset",
    "COCODataset",
    "CustomFolderDataset",
    "build_dataset",
    "collate",
    "read_split_file",
    "load_cls_labels",
    "load_class_names",
    "labels_from_mask",
]

PathLike = Union[str, os.PathLike]

# --------------------------------------------------------------------------------------------
# factory
# --------------------------------------------------------------------------------------------

_KINDS = {"voc": VOCDataset, "coco": COCODataset, "custom": CustomFolderDataset}


def build_dataset(
    kind: str,
    root: PathLike,
    split: Optional[str] = None,
    *,
    augment: bool = False,
    crop_size: int = 320,
    scale_range: Optional[tuple[float, float]] = (0.5, 2.0),
    normalize: str = "imagenet",
    **kw: Any,
) -> SegmentationDataset:
    """Build a dataset by kind (``voc`` | ``coco`` | ``custom``).

    Without an explicit ``transform=`` keyword, ``augment=True`` gives
    ``TrainTransform(crop_size, scale_range, flip=True, normalize)`` and
    ``augment=False`` gives ``EvalTransform(normalize)``. ``split`` defaults to ``train_aug``
    (VOC) / ``train`` (COCO); custom datasets have no split (other keywords go to the class).
    """
    k = kind.lower()
    if k not in _KINDS:
        raise DatasetError(f"dataset kind must be one of {sorted(_KINDS)}, got {kind!r}")
    if kw.get("transform") is None:
        kw["transform"] = (TrainTransform(crop_size=crop_size, scale_range=scale_range, flip=True, normalize=normalize)
                           if augment else EvalTransform(normalize=normalize))
    if k == "custom":
        if split is not None:
            kw.setdefault("labels", _find_file(Path(root), [f"{split}.csv", f"{split}.json"]))
        return CustomFolderDataset(root, **kw)
    if split is not None:
        kw["split"] = split
    return _KINDS[k](root, **kw)



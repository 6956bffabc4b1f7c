"""PASCAL VOC 2012 and MS COCO 2014 in the VOC-style layout: one loader, two file layouts."""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

from ..classes import COCO_CLASSES as _COCO
from ..classes import VOC_CLASSES as _VOC
from ..imageio import DEFAULT_MAX_PIXELS
from .base import Sample, SegmentationDataset, mask_path
from .label_files import DatasetError, _find_file, _labels_for, _resolve_split, load_cls_labels, read_split_file

__all__ = ["VOC_CLASSES", "COCO_CLASSES", "VOCDataset", "COCODataset"]

PathLike = Union[str, os.PathLike]
Transform = Callable[..., Any]

# Plain class names, foreground only, index i ↔ label i+1; the lists live in weclip_infer.classes.
VOC_CLASSES: tuple[str, ...] = tuple(_VOC)
COCO_CLASSES: tuple[str, ...] = tuple(_COCO)


class _VOCStyleDataset(SegmentationDataset):
    """A split list of image ids under ``root`` + an optional image-level label file + GT masks.

    Subclasses give the class list, the default split and mask folder, and where an id's image
    and mask live (:meth:`_files`). Labels: ``labels_file``, else ``<root>/cls_labels.json`` or
    ``<root>/cls_labels_onehot.npy``; ids missing from it (or when there is none) take their
    classes from the GT mask. ``require_masks``: None = use a GT mask when its file exists;
    True = every listed id must have one; False = ignore masks.
    """

    CLASS_NAMES: tuple[str, ...] = ()
    DEFAULT_SPLIT = "train"
    _alt_key: Optional[Callable[[str], str]] = None  # a second key to look ids up in the label file

    def __init__(
        self,
        root: PathLike,
        split: Optional[str] = None,
        split_file: Optional[PathLike] = None,
        labels_file: Optional[PathLike] = None,
        transform: Optional[Transform] = None,
        rng_seed: int = 0,
        *,
        require_masks: Optional[bool] = None,
        require_labels: bool = True,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        image_dir: str = "JPEGImages",
        mask_dir: Optional[str] = None,
        class_names: Optional[Sequence[str]] = None,
    ):
        self.root = Path(root)
        if not self.root.is_dir():
            raise DatasetError(f"dataset root is not a folder: {self.root}")
        self.split = split = split if split is not None else self.DEFAULT_SPLIT
        names = read_split_file(_resolve_split(self.root, split, split_file))
        classes = list(class_names) if class_names is not None else list(self.CLASS_NAMES)
        mask_dir = mask_dir if mask_dir is not None else self._default_mask_dir()
        self.labels_file = Path(labels_file) if labels_file is not None else _find_file(
            self.root, ["cls_labels.json", "cls_labels_onehot.npy"])
        table = load_cls_labels(self.labels_file) if self.labels_file is not None else None
        labels = _labels_for(names, table, classes, alt_key=self._alt_key)
        samples = []
        for n, lab in zip(names, labels):
            img, mask = self._files(n, image_dir, mask_dir)
            samples.append(Sample(n, img, mask_path(mask, require_masks), lab))
        super().__init__(samples, classes, transform, rng_seed, max_pixels, require_labels)

    def _default_mask_dir(self) -> str:
        raise NotImplementedError

    def _files(self, name: str, image_dir: str, mask_dir: str) -> tuple[Path, Path]:
        """``(image path, GT mask path)`` of image id ``name``."""
        raise NotImplementedError



class VOCDataset(_VOCStyleDataset):
    """PASCAL VOC 2012 (+ SBD ``train_aug``).

    Layout: ``<root>/JPEGImages/<id>.jpg``, GT ``<root>/SegmentationClassAug/<id>.png`` (falls
    back to ``SegmentationClass``). Split list (default ``train_aug``): ``split_file``, else
    ``<root>/<split>.txt``, ``<root>/ImageSets/Segmentation/<split>.txt`` or
    ``<root>/ImageSets/<split>.txt``. Labels and ``require_masks``: see :class:`_VOCStyleDataset`.
    """

    CLASS_NAMES = VOC_CLASSES
    DEFAULT_SPLIT = "train_aug"

    def _default_mask_dir(self) -> str:
        return next((d for d in ("SegmentationClassAug", "SegmentationClass") if (self.root / d).is_dir()),
                    "SegmentationClassAug")

    def _files(self, name: str, image_dir: str, mask_dir: str) -> tuple[Path, Path]:
        return self.root / image_dir / f"{name}.jpg", self.root / mask_dir / f"{name}.png"


_COCO_NAME = re.compile(r"^COCO_(train|val)2014_(\d{12})$")


def _coco_id(name: str) -> str:
    m = _COCO_NAME.match(name)
    return m.group(2) if m else name


class COCODataset(_VOCStyleDataset):
    """MS COCO 2014 in the VOC-style layout of the reference.

    Images ``<root>/JPEGImages/{train,val}/COCO_{train,val}2014_<12d>.jpg``; GT
    ``<root>/SegmentationClass/{train,val}/<12d>.png`` (prefix stripped). The sub-folder comes
    from the name's prefix (names without one use ``split``, default ``train``). Split list as
    for VOC. Labels: ``labels_file`` / ``<root>/cls_labels.json`` / ``<root>/cls_labels_onehot.npy``
    keyed by the full name (or the 12-digit id), else derived from the GT mask.
    """

    CLASS_NAMES = COCO_CLASSES
    DEFAULT_SPLIT = "train"
    _alt_key = staticmethod(_coco_id)

    def _default_mask_dir(self) -> str:
        return "SegmentationClass"

    def _files(self, name: str, image_dir: str, mask_dir: str) -> tuple[Path, Path]:
        m = _COCO_NAME.match(name)
        sub, num = (m.group(1), m.group(2)) if m else (self.split, name)
        return self.root / image_dir / sub / f"{name}.jpg", self.root / mask_dir / sub / f"{num}.png"

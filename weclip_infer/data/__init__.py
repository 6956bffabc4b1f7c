"""Datasets and transforms for WeCLIP training/evaluation."""
from __future__ import annotations

from .datasets import (
    COCO_CLASSES,
    IMAGE_EXTENSIONS,
    VOC_CLASSES,
    COCODataset,
    CustomFolderDataset,
    DatasetError,
    Sample,
    SegmentationDataset,
    VOCDataset,
    build_dataset,
    collate,
    labels_from_mask,
    load_class_names,
    load_cls_labels,
    read_split_file,
)
from .transforms import (
    CLIP_MEAN,
    CLIP_STD,
    IGNORE_INDEX,
    IMAGENET_MEAN,
    IMAGENET_STD,
    NORMALIZATIONS,
    CropBox,
    EvalTransform,
    TrainTransform,
    denormalize,
    normalize,
)

__all__ = [
    # transforms
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "CLIP_MEAN",
    "CLIP_STD",
    "NORMALIZATIONS",
    "IGNORE_INDEX",
    "CropBox",
    "normalize",
    "denormalize",
    "TrainTransform",
    "EvalTransform",
    # datasets
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

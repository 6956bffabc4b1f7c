"""Custom folders: images anywhere under a root with image-level labels from a CSV or JSON file."""
from __future__ import annotations

import csv
import io
import os
import re
import warnings
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import numpy as np

from ..imageio import DEFAULT_MAX_PIXELS
from .base import Sample, SegmentationDataset, mask_path
from .label_files import (
    IMAGE_EXTENSIONS,
    DatasetError,
    _find_file,
    _label_vector,
    _report,
    load_class_names,
    load_cls_labels,
)

__all__ = ["CustomFolderDataset"]

PathLike = Union[str, os.PathLike]
Transform = Callable[..., Any]


_IMAGE_COLUMNS = ("image", "path", "file", "filename", "image_path", "name")
_LIST_COLUMNS = ("labels", "label", "classes", "class", "tags")
_TRUE = {"1", "1.0", "true", "yes", "y", "x"}
_FALSE = {"0", "0.0", "false", "no", "n", ""}


def _norm_key(key: str, labels_src: str) -> str:
    k = str(key).strip().replace("\\", "/")
    p = PurePosixPath(k)
    if p.is_absolute() or re.match(r"^[A-Za-z]:", k) or ".." in p.parts:
        raise DatasetError(f"{labels_src}: image path {key!r} must be relative to the dataset root "
                           "(no absolute paths, no '..')")
    parts = [x for x in p.parts if x not in (".", "")]
    if not parts:
        raise DatasetError(f"{labels_src}: empty image path")
    return "/".join(parts)


def _read_custom_csv(path: Path) -> tuple[list[tuple[str, Any]], Optional[list[str]]]:
    """Rows ``(image, labels)`` where labels is a list of names (list format) or a dict
    {column: value} (one column per class). Also returns the class columns, if any."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DatasetError(f"{path}: not UTF-8 text: {e}") from None
    reader = csv.reader(io.StringIO(text))
    rows = [r for r in reader if any(c.strip() for c in r)]
    if not rows:
        raise DatasetError(f"{path}: empty CSV")
    header = [h.strip() for h in rows[0]]
    if len(header) < 2:
        raise DatasetError(f"{path}: CSV needs a header 'image,labels' or 'image,<class1>,<class2>,...'")
    if header[0].lower() not in _IMAGE_COLUMNS:
        raise DatasetError(f"{path}: first CSV column must be one of {list(_IMAGE_COLUMNS)}, got {header[0]!r}")
    list_format = len(header) == 2 and header[1].lower() in _LIST_COLUMNS
    out: list[tuple[str, Any]] = []
    for lineno, r in enumerate(rows[1:], start=2):
        if list_format:
            if len(r) > 2:  # unquoted commas inside the label list: keep them as separators too
                r = [r[0], ";".join(r[1:])]
            labels = [t.strip() for t in re.split(r"[;|]", r[1] if len(r) > 1 else "") if t.strip()]
            out.append((r[0], labels))
        else:
            if len(r) != len(header):
                raise DatasetError(f"{path}:{lineno}: expected {len(header)} columns, got {len(r)}")
            out.append((r[0], dict(zip(header[1:], (c.strip() for c in r[1:])))))
    return out, None if list_format else header[1:]


class CustomFolderDataset(SegmentationDataset):
    """Images anywhere under ``root`` (recursive; jpg/jpeg/png/bmp/webp) with image-level labels.

    ``labels``: a CSV (``image,labels`` with labels separated by ``;`` or ``|``, or
    ``image,<class1>,<class2>,...`` with 0/1 per class), a JSON ``{relative_path: [class names]}``,
    or such a mapping directly; default ``<root>/labels.csv`` or ``<root>/labels.json``. Paths
    are relative to ``root`` (``/`` or ``\\`` separators). ``class_names``: a list or a .txt/.json
    file of foreground names (label k+1 ↔ ``class_names[k]``); default the CSV's class columns,
    else ``<root>/classes.txt`` / ``classes.json``. ``masks``: optional folder of GT PNGs mirroring
    the image paths (``<masks>/<relative path without extension>.png``) for evaluation.

    Errors at construction (``DatasetError``): unknown class (naming image and class), listed
    images missing on disk, empty label sets (unless ``require_labels=False``). Images on disk
    without a label are skipped; their count is in ``num_unlabelled`` and a warning.
    ``name`` of an item is its relative path without extension.
    """

    def __init__(
        self,
        root: PathLike,
        labels: Union[PathLike, Mapping[str, Any], None] = None,
        class_names: Union[PathLike, Sequence[str], None] = None,
        masks: Optional[PathLike] = None,
        transform: Optional[Transform] = None,
        rng_seed: int = 0,
        *,
        require_masks: Optional[bool] = None,
        require_labels: bool = True,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ):
        self.root = Path(root)
        if not self.root.is_dir():
            raise DatasetError(f"dataset root is not a folder: {self.root}")
        if labels is None:
            labels = _find_file(self.root, ["labels.csv", "labels.json"])
            if labels is None:
                raise DatasetError(f"{self.root}: no labels given and no labels.csv / labels.json in the root")
        csv_columns: Optional[list[str]] = None
        if isinstance(labels, Mapping):
            src, entries = "labels", list(labels.items())
        else:
            lp = Path(labels)
            src = str(lp)
            if not lp.is_file():
                raise DatasetError(f"label file not found: {lp}")
            if lp.suffix.lower() == ".csv":
                entries, csv_columns = _read_custom_csv(lp)
            elif lp.suffix.lower() == ".json":
                entries = list(load_cls_labels(lp).items())
            else:
                raise DatasetError(f"{lp}: unsupported label file type (use .csv or .json)")
        self.labels_source = src

        if class_names is None:
            if csv_columns is not None:
                class_names = csv_columns
            else:
                class_names = _find_file(self.root,
                                         ["classes.txt", "classes.json", "class_names.txt", "class_names.json"])
                if class_names is None:
                    raise DatasetError(
                        f"{self.root}: class_names not given and no classes.txt / classes.json in the root")
        classes = load_class_names(class_names)
        index = {c: i for i, c in enumerate(classes)}

        errors: list[str] = []
        keys: list[str] = []
        vecs: list[np.ndarray] = []
        seen: set[str] = set()
        if csv_columns is not None:
            unknown_cols = [c for c in csv_columns if c not in index]
            if unknown_cols:
                raise DatasetError(_report(f"{src}: CSV class columns not in the class list {classes}", unknown_cols))
        for key, entry in entries:
            k = _norm_key(key, src)
            if k in seen:
                raise DatasetError(f"{src}: image {k!r} is listed more than once")
            seen.add(k)
            if isinstance(entry, dict):  # one column per class
                vec = np.zeros(len(classes), dtype=np.float32)
                for col, val in entry.items():
                    v = val.lower()
                    if v in _TRUE:
                        vec[index[col]] = 1.0
                    elif v not in _FALSE:
                        errors.append(f"{k}: column {col!r} must be 0/1, got {val!r}")
            else:
                try:
                    vec = _label_vector(entry, classes, k, index)
                except DatasetError as e:
                    errors.append(str(e))
                    continue
            keys.append(k)
            vecs.append(vec)
        if errors:
            raise DatasetError(_report(f"{src}: invalid labels", errors))

        self.masks_dir = Path(masks) if masks is not None else None
        samples: list[Sample] = []
        names_seen: dict[str, str] = {}
        for k, vec in zip(keys, vecs):
            name = str(PurePosixPath(k).with_suffix(""))
            if name in names_seen:
                raise DatasetError(f"{src}: images {names_seen[name]!r} and {k!r} map to the same name {name!r}")
            names_seen[name] = k
            mask = None
            if self.masks_dir is not None:
                mask = mask_path(self.masks_dir / f"{name}.png", require_masks)
            samples.append(Sample(name, self.root / k, mask, vec))
        if require_masks and self.masks_dir is None:
            raise DatasetError("require_masks=True needs a masks folder")

        # images on disk that nobody labelled: ignored, counted, warned about
        on_disk = self._scan_images()
        self.num_unlabelled = len(on_disk - seen)
        super().__init__(samples, classes, transform, rng_seed, max_pixels, require_labels)
        if self.num_unlabelled:  # warn only once the dataset is valid
            warnings.warn(f"{self.num_unlabelled} image(s) under {self.root} have no entry in {src} and are ignored",
                          stacklevel=2)

    def _scan_images(self) -> set[str]:
        skip = self.masks_dir.resolve() if self.masks_dir is not None else None
        found: set[str] = set()
        for dirpath, dirnames, filenames in os.walk(self.root):
            d = Path(dirpath)
            if skip is not None:
                dirnames[:] = [x for x in dirnames if (d / x).resolve() != skip]
            for f in filenames:
                if f.lower().endswith(IMAGE_EXTENSIONS):
                    found.add((d / f).relative_to(self.root).as_posix())
        return found


"""Datasets for WeCLIP training and evaluation: PASCAL VOC, COCO (VOC-style) and custom folders.

All datasets share :class:`SegmentationDataset`; ``__getitem__`` returns a dict

=============  ==============================================================================
``name``       str, the image id (VOC id, full ``COCO_train2014_…`` name, or the custom image's
               path relative to its root without extension)
``image``      float32 tensor 3×H×W, normalised (spec §1.2); 3×320×320 with ``TrainTransform``
``cls_label``  float32 tensor [C−1], multi-hot image-level label, background excluded; index
               k ↔ class k+1, i.e. ascending class order (spec §11.2 item 20)
``mask``       int64 tensor H×W, GT segmentation (0 = background, 255 = ignore/padding); all
               255 when the image has no GT mask (sentinel)
``has_mask``   bool, whether ``mask`` is a real GT mask
``crop_box``   int64 tensor [4], ``(h_start, h_end, w_start, w_end)`` of the non-padded region
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

import csv
import difflib
import io
import json
import os
import pickle
import random
import re
import warnings
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from ..config import ConfigError
from ..classes import COCO_CLASSES as _COCO, VOC_CLASSES as _VOC
from ..imageio import DEFAULT_MAX_PIXELS, ImageDecodeError, load_image
from ..labelmap import read_label_png
from .transforms import IGNORE_INDEX, EvalTransform, TrainTransform

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
Transform = Callable[..., Any]

# Plain class names, foreground only, index i ↔ label i+1 (spec §1.6).
# Single source of the class lists: weclip_infer.classes (spec §1.6).
VOC_CLASSES: tuple[str, ...] = tuple(_VOC)
COCO_CLASSES: tuple[str, ...] = tuple(_COCO)
IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
_BACKGROUND_NAMES = ("background", "bg", "__background__", "_background_")
_MAX_LISTED = 20


class DatasetError(ConfigError):
    """A dataset is inconsistent (missing files, unknown classes, empty labels, bad masks)."""


def _report(problem: str, items: Sequence[str]) -> str:
    """``problem`` + the first 20 items + how many more."""
    shown = "\n  ".join(str(x) for x in items[:_MAX_LISTED])
    more = f"\n  ... and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
    return f"{problem} ({len(items)} in total):\n  {shown}{more}"


# --------------------------------------------------------------------------------------------
# file readers
# --------------------------------------------------------------------------------------------

def read_split_file(path: PathLike) -> list[str]:
    """Image ids from a split list: one per line; blank lines and ``#`` comments skipped.

    Tolerates a missing trailing newline (VOC ``test.txt``, spec §7.1) and lines of the form
    ``/JPEGImages/<id>.jpg /SegmentationClassAug/<id>.png`` (first token, stem taken).
    """
    p = Path(path)
    if not p.is_file():
        raise DatasetError(f"split list not found: {p}")
    names: list[str] = []
    for line in p.read_text(encoding="utf-8-sig").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        tok = line.split()[0]
        if "/" in tok or tok.lower().endswith(IMAGE_EXTENSIONS):
            tok = PurePosixPath(tok).stem
        names.append(tok)
    return names


class _NumpyLabelUnpickler(pickle.Unpickler):
    """Unpickler that only resolves what a pickled dict of numpy arrays needs (no code execution)."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a label file")
        if module == "_codecs":
            import codecs
            return codecs.encode
        if module == "numpy":
            return getattr(np, name)
        try:
            from numpy._core import multiarray  # numpy ≥ 2
        except ImportError:  # pragma: no cover - numpy 1.x
            from numpy.core import multiarray  # type: ignore[no-redef]
        return getattr(multiarray, name)


def _load_label_npy(path: Path) -> dict:
    """Read the reference ``cls_labels_onehot.npy`` (a pickled dict inside a 0-d object array,
    spec §12) with a restricted unpickler: only numpy array reconstruction is allowed."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, _, dtype = np.lib.format.read_array_header_2_0(f)
        if dtype.hasobject:
            try:
                obj = _NumpyLabelUnpickler(io.BytesIO(f.read())).load()
            except Exception as e:  # noqa: BLE001
                raise DatasetError(f"{path}: cannot read label file: {e}") from None
        else:
            raise DatasetError(f"{path}: expected a pickled dict {{name: multi-hot}}, got a plain {dtype} array of shape {shape}")
    if isinstance(obj, np.ndarray) and obj.shape == ():
        obj = obj.item()
    if not isinstance(obj, dict):
        raise DatasetError(f"{path}: expected a dict {{name: multi-hot}}, got {type(obj).__name__}")
    return obj


def load_cls_labels(path: PathLike) -> dict[str, Any]:
    """Image-level labels keyed by image name.

    ``.json``: ``{name: [0/1, ...]}`` or ``{name: [class names]}``. ``.npy``: the reference's
    pickled ``cls_labels_onehot.npy`` (read with a restricted unpickler that only rebuilds numpy
    arrays). Values are returned as stored; :meth:`SegmentationDataset` turns them into vectors.
    """
    p = Path(path)
    if not p.is_file():
        raise DatasetError(f"label file not found: {p}")
    suffix = p.suffix.lower()
    if suffix == ".json":
        try:
            data = json.loads(p.read_text(encoding="utf-8-sig"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DatasetError(f"{p}: invalid JSON: {e}") from None
        if not isinstance(data, dict):
            raise DatasetError(f"{p}: expected a JSON object {{name: labels}}, got {type(data).__name__}")
        return data
    if suffix == ".npy":
        return _load_label_npy(p)
    raise DatasetError(f"{p}: unsupported label file type {suffix!r} (use .json or .npy)")


def load_class_names(spec: Union[PathLike, Sequence[str]]) -> list[str]:
    """Foreground class names from a list, a ``.txt`` (one per line, ``#`` comments) or a
    ``.json`` list. A leading ``background`` entry is dropped. Duplicates are an error."""
    if isinstance(spec, (str, os.PathLike)):  # a single string is a file, a list holds names
        p = Path(spec)
        if not p.is_file():
            raise DatasetError(f"class-name file not found: {p}")
        if p.suffix.lower() == ".json":
            try:
                data = json.loads(p.read_text(encoding="utf-8-sig"))
            except json.JSONDecodeError as e:
                raise DatasetError(f"{p}: invalid JSON: {e}") from None
            if isinstance(data, dict) and "class_names" in data:
                data = data["class_names"]
            if not isinstance(data, list) or not all(isinstance(x, str) for x in data):
                raise DatasetError(f"{p}: expected a JSON list of class names")
            names = data
        else:
            names = [ln.strip() for ln in p.read_text(encoding="utf-8-sig").splitlines()]
            names = [n for n in names if n and not n.startswith("#")]
        source = str(p)
    else:
        names = [str(x).strip() for x in spec]
        source = "class_names"
    if names and names[0].lower() in _BACKGROUND_NAMES:
        names = names[1:]
    if not names:
        raise DatasetError(f"{source}: no class names")
    seen: set[str] = set()
    dups = [n for n in names if n in seen or seen.add(n)]  # type: ignore[func-returns-value]
    if dups:
        raise DatasetError(f"{source}: duplicate class names {sorted(set(dups))}")
    if any(not n for n in names):
        raise DatasetError(f"{source}: empty class name")
    return names


def labels_from_mask(mask: np.ndarray, num_fg: int) -> np.ndarray:
    """Multi-hot [num_fg] float32 from a GT mask: unique values v ∉ {0, 255} → index v−1 (spec §2.1, §12)."""
    vals = np.unique(np.asarray(mask))
    vals = vals[(vals != 0) & (vals != IGNORE_INDEX)]
    out = np.zeros(num_fg, dtype=np.float32)
    out[(vals - 1).astype(np.int64)] = 1.0
    return out


# --------------------------------------------------------------------------------------------
# base dataset
# --------------------------------------------------------------------------------------------

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
    per image, spec §11.2/§2.1); False allows missing/empty labels (e.g. VOC ``test``).
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
        bad_len = [f"{s.name}: length {len(s.label)}" for s in self.samples if s.label is not None and len(s.label) != C1]
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
        (H×W int64, all 255 without GT), ``has_mask`` (bool), ``crop_box`` (int64 [4])."""
        if index < 0:
            index += len(self)
        sample = self.samples[index]
        img = load_image(sample.image, self.max_pixels)
        mask = self.load_mask(sample, img.shape[:2])
        label = self.cls_label(sample, mask)  # from the whole image, before cropping (spec §11.2 item 2)
        image, mask_t, box = self.transform(img, self.item_rng(index), mask)
        has_mask = mask_t is not None
        if mask_t is None:
            mask_t = torch.full(tuple(image.shape[1:]), IGNORE_INDEX, dtype=torch.int64)
        return {
            "name": sample.name,
            "image": image,
            "cls_label": torch.from_numpy(np.array(label, dtype=np.float32)),
            "mask": mask_t,
            "has_mask": has_mask,
            "crop_box": torch.tensor(box, dtype=torch.int64),
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self)} images, {self.num_classes} classes, transform={self.transform!r})"


def _label_vector(entry: Any, class_names: Sequence[str], image: str, index: Mapping[str, int]) -> np.ndarray:
    """A label-file entry (multi-hot numbers or a list of class names) → float32 [C−1]."""
    if isinstance(entry, np.ndarray):
        entry = entry.tolist()
    if isinstance(entry, str):
        entry = [t for t in re.split(r"[;|]", entry)]
    if not isinstance(entry, (list, tuple)):
        raise DatasetError(f"{image}: label must be a list, got {type(entry).__name__}")
    if len(entry) == 0:
        return np.zeros(len(class_names), dtype=np.float32)
    if all(isinstance(x, str) for x in entry):
        vec = np.zeros(len(class_names), dtype=np.float32)
        for raw in entry:
            cls = raw.strip()
            if not cls:
                continue
            if cls not in index:
                raise DatasetError(_unknown_class_msg(image, cls, class_names))
            vec[index[cls]] = 1.0
        return vec
    try:
        return np.asarray(entry, dtype=np.float32).reshape(-1)
    except (TypeError, ValueError):
        raise DatasetError(f"{image}: label must be a multi-hot vector or a list of class names, got {entry!r}") from None


def _unknown_class_msg(image: str, cls: str, class_names: Sequence[str]) -> str:
    close = difflib.get_close_matches(cls, list(class_names), n=3, cutoff=0.6)
    if not close:
        close = [c for c in class_names if c.lower() == cls.lower()]
    hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
    return f"{image}: unknown class {cls!r}{hint}; known classes: {list(class_names)}"


def _find_file(root: Path, candidates: Iterable[str]) -> Optional[Path]:
    for c in candidates:
        p = root / c
        if p.is_file():
            return p
    return None


def _resolve_split(root: Path, split: str, split_file: Optional[PathLike]) -> Path:
    if split_file is not None:
        return Path(split_file)
    if split.lower().endswith(".txt") and Path(split).is_file():
        return Path(split)
    cands = [f"{split}.txt", f"ImageSets/Segmentation/{split}.txt", f"ImageSets/{split}.txt"]
    found = _find_file(root, cands)
    if found is None:
        raise DatasetError(f"split list for {split!r} not found; looked for {[str(root / c) for c in cands]} "
                           "(pass split_file=...)")
    return found


def _labels_for(names: Sequence[str], table: Optional[Mapping[str, Any]], class_names: Sequence[str],
                alt_key: Optional[Callable[[str], str]] = None) -> list[Optional[np.ndarray]]:
    if table is None:
        return [None] * len(names)
    index = {c: i for i, c in enumerate(class_names)}
    out: list[Optional[np.ndarray]] = []
    for n in names:
        entry = table.get(n)
        if entry is None and alt_key is not None:
            entry = table.get(alt_key(n))
        out.append(None if entry is None else _label_vector(entry, class_names, n, index))
    return out


# --------------------------------------------------------------------------------------------
# PASCAL VOC
# --------------------------------------------------------------------------------------------

class VOCDataset(SegmentationDataset):
    """PASCAL VOC 2012 (+ SBD ``train_aug``), spec §7.1.

    Layout: ``<root>/JPEGImages/<id>.jpg``, GT ``<root>/SegmentationClassAug/<id>.png`` (falls
    back to ``SegmentationClass``). Split list: ``split_file``, else ``<root>/<split>.txt``,
    ``<root>/ImageSets/Segmentation/<split>.txt`` or ``<root>/ImageSets/<split>.txt``.
    Labels: ``labels_file``, else ``<root>/cls_labels.json`` or ``<root>/cls_labels_onehot.npy``;
    ids missing from it (or when there is none) take their classes from the GT mask.
    ``require_masks``: None = use a GT mask when its file exists; True = every listed id must
    have one; False = ignore masks.
    """

    CLASS_NAMES = VOC_CLASSES

    def __init__(
        self,
        root: PathLike,
        split: str = "train_aug",
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
        self.split = split
        names = read_split_file(_resolve_split(self.root, split, split_file))
        classes = list(class_names) if class_names is not None else list(self.CLASS_NAMES)
        if mask_dir is None:
            mask_dir = next((d for d in ("SegmentationClassAug", "SegmentationClass") if (self.root / d).is_dir()),
                            "SegmentationClassAug")
        self.labels_file = Path(labels_file) if labels_file is not None else _find_file(
            self.root, ["cls_labels.json", "cls_labels_onehot.npy"])
        table = load_cls_labels(self.labels_file) if self.labels_file is not None else None
        labels = _labels_for(names, table, classes)
        samples = []
        for n, lab in zip(names, labels):
            img = self.root / image_dir / f"{n}.jpg"
            samples.append(Sample(n, img, self._mask_path(self.root / mask_dir / f"{n}.png", require_masks), lab))
        super().__init__(samples, classes, transform, rng_seed, max_pixels, require_labels)

    @staticmethod
    def _mask_path(p: Path, require_masks: Optional[bool]) -> Optional[Path]:
        if require_masks is False:
            return None
        if require_masks is None and not p.is_file():
            return None
        return p  # require_masks=True: a missing file is reported by _check_files


# --------------------------------------------------------------------------------------------
# COCO 2014 (VOC-style conversion)
# --------------------------------------------------------------------------------------------

_COCO_NAME = re.compile(r"^COCO_(train|val)2014_(\d{12})$")


def _coco_id(name: str) -> str:
    m = _COCO_NAME.match(name)
    return m.group(2) if m else name


class COCODataset(SegmentationDataset):
    """MS COCO 2014 in the VOC-style layout of the reference (spec §7.1, §11.2 item 22).

    Images ``<root>/JPEGImages/{train,val}/COCO_{train,val}2014_<12d>.jpg``; GT
    ``<root>/SegmentationClass/{train,val}/<12d>.png`` (prefix stripped). The sub-folder comes
    from the name's prefix (names without one use ``split``). Split list as for VOC. Labels:
    ``labels_file`` / ``<root>/cls_labels.json`` / ``<root>/cls_labels_onehot.npy`` keyed by the
    full name (or the 12-digit id), else derived from the GT mask (values v ∉ {0,255} → v−1).
    """

    CLASS_NAMES = COCO_CLASSES

    def __init__(
        self,
        root: PathLike,
        split: str = "train",
        split_file: Optional[PathLike] = None,
        labels_file: Optional[PathLike] = None,
        transform: Optional[Transform] = None,
        rng_seed: int = 0,
        *,
        require_masks: Optional[bool] = None,
        require_labels: bool = True,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        image_dir: str = "JPEGImages",
        mask_dir: str = "SegmentationClass",
        class_names: Optional[Sequence[str]] = None,
    ):
        self.root = Path(root)
        if not self.root.is_dir():
            raise DatasetError(f"dataset root is not a folder: {self.root}")
        self.split = split
        names = read_split_file(_resolve_split(self.root, split, split_file))
        classes = list(class_names) if class_names is not None else list(self.CLASS_NAMES)
        self.labels_file = Path(labels_file) if labels_file is not None else _find_file(
            self.root, ["cls_labels.json", "cls_labels_onehot.npy"])
        table = load_cls_labels(self.labels_file) if self.labels_file is not None else None
        labels = _labels_for(names, table, classes, alt_key=_coco_id)
        samples = []
        for n, lab in zip(names, labels):
            m = _COCO_NAME.match(n)
            sub, num = (m.group(1), m.group(2)) if m else (split, n)
            img = self.root / image_dir / sub / f"{n}.jpg"
            mask = VOCDataset._mask_path(self.root / mask_dir / sub / f"{num}.png", require_masks)
            samples.append(Sample(n, img, mask, lab))
        super().__init__(samples, classes, transform, rng_seed, max_pixels, require_labels)


# --------------------------------------------------------------------------------------------
# custom folders
# --------------------------------------------------------------------------------------------

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
                class_names = _find_file(self.root, ["classes.txt", "classes.json", "class_names.txt", "class_names.json"])
                if class_names is None:
                    raise DatasetError(f"{self.root}: class_names not given and no classes.txt / classes.json in the root")
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
                mask = VOCDataset._mask_path(self.masks_dir / f"{name}.png", require_masks)
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


# --------------------------------------------------------------------------------------------
# factory and collate
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
    ``TrainTransform(crop_size, scale_range, flip=True, normalize)`` (spec §7.2) and
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


def collate(batch: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Stack items of equal size: ``image`` B×3×H×W, ``cls_label`` B×(C−1), ``mask`` B×H×W,
    ``crop_box`` B×4, ``has_mask`` B (bool); ``name`` stays a list. Training crops are all
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
        "crop_box": torch.stack([torch.as_tensor(b["crop_box"], dtype=torch.int64) for b in batch]),
    }

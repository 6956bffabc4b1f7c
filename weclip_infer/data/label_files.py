"""Dataset metadata files: split lists, image-level label files, class-name lists.

Readers for the small text/JSON/NumPy files that describe a data set (no image decoding here):
``read_split_file`` (VOC-style id lists), ``load_cls_labels`` (``cls_labels.json`` or the
reference's pickled ``cls_labels_onehot.npy``, read with a restricted unpickler),
``load_class_names`` (foreground class names from a list, ``.txt`` or ``.json``) and
``labels_from_mask`` (image-level labels derived from a GT mask).
"""
from __future__ import annotations

import difflib
import io
import json
import os
import pickle
import re
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

import numpy as np

from ..config import ConfigError
from .transforms import IGNORE_INDEX

__all__ = ["DatasetError", "IMAGE_EXTENSIONS", "read_split_file", "load_cls_labels", "load_class_names",
           "labels_from_mask"]

PathLike = Union[str, os.PathLike]

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



def read_split_file(path: PathLike) -> list[str]:
    """Image ids from a split list: one per line; blank lines and ``#`` comments skipped.

    Tolerates a missing trailing newline (VOC ``test.txt``) and lines of the form
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
    """Read the reference ``cls_labels_onehot.npy`` (a pickled dict inside a 0-d object array)
    with a restricted unpickler: only numpy array reconstruction is allowed."""
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
            raise DatasetError(
                f"{path}: expected a pickled dict {{name: multi-hot}}, got a plain {dtype} array of shape {shape}")
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
    """Multi-hot [num_fg] float32 from a GT mask: unique values v ∉ {0, 255} → index v−1."""
    vals = np.unique(np.asarray(mask))
    vals = vals[(vals != 0) & (vals != IGNORE_INDEX)]
    out = np.zeros(num_fg, dtype=np.float32)
    out[(vals - 1).astype(np.int64)] = 1.0
    return out



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
        raise DatasetError(
            f"{image}: label must be a multi-hot vector or a list of class names, got {entry!r}") from None


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


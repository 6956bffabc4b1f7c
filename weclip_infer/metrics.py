"""Confusion matrix and mIoU for semantic segmentation.

``hist[gt, pred]`` is a C×C int64 matrix accumulated over all evaluated pixels; pixels whose
ground truth is outside ``[0, C)`` (the VOC/COCO ignore label 255, dataset padding) or equal to
``ignore_index`` are skipped. From it:

* ``IoU_c = hist[c, c] / (row_c + col_c - hist[c, c])``
* ``mIoU = nanmean(IoU_c for classes with row_c > 0)`` — classes absent from the ground truth of
  the evaluated set are dropped from the mean (their IoU is reported as NaN), background included.
* ``pixel_acc = trace / total``, ``mean_class_acc = nanmean(hist[c, c] / row_c)``.

All scores are fractions in ``[0, 1]`` (the table formatter prints percentages). The module has
no torch dependency; torch tensors are accepted by duck typing (``.detach().cpu().numpy()``).
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np

__all__ = ["ConfusionMatrix", "format_iou_table", "to_jsonable"]


def _as_numpy(x: Any, what: str) -> np.ndarray:
    """Numpy view of a numpy array, torch tensor or nested sequence of integers."""
    if hasattr(x, "detach") and hasattr(x, "cpu") and hasattr(x, "numpy"):  # torch.Tensor
        x = x.detach().cpu().numpy()
    arr = np.asarray(x)
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8)
    if not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"{what} must be an integer label array, got dtype {arr.dtype}")
    return arr


class ConfusionMatrix:
    """Accumulates a C×C confusion matrix ``hist[gt, pred]`` over any number of label maps.

    Args:
        num_classes: C, the number of classes including background (21 VOC, 81 COCO).
        ignore_index: ground-truth value to skip (default 255). Any ground-truth value outside
            ``[0, C)`` is skipped as well, so 255 is always ignored when C ≤ 255.

    ``update`` takes arrays of any (equal) shape; ``merge`` adds another matrix (multi-process
    or DDP sums: all-reduce ``hist`` and rebuild with :meth:`from_hist`, or merge objects).
    """

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        if int(num_classes) != num_classes or num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
        self.num_classes: int = int(num_classes)
        self.ignore_index: int = int(ignore_index)
        self._hist: np.ndarray = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)
        self.num_updates: int = 0

    # ------------------------------------------------------------------ accumulation
    @property
    def hist(self) -> np.ndarray:
        """The C×C int64 matrix (rows: ground truth, columns: prediction). A live reference."""
        return self._hist

    @classmethod
    def from_hist(cls, hist: Any, ignore_index: int = 255) -> "ConfusionMatrix":
        """Build from an existing C×C count matrix (e.g. after a DDP ``all_reduce``)."""
        h = _as_numpy(hist, "hist")
        if h.ndim != 2 or h.shape[0] != h.shape[1]:
            raise ValueError(f"hist must be a square C×C matrix, got shape {h.shape}")
        if (h < 0).any():
            raise ValueError("hist must not contain negative counts")
        cm = cls(h.shape[0], ignore_index=ignore_index)
        cm._hist = h.astype(np.int64, copy=True)
        return cm

    def reset(self) -> None:
        """Zero the matrix."""
        self._hist[:] = 0
        self.num_updates = 0

    def update(self, gt: Any, pred: Any) -> "ConfusionMatrix":
        """Add one label map pair (or a batch) to the matrix.

        Args:
            gt: integer array/tensor of any shape (e.g. H×W or B×H×W); values outside ``[0, C)``
                and ``ignore_index`` are skipped.
            pred: integer array/tensor of the same shape with values in ``[0, C)``.

        Raises:
            ValueError: shapes differ, or ``pred`` has a value outside ``[0, C)``.
            TypeError: either input is not an integer array.
        """
        g = _as_numpy(gt, "gt")
        p = _as_numpy(pred, "pred")
        if g.shape != p.shape:
            raise ValueError(f"gt and pred shapes differ: {g.shape} vs {p.shape}")
        C = self.num_classes
        if p.size:
            pmin, pmax = int(p.min()), int(p.max())
            if pmin < 0 or pmax >= C:
                bad = pmin if pmin < 0 else pmax
                raise ValueError(f"prediction value {bad} is outside [0, {C}) (num_classes={C})")
        g = g.reshape(-1)
        p = p.reshape(-1)
        valid = (g >= 0) & (g < C)
        if 0 <= self.ignore_index < C:
            valid &= g != self.ignore_index
        idx = g[valid].astype(np.int64) * C + p[valid].astype(np.int64)
        self._hist += np.bincount(idx, minlength=C * C).reshape(C, C)
        self.num_updates += 1
        return self

    def merge(self, other: "ConfusionMatrix") -> "ConfusionMatrix":
        """Add ``other``'s counts into this matrix (in place); returns ``self``."""
        if not isinstance(other, ConfusionMatrix):
            raise TypeError(f"can only merge a ConfusionMatrix, got {type(other).__name__}")
        if other.num_classes != self.num_classes:
            raise ValueError(f"cannot merge matrices with {other.num_classes} and {self.num_classes} classes")
        self._hist += other._hist
        self.num_updates += other.num_updates
        return self

    def __iadd__(self, other: "ConfusionMatrix") -> "ConfusionMatrix":
        return self.merge(other)

    def __repr__(self) -> str:
        return (f"ConfusionMatrix(num_classes={self.num_classes}, ignore_index={self.ignore_index}, "
                f"pixels={int(self._hist.sum())})")

    # ------------------------------------------------------------------ scores
    def compute(self) -> dict:
        """Scores from the accumulated matrix.

        Returns a dict with:
            ``miou`` (float, NaN if no labelled pixel), ``iou`` (list of C floats, NaN for classes
            absent from the ground truth), ``pixel_acc`` (float), ``mean_class_acc`` (float),
            ``class_acc`` (list of C floats, NaN where absent), ``present`` (list of C bools:
            row sum > 0), ``num_pixels`` (int), ``num_classes`` (int), ``hist`` (C×C int64 copy).
        """
        h = self._hist.astype(np.float64)
        diag = np.diag(h)
        rows = h.sum(axis=1)
        cols = h.sum(axis=0)
        present = rows > 0
        total = float(h.sum())
        iou = np.full(self.num_classes, np.nan)
        cls_acc = np.full(self.num_classes, np.nan)
        # present ⇒ union ≥ row > 0, so no division by zero below
        iou[present] = diag[present] / (rows[present] + cols[present] - diag[present])
        cls_acc[present] = diag[present] / rows[present]
        miou = float(iou[present].mean()) if present.any() else math.nan
        mean_cls_acc = float(cls_acc[present].mean()) if present.any() else math.nan
        pixel_acc = float(diag.sum() / total) if total > 0 else math.nan
        return {
            "miou": miou,
            "iou": [float(v) for v in iou],
            "pixel_acc": pixel_acc,
            "mean_class_acc": mean_cls_acc,
            "class_acc": [float(v) for v in cls_acc],
            "present": [bool(v) for v in present],
            "num_pixels": int(total),
            "num_classes": self.num_classes,
            "hist": self._hist.copy(),
        }


def _fmt_pct(v: Optional[float]) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{100.0 * v:.2f}"


def _md_escape(s: str) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def format_iou_table(result: Mapping[str, Any], class_names: Optional[Sequence[str]] = None) -> str:
    """Markdown table of per-class IoU (%) from :meth:`ConfusionMatrix.compute`'s result.

    Classes absent from the ground truth show ``n/a``. The last rows are mIoU, pixel accuracy
    and mean class accuracy. ``class_names`` (length C) defaults to ``class_0 … class_{C-1}``.
    """
    iou = list(result["iou"])
    n = len(iou)
    if class_names is None:
        class_names = [f"class_{i}" for i in range(n)]
    if len(class_names) != n:
        raise ValueError(f"{len(class_names)} class names given for {n} classes")
    lines = ["| id | class | IoU (%) |", "|---:|:---|---:|"]
    for i, (name, v) in enumerate(zip(class_names, iou)):
        lines.append(f"| {i} | {_md_escape(name)} | {_fmt_pct(v)} |")
    lines.append(f"| | **mIoU** | **{_fmt_pct(result.get('miou'))}** |")
    if "pixel_acc" in result:
        lines.append(f"| | pixel acc | {_fmt_pct(result['pixel_acc'])} |")
    if "mean_class_acc" in result:
        lines.append(f"| | mean class acc | {_fmt_pct(result['mean_class_acc'])} |")
    return "\n".join(lines) + "\n"


def to_jsonable(obj: Any) -> Any:
    """Recursively convert a result dict for ``json.dumps``: arrays → lists, NaN/inf → ``None``."""
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, (np.bool_, bool)):
        return bool(obj)
    if isinstance(obj, (np.integer, int)):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        f = float(obj)
        return f if math.isfinite(f) else None
    if isinstance(obj, Iterable) and not isinstance(obj, (str, bytes)):
        return [to_jsonable(v) for v in obj]
    return obj

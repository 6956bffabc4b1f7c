"""``weclip-eval``: mIoU of a folder of label-PNG predictions against a ground-truth folder.

Usage::

    weclip-eval --pred PRED_DIR --gt GT_DIR [--list val.txt] [--num-classes 21]
                [--class-names names.json|names.txt] [--json OUT.json] [--ignore 255]
                [--allow-missing] [--voc-submission OUT_DIR]

Files are matched by relative path (recursive): ``GT_DIR/a/b.png`` ↔ ``PRED_DIR/a/b.png``; the
image *name* is that path without ``.png`` (``a/b``). Label PNGs are read as raw indices (palette
"P" or grey "L" mode; never converted to RGB). Ground truth 255 (or ``--ignore``) is skipped.
A prediction whose size differs from its ground truth is an error naming the file. Missing
predictions are counted and reported; they make the exit status 1 unless ``--allow-missing``.

``--voc-submission OUT_DIR`` writes the predictions as VOC-palette PNGs in the PASCAL VOC
evaluation-server layout ``OUT_DIR/results/VOC2012/Segmentation/comp5_test_cls/<name>.png``
(what the server expects); ``--gt`` is optional in that mode (the test set has no public ground truth).

Exit status: 0 success, 1 missing predictions (without ``--allow-missing``), 2 errors.

Library use: :func:`evaluate_folders` for two folders, :func:`evaluate_predictions` for any
iterable of ``(gt, pred)`` label arrays (the hook a model-running mode plugs into).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from .classes import COCO_CLASSES, VOC_CLASSES
from .imageio import ImageDecodeError, save_png_atomic
from .io_utils import atomic_write_bytes
from .labelmap import read_label_png as _read_label_png
from .metrics import ConfusionMatrix, format_iou_table, to_jsonable
from .palette import voc_palette

__all__ = [
    "EvaluationError",
    "MissingPredictionsError",
    "VOC_SUBMISSION_SUBDIR",
    "default_class_names",
    "evaluate_folders",
    "evaluate_predictions",
    "list_label_files",
    "load_class_names_with_background",
    "main",
    "read_label_png",
    "write_voc_submission",
]

PathLike = Union[str, os.PathLike]

VOC_SUBMISSION_SUBDIR = Path("results") / "VOC2012" / "Segmentation" / "comp5_test_cls"

_VOC_NAMES = ("background", *VOC_CLASSES)
_COCO_NAMES = ("background", *COCO_CLASSES)


class EvaluationError(ValueError):
    """Bad evaluation input (unreadable label PNG, size mismatch, bad list or class-name file)."""


class MissingPredictionsError(EvaluationError):
    """Some ground-truth images have no prediction; ``.missing`` lists their names."""

    def __init__(self, missing: Sequence[str]):
        self.missing = list(missing)
        shown = ", ".join(self.missing[:5]) + (" …" if len(self.missing) > 5 else "")
        super().__init__(f"{len(self.missing)} prediction(s) missing: {shown}")


# ---------------------------------------------------------------------------- helpers
def default_class_names(num_classes: int) -> List[str]:
    """Display names including background: VOC for 21 classes, COCO for 81, else ``class_i``."""
    if num_classes == len(_VOC_NAMES):
        return list(_VOC_NAMES)
    if num_classes == len(_COCO_NAMES):
        return list(_COCO_NAMES)
    return [f"class_{i}" for i in range(num_classes)]


def load_class_names_with_background(path: PathLike, num_classes: int) -> List[str]:
    """All ``num_classes`` class names, background first, from a class-name file.

    The file is read by :func:`weclip_infer.data.load_class_names` (a JSON list or one name per
    line; foreground names, a leading ``background`` entry dropped). ``num_classes - 1`` names get
    ``"background"`` prepended; ``num_classes`` names are taken as they are (the first one names
    the background class).
    """
    from .data.label_files import DatasetError, load_class_names  # torch only when this option is used

    try:
        names = load_class_names(Path(path))
    except DatasetError as e:
        raise EvaluationError(f"cannot read class-names file: {e}") from None
    if len(names) == num_classes - 1:
        names = ["background", *names]
    if len(names) != num_classes:
        raise EvaluationError(f"{path}: {len(names)} class names for --num-classes {num_classes}")
    return names


def read_label_png(path: PathLike) -> np.ndarray:
    """Read a label PNG as raw H×W class indices (the rule of :mod:`weclip_infer.labelmap`).

    Raises :class:`EvaluationError` for unreadable files and colour (RGB/RGBA) images.
    """
    try:
        return _read_label_png(path)
    except ImageDecodeError as e:
        raise EvaluationError(str(e)) from None


def _name_of(rel: Path) -> str:
    return rel.with_suffix("").as_posix()


def list_label_files(root: PathLike) -> List[str]:
    """Sorted names (relative posix paths without ``.png``) of all ``*.png`` files under ``root``."""
    r = Path(root)
    out = []
    for f in r.rglob("*.png"):
        if f.is_file() and not f.name.startswith("."):
            out.append(_name_of(f.relative_to(r)))
    return sorted(out)


def _names_under(root: Path, names: Optional[Iterable[str]], what: str) -> Tuple[List[str], bool]:
    """``(names, listed)``: the given names (``listed`` True), else every label PNG under ``root``
    (an error when there is none)."""
    if names is not None:
        return list(names), True
    found = list_label_files(root)
    if not found:
        raise EvaluationError(f"no *.png files found under {what} folder {root}")
    return found, False


def _read_name_list(path: PathLike) -> List[str]:
    """Image names from a list file: first token per line, ``.png`` stripped, ``#`` comments."""
    p = Path(path)
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise EvaluationError(f"cannot read list file {p}: {e}") from None
    names: List[str] = []
    for ln in lines:
        ln = ln.strip()
        if not ln or ln.startswith("#"):
            continue
        tok = ln.split()[0]
        if tok.lower().endswith(".png"):
            tok = tok[:-4]
        names.append(tok)
    if not names:
        raise EvaluationError(f"list file {p} contains no names")
    return names


def _check_dir(path: PathLike, what: str) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise EvaluationError(f"{what} folder {p} does not exist or is not a directory")
    return p


# ---------------------------------------------------------------------------- evaluation
def evaluate_predictions(
    pairs_iter: Iterable[Tuple[Any, Any]], num_classes: int, ignore_index: int = 255
) -> dict:
    """Accumulate a confusion matrix over ``(gt, pred)`` pairs and return its scores.

    Args:
        pairs_iter: iterable of ``(gt, pred)`` integer arrays/tensors of equal shape (H×W, or any
            shape). Shapes are checked by :meth:`ConfusionMatrix.update`.
        num_classes: C, including background.
        ignore_index: ground-truth value to skip (values outside ``[0, C)`` are skipped too).

    Returns:
        :meth:`ConfusionMatrix.compute`'s dict plus ``num_images``.
    """
    cm = ConfusionMatrix(num_classes, ignore_index=ignore_index)
    n = 0
    for gt, pred in pairs_iter:
        cm.update(gt, pred)
        n += 1
    res = cm.compute()
    res["num_images"] = n
    return res


def evaluate_folders(
    pred_dir: PathLike,
    gt_dir: PathLike,
    num_classes: int,
    names: Optional[Sequence[str]] = None,
    *,
    ignore_index: int = 255,
    allow_missing: bool = False,
) -> dict:
    """mIoU of ``pred_dir/<name>.png`` against ``gt_dir/<name>.png``.

    Args:
        pred_dir, gt_dir: folders of label PNGs, matched by relative path (recursive).
        num_classes: C, including background.
        names: image names (relative paths without ``.png``) to evaluate; default: every PNG
            under ``gt_dir``. A listed name without ground truth is an error.
        ignore_index: ground-truth value to skip.
        allow_missing: if False, raise :class:`MissingPredictionsError` when any prediction is
            missing (after nothing has been computed); if True, evaluate the images that have
            predictions and list the others in ``missing``.

    Returns:
        The scores of :func:`evaluate_predictions` plus ``missing`` (list of names),
        ``num_missing`` and ``num_gt`` (number of ground-truth images considered).

    Raises:
        EvaluationError: a folder is missing, a PNG is unreadable or not a label map, a
            prediction's size differs from its ground truth, or a value is out of range.
    """
    pred_root = _check_dir(pred_dir, "prediction")
    gt_root = _check_dir(gt_dir, "ground-truth")
    names, listed = _names_under(gt_root, names, "ground-truth")
    no_gt = [n for n in names if not (gt_root / f"{n}.png").is_file()] if listed else []
    if no_gt:
        shown = ", ".join(no_gt[:5]) + (" …" if len(no_gt) > 5 else "")
        raise EvaluationError(f"{len(no_gt)} listed image(s) have no ground truth under {gt_root}: {shown}")
    missing = [n for n in names if not (pred_root / f"{n}.png").is_file()]
    if missing and not allow_missing:
        raise MissingPredictionsError(missing)
    missing_set = set(missing)

    def pairs() -> Iterator[Tuple[np.ndarray, np.ndarray]]:
        for n in names:
            if n in missing_set:
                continue
            gt_path, pred_path = gt_root / f"{n}.png", pred_root / f"{n}.png"
            gt = read_label_png(gt_path)
            pred = read_label_png(pred_path)
            if gt.shape != pred.shape:
                raise EvaluationError(
                    f"{pred_path}: prediction is {pred.shape[1]}x{pred.shape[0]} (WxH) but its ground truth "
                    f"{gt_path} is {gt.shape[1]}x{gt.shape[0]}; predictions must have the original image size"
                )
            if pred.size and int(pred.max()) >= num_classes:
                raise EvaluationError(
                    f"{pred_path}: prediction value {int(pred.max())} is outside [0, {num_classes}) "
                    f"(check --num-classes)"
                )
            yield gt, pred

    res = evaluate_predictions(pairs(), num_classes, ignore_index=ignore_index)
    res["missing"] = missing
    res["num_missing"] = len(missing)
    res["num_gt"] = len(names)
    return res


def write_voc_submission(
    pred_dir: PathLike,
    out_dir: PathLike,
    names: Optional[Sequence[str]] = None,
    num_classes: int = 21,
) -> List[Path]:
    """Write predictions as VOC-palette ("P") PNGs in the VOC evaluation-server layout.

    Files go to ``out_dir/results/VOC2012/Segmentation/comp5_test_cls/<name>.png``;
    pixel indices are copied unchanged, the palette is the standard VOC colormap. ``names``
    defaults to every PNG under ``pred_dir``; a listed name without a prediction is an error.
    Returns the written paths.
    """
    pred_root = _check_dir(pred_dir, "prediction")
    names, listed = _names_under(pred_root, names, "prediction")
    missing = [n for n in names if not (pred_root / f"{n}.png").is_file()] if listed else []
    if missing:
        raise MissingPredictionsError(missing)
    dest_root = Path(out_dir) / VOC_SUBMISSION_SUBDIR
    pal = voc_palette(256)
    written: List[Path] = []
    for n in names:
        src = pred_root / f"{n}.png"
        arr = read_label_png(src)
        if arr.size and (int(arr.min()) < 0 or int(arr.max()) >= num_classes):
            raise EvaluationError(f"{src}: label value outside [0, {num_classes}) in a prediction")
        dest = dest_root / f"{n}.png"
        save_png_atomic(dest, arr.astype(np.uint8), palette=pal)
        written.append(dest)
    return written


# ---------------------------------------------------------------------------- CLI
def _build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="weclip-eval",
        description="mIoU of label-PNG predictions against ground-truth label PNGs, "
        "and VOC evaluation-server submission folders.",
    )
    ap.add_argument("--pred", required=True, metavar="DIR", help="folder of predicted label PNGs (<name>.png)")
    ap.add_argument("--gt", metavar="DIR", help="folder of ground-truth label PNGs (palette or L mode)")
    ap.add_argument("--list", metavar="FILE", help="image names to evaluate, one per line (e.g. voc/val.txt)")
    ap.add_argument("--num-classes", type=int, default=21, metavar="C", help="classes incl. background (default 21)")
    ap.add_argument("--class-names", metavar="FILE", help="JSON list or text file (one per line) of class names")
    ap.add_argument("--json", metavar="OUT", help="write the scores to this JSON file (atomically)")
    ap.add_argument("--ignore", type=int, default=255, metavar="V", help="ground-truth value to ignore (default 255)")
    ap.add_argument("--allow-missing", action="store_true", help="exit 0 even if some predictions are missing")
    ap.add_argument("--voc-submission", metavar="OUT_DIR",
                    help="also write palette PNGs to OUT_DIR/results/VOC2012/Segmentation/comp5_test_cls/")
    ap.add_argument("--model", metavar="DIR", help="segment --images with this model first (predictions go to --pred)")
    ap.add_argument("--images", metavar="DIR", help="image folder for --model (names must match the GT names)")
    ap.add_argument("--crf", action="store_true", help="with --model: DenseCRF post-processing")
    ap.add_argument("--single-scale", action="store_true", help="with --model: scale 1.0 only, no flip")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default=None,
                    help="with --model: network arithmetic (default: the model's inference.precision)")
    return ap


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``weclip-eval``; returns the exit status (0 ok, 1 missing, 2 error)."""
    ap = _build_parser()
    args = ap.parse_args(argv)
    if args.gt is None and args.voc_submission is None:
        ap.error("--gt is required (unless only --voc-submission is requested)")
    if args.num_classes < 1:
        ap.error("--num-classes must be ≥ 1")
    if (args.model is None) != (args.images is None):
        ap.error("--model and --images go together")
    if args.precision is not None and args.model is None:
        ap.error("--precision needs --model")
    try:
        if args.model is not None:
            from .batch.segmentation import segment_folder
            from .predictor import Segmenter

            seg = Segmenter.from_pretrained(args.model, precision=args.precision)
            if args.class_names is None and seg.class_names and len(seg.class_names) == args.num_classes:
                class_names_model = seg.class_names
            else:
                class_names_model = None
            summary = segment_folder(seg, Path(args.images), Path(args.pred), crf=True if args.crf else None,
                                     scales=[1.0] if args.single_scale else None,
                                     flip=False if args.single_scale else None, workers=0, progress=False)
            print(f"segmented {summary['segmented']} image(s) into {args.pred} ({summary['failed']} failed)")
        else:
            class_names_model = None
        names = _read_name_list(args.list) if args.list else None
        status = 0
        if args.voc_submission is not None:
            written = write_voc_submission(args.pred, args.voc_submission, names=names, num_classes=args.num_classes)
            print(f"wrote {len(written)} VOC submission PNG(s) to {Path(args.voc_submission) / VOC_SUBMISSION_SUBDIR}")
        if args.gt is not None:
            class_names = (load_class_names_with_background(args.class_names, args.num_classes) if args.class_names
                           else class_names_model or default_class_names(args.num_classes))
            res = evaluate_folders(args.pred, args.gt, args.num_classes, names,
                                   ignore_index=args.ignore, allow_missing=True)
            print(format_iou_table(res, class_names), end="")
            print(f"\nmIoU {100 * res['miou']:.2f} | pixel acc {100 * res['pixel_acc']:.2f} | "
                  f"mean class acc {100 * res['mean_class_acc']:.2f} | images {res['num_images']}/{res['num_gt']}")
            if res["missing"]:
                shown = ", ".join(res["missing"][:10]) + (" …" if len(res["missing"]) > 10 else "")
                print(f"WARNING: {len(res['missing'])} prediction(s) missing under {args.pred}: {shown}",
                      file=sys.stderr)
                if not args.allow_missing:
                    print("(the scores above cover only the images that have predictions; "
                          "pass --allow-missing to accept this)", file=sys.stderr)
                    status = 1
            if args.json:
                out = {
                    "pred_dir": str(args.pred),
                    "gt_dir": str(args.gt),
                    "list": args.list,
                    "num_classes": args.num_classes,
                    "ignore_index": args.ignore,
                    "class_names": class_names,
                    "iou_per_class": {n: v for n, v in zip(class_names, res["iou"])},
                    **res,
                }
                data = json.dumps(to_jsonable(out), indent=2, allow_nan=False) + "\n"
                atomic_write_bytes(args.json, data.encode("utf-8"))
        return status
    except (EvaluationError, ImageDecodeError) as e:
        print(f"weclip-eval: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"weclip-eval: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

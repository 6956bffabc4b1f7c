"""``weclip-annotate``: pixel masks for a folder of tagged images (or of untagged ones, with
``--auto-tags``), ready to train a segmenter on.

    weclip-annotate IMAGES_DIR --out MASKS_DIR [--labels labels.csv | --auto-tags] [--model M]
                    [--classes classes.txt] [--crf] [--resume]

Folder semantics are those of ``weclip-segment`` (mirrored names, atomic outputs, ``--resume``,
bad files reported in ``results.jsonl``, non-zero exit when some failed). ``MASKS_DIR`` gets:

- ``SegmentationClass/<name>.png``: palette PNG per image, pixel = class index (0 background,
  ``k`` = line ``k`` of ``classes.txt``);
- ``classes.txt``: the foreground class names, one per line;
- ``labels.csv`` (``image,labels``; image paths relative to ``IMAGES_DIR``, labels ``;``-separated)
  and ``cls_labels_onehot.npy`` (``{name: multi-hot float32}``, the layout WSSS code bases read):
  the image-level labels used, given or auto-tagged;
- ``results.jsonl``: one line per image (classes, scores, timings, or the error).

These train ``python -m weclip_infer.train --config custom data.root=IMAGES_DIR
data.labels_file=MASKS_DIR/labels.csv data.class_names_file=MASKS_DIR/classes.txt
data.masks_dir=MASKS_DIR/SegmentationClass`` as they are (add
``model.decoder.fully_supervised=true`` to train on the masks).
"""
from __future__ import annotations

import argparse
import io
import logging
import os
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from .batch.cli import add_run_options, setup_cli_logging

__all__ = ["annotate_folder", "write_dataset_files", "main", "MASKS_SUBDIR"]

log = logging.getLogger(__name__)

MASKS_SUBDIR = "SegmentationClass"


def mask_name(name: str) -> str:
    return f"{MASKS_SUBDIR}/{name}.png"


def _read_labels(images_dir: Path, labels_file: Path, classes: Sequence[str]) -> dict[str, list[str]]:
    """``{output name: [class names]}`` from a label file in any format the custom dataset reads."""
    from .data.datasets import CustomFolderDataset

    root = images_dir if images_dir.is_dir() else images_dir.parent  # a list file: paths relative to its folder
    ds = CustomFolderDataset(root, labels=labels_file, class_names=list(classes), require_labels=False)
    return {s.name: [classes[int(i)] for i in np.flatnonzero(np.asarray(s.label))] for s in ds.samples}


def annotate_folder(annotator, src: Path, out: Path, *, classes: Sequence[str], labels: Optional[dict[str, list]],
                    mode: Optional[str], listing=None, resume: bool = False, workers: int = 2,
                    max_pixels: int, progress: bool = True) -> dict[str, Any]:
    """Annotate every image of ``src`` into ``out`` (see the module docstring); ``labels`` None:
    auto tags. Returns the run summary of ``weclip_infer.batch.run_folder``."""
    from .batch import ImageResult, run_folder
    from .imageio import encode_label_png

    index = {c: i + 1 for i, c in enumerate(classes)}

    def process(item) -> ImageResult:
        if labels is None:
            res = annotator.annotate(item.image, "auto")
        else:
            names = labels.get(item.name)
            if names is None:
                raise ValueError("no entry in the label file")
            if not names:
                raise ValueError("empty label set in the label file")
            res = annotator.annotate(item.image, names, mode=mode)
        # the result's label ids (its own class_names) → the ids of the class list of the run
        lut = np.array([0] + [index.get(n, 0) for n in res.class_names[1:]], dtype=np.int64)
        mask = lut[res.labels]
        if mask.max() > 255:
            raise ValueError("more than 255 classes do not fit a palette PNG")
        present = sorted({classes[int(v) - 1] for v in np.unique(mask) if v})
        return ImageResult(files={mask_name(item.name): encode_label_png(mask.astype(np.uint8))},
                           record={"tags": list(res.classes), "auto": labels is None, "classes": present,
                                   "scores": {n: round(float(res.scores[res.class_names.index(n)]), 4)
                                              for n in res.classes},
                                   **({"tag_scores": {k: round(v, 4) for k, v in res.tag_scores.items()}}
                                      if res.tag_scores else {}),
                                   "timings": {k: round(float(v), 4) for k, v in res.timings.items()}})

    return run_folder(src, out, process, done_name=mask_name, output_names=lambda n: [mask_name(n)],
                      listing=listing, resume=resume, workers=workers, progress=progress, desc="annotate",
                      max_pixels=max_pixels)


def write_dataset_files(src: Path, out: Path, listing, classes: Sequence[str]) -> int:
    """``classes.txt``, ``labels.csv`` and ``cls_labels_onehot.npy`` for every image whose mask
    exists (this run's and earlier runs', from ``results.jsonl``). Returns the image count."""
    import csv

    from .batch import RESULTS_NAME, read_results
    from .io_utils import atomic_write_bytes

    base = src if src.is_dir() else src.parent  # a list file: paths relative to its folder
    latest = {r["image"]: r for r in read_results(out / RESULTS_NAME, latest=True)}
    index = {c: i for i, c in enumerate(classes)}
    rows, onehot = [], {}
    for path, name in listing.items:
        rec = latest.get(str(path))
        if not rec or not rec.get("ok") or not (out / mask_name(name)).is_file():
            continue
        tags = [t for t in rec.get("tags", []) if t in index]
        rel = Path(os.path.relpath(path, base)).as_posix()
        rows.append((rel, ";".join(tags)))
        vec = np.zeros(len(classes), dtype=np.float32)
        vec[[index[t] for t in tags]] = 1.0
        onehot[name] = vec
    atomic_write_bytes(out / "classes.txt", "".join(f"{c}\n" for c in classes).encode("utf-8"))
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["image", "labels"])
    w.writerows(rows)
    atomic_write_bytes(out / "labels.csv", buf.getvalue().encode("utf-8"))
    b = io.BytesIO()
    np.save(b, np.array(onehot, dtype=object), allow_pickle=True)
    atomic_write_bytes(out / "cls_labels_onehot.npy", b.getvalue())
    return len(rows)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="weclip-annotate", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Pixel masks for a folder of images from their tags (class names per image), from free-text "
                    "class names, or from zero-shot tags; written as a training set (SegmentationClass/ masks, "
                    "classes.txt, labels.csv, cls_labels_onehot.npy).",
        epilog="Exit codes: 0 all done; 1 some images failed (see results.jsonl); 2 usage error; 3 outputs could "
               "not be written; 130/143 interrupted (finished outputs stay, --resume continues).\n\n"
               "Train on the result:\n  python -m weclip_infer.train --config custom data.root=IMAGES_DIR "
               "data.labels_file=MASKS_DIR/labels.csv data.class_names_file=MASKS_DIR/classes.txt "
               "data.masks_dir=MASKS_DIR/SegmentationClass [model.decoder.fully_supervised=true]")
    ap.add_argument("images", type=Path, help="folder of images (recursive), or a list file (paths relative to its "
                                                "folder, as in the label file)")
    ap.add_argument("--out", type=Path, required=True, help="output folder (must not be inside the input folder)")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--labels", type=Path, help="image-level labels: CSV 'image,labels' (';'-separated names) or "
                                                 "'image,<class1>,...' with 0/1 columns, or JSON {image: [names]}; "
                                                 "paths relative to the input folder")
    src.add_argument("--auto-tags", action="store_true", help="tag each image zero-shot with the model's classes")
    ap.add_argument("--model", default=None, help="checkpoint folder (default: the shipped demo model)")
    ap.add_argument("--classes", type=Path, default=None,
                    help="class list (.txt one per line, or .json): the label ids of the masks; names outside the "
                         "model's classes are segmented by their text (open vocabulary). Default: the model's classes")
    ap.add_argument("--mode", choices=["tags", "open"], default=None,
                    help="tags: the model's class prompts; open: the names' own text. Default: tags when every "
                         "class is one of the model's")
    ap.add_argument("--refinement", choices=["auto", "rfm", "static", "none"], default="auto",
                    help="CAM refinement (auto: the decoder's affinity for the model's classes, static otherwise)")
    ap.add_argument("--scales", default=None, help="comma-separated CAM scales averaged at full resolution (default 1)")
    ap.add_argument("--long-side", type=int, default=None,
                    help="network input long side in pixels (default: the model's; 0: the image size)")
    ap.add_argument("--tag-threshold", type=float, default=None,
                    help="--auto-tags: score threshold in (0, 1) (default: 0.9, calibrated on the demo world)")
    ap.add_argument("--crf", action="store_true", help="dense CRF on the refined maps")
    ap.add_argument("--resume", action="store_true", help="skip images whose mask exists")
    ap.add_argument("--workers", type=int, default=2, help="decoding processes (default: %(default)s)")
    ap.add_argument("--device", default=None, help="cpu, cuda or auto (default)")
    ap.add_argument("--threads", type=int, default=None,
                    help="PyTorch threads (default: PyTorch's choice)")
    ap.add_argument("--max-pixels", type=int, default=None, help="refuse larger images (default: 4,000,000)")
    ap.add_argument("--max-names", type=int, default=None, help="most class names per image (default: 20)")
    add_run_options(ap)
    return ap


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``weclip-annotate``; returns the exit code (see ``--help``)."""
    a = build_parser().parse_args(argv)
    setup_cli_logging(a.quiet)

    def body() -> int:
        from dataclasses import replace

        from .annotate import DEFAULT_TAG_THRESHOLD, AnnotateLimits, AnnotationError, Annotator
        from .batch import check_output_location, scan_inputs
        from .batch.cli import exit_code, print_summary
        from .data import load_class_names

        if a.workers < 0:
            raise ValueError(f"--workers: must be >= 0, got {a.workers}")
        listing = scan_inputs(a.images, keep_ext=False)
        check_output_location(a.images, a.out, listing.items, lambda n: [mask_name(n)])
        if a.threads is not None:
            import torch

            if a.threads < 1:
                raise ValueError(f"--threads: must be >= 1, got {a.threads}")
            torch.set_num_threads(a.threads)
        from .checkpoint import load_checkpoint
        from .quickstart import DEMO_MODEL_DIR

        model = load_checkpoint(a.model or str(DEMO_MODEL_DIR), device=a.device)
        limits = AnnotateLimits()
        if a.max_pixels is not None:
            limits = replace(limits, max_pixels=a.max_pixels)
        if a.max_names is not None:
            limits = replace(limits, max_names=a.max_names)
        scales = [float(s) for s in a.scales.split(",") if s.strip()] if a.scales else [1.0]
        ann = Annotator(model, refinement=a.refinement, long_side=a.long_side, scales=scales, crf=a.crf,
                        tag_threshold=DEFAULT_TAG_THRESHOLD if a.tag_threshold is None else a.tag_threshold,
                        limits=limits)
        classes = list(model.classes.names) if a.classes is None else load_class_names(a.classes)
        if a.auto_tags:
            if a.classes is not None and classes != list(model.classes.names):
                raise AnnotationError("--auto-tags tags the model's own classes; --classes must be left out "
                                      "or list exactly those")
            labels, mode = None, None
        else:
            if len(classes) > 255:
                raise AnnotationError(f"{len(classes)} classes do not fit palette PNG masks (at most 255)")
            mode = a.mode or ("tags" if all(c in model.classes.names for c in classes) else "open")
            for i in range(0, len(classes), limits.max_names):  # names valid for this mode (clear error up front)
                ann.resolve(classes[i: i + limits.max_names], mode)
            labels = _read_labels(a.images, a.labels, classes)
        summary = annotate_folder(ann, a.images, a.out, classes=classes, labels=labels, mode=mode, listing=listing,
                                  resume=a.resume, workers=a.workers, max_pixels=limits.max_pixels,
                                  progress=not a.quiet)
        n = write_dataset_files(a.images, a.out, listing, classes)
        print_summary(summary, verb="annotated")
        if not a.quiet:
            print(f"{n} masks in {a.out / MASKS_SUBDIR}; train with: python -m weclip_infer.train --config custom "
                  f"data.root={a.images} data.labels_file={a.out / 'labels.csv'} "
                  f"data.class_names_file={a.out / 'classes.txt'} data.masks_dir={a.out / MASKS_SUBDIR}")
        return exit_code(summary)

    from .batch.cli import run_guarded

    return run_guarded("weclip-annotate", body, debug=a.debug)


if __name__ == "__main__":
    raise SystemExit(main())

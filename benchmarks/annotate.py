"""Masks from tags / free-text names / zero-shot tags (``weclip_infer.Annotator``) measured on the
demo world with the shipped demo model.

    python -m weclip_infer.demo.make_world --out data/demo_world --n-train 200 --n-val 300
    python benchmarks/annotate.py --world data/demo_world [--max-images 300] [--threads 2]

Rows (val split, exact GT, mIoU with background, labels at the images' own 256×256 resolution):
tags given (RFM with the decoder's affinity, static refinement, multi-scale, DenseCRF), free-text
names (the class prompts and the bare class names, as open-vocabulary text), zero-shot tags (the
threshold calibrated on the train split: best tag F1) with their precision/recall. Time per image
per mode (median, the given thread count). Writes ``benchmarks/results/annotate.{json,md}``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
DEMO_MODEL = HERE.parent / "weclip_infer" / "assets" / "demo_model"


def cpu_name() -> str:
    """The processor model, as the library reads it (weclip_infer.hardware)."""
    from weclip_infer.hardware import cpu_features

    return cpu_features().model


def calibrate(ann, ds, n: int) -> tuple[float, list]:
    """Tag scores on ``n`` images of ``ds`` → the threshold with the best micro F1 (grid 0.05..0.95)."""
    scores, truth = [], []
    for i in range(n):
        s = ds.samples[i]
        sc = ann.tag(str(s.image))
        scores.append([sc[c] for c in ann.model.classes.names])
        truth.append(np.asarray(s.label, dtype=bool))
    scores_a, truth_a = np.array(scores), np.array(truth)
    grid = []
    for t in np.round(np.arange(0.05, 0.96, 0.05), 2):
        pred = scores_a >= t
        none = ~pred.any(axis=1)  # the best class is kept when none passes
        pred[none, scores_a[none].argmax(axis=1)] = True
        tp = float((pred & truth_a).sum())
        p = tp / max(pred.sum(), 1)
        r = tp / max(truth_a.sum(), 1)
        f1 = 2 * p * r / (p + r) if p + r else 0.0
        grid.append({"threshold": float(t), "precision": p, "recall": r, "f1": f1})
    best = max(grid, key=lambda g: (round(g["f1"], 6), -abs(g["threshold"] - 0.5)))
    return best["threshold"], grid


def draw_panel(model, val, path: Path, rows: int = 4, threshold: float = 0.5) -> None:
    """Image | given tags → mask | auto tags → mask | free-text names → mask (VOC colours), one val
    image per row (the val images with the most classes among the first 40)."""
    from PIL import Image, ImageDraw

    from weclip_infer import Annotator
    from weclip_infer.imageio import load_image
    from weclip_infer.palette import colorize

    names = list(model.classes.names)
    prompts = dict(zip(names, model.cfg.text.class_prompts))
    ann = Annotator(model, tag_threshold=threshold)
    cell, cap = 256, 34
    canvas = Image.new("RGB", (4 * cell, rows * (cell + cap)), "white")
    draw = ImageDraw.Draw(canvas)
    heads = ["image", "tags given", "auto tags", "free-text names"]
    picks = sorted(range(min(len(val), 40)), key=lambda i: -int(np.asarray(val.samples[i].label).sum()))[:rows]
    for r, i in enumerate(picks):
        s = val.samples[i]
        img = load_image(s.image)
        present = [names[k] for k in np.flatnonzero(s.label)]
        given = ann.annotate(img, present)
        auto = ann.annotate(img, "auto")
        free_names = [prompts[c] for c in present]
        free = ann.annotate(img, free_names, mode="open")
        lut = np.array([0] + [names.index(c) + 1 for c in present])
        cells = [(img, ""), (colorize(given.labels), ", ".join(present)),
                 (colorize(auto.labels), ", ".join(auto.classes)),
                 (colorize(lut[free.labels]), ", ".join(f'"{n}"' for n in free_names))]
        y = r * (cell + cap)
        for c, (arr, text) in enumerate(cells):
            tile = Image.fromarray(arr).resize((cell, cell))
            canvas.paste(tile, (c * cell, y + cap))
            draw.text((c * cell + 4, y + 2), heads[c], fill=(90, 90, 90))
            draw.text((c * cell + 4, y + 16), text[:44], fill=(0, 0, 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


def eval_decoders(specs: list, world: str, n: int, out: Path, name: str, notes: list) -> None:
    """Val mIoU (multi-scale + flip, the model's inference settings) of trained checkpoints given
    as ``LABEL=CHECKPOINT_DIR``; writes ``<name>_training.{json,md}``."""
    from weclip_infer import Segmenter, load_checkpoint
    from weclip_infer.data import build_dataset
    from weclip_infer.metrics import ConfusionMatrix

    rows = {}
    for spec in specs:
        label, _, path = spec.partition("=")
        seg = Segmenter(load_checkpoint(path, device="cpu"))
        val = build_dataset("voc", world, "val", class_names=seg.class_names[1:])
        cm = ConfusionMatrix(len(seg.class_names))
        for i in range(min(n, len(val))):
            s = val.samples[i]
            res = seg.predict(str(s.image))
            cm.update(val.load_mask(s, res.labels.shape), res.labels)
        rows[label] = {"checkpoint": path, "val_miou_ms_flip": cm.compute()["miou"], "val_images": min(n, len(val))}
        print(f"{label}: val mIoU {100 * rows[label]['val_miou_ms_flip']:.1f}", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}_training.json").write_text(json.dumps({"decoders": rows, "notes": notes}, indent=2) + "\n")
    lines = ["| decoder | val mIoU (MS + flip) |", "|---|---|"]
    lines += [f"| {k} | {100 * v['val_miou_ms_flip']:.1f} |" for k, v in rows.items()]
    (out / f"{name}_training.md").write_text("\n".join(lines + [""] + notes + [""]))


def serving_cost(model_dir: str, world: str, n: int, out: Path, name: str, threads: int) -> None:
    """Request time of the server's modes, in-process (``SegmentationService.handle``, one request
    at a time, PNG answers): ``decoder``, ``tags`` (given classes), ``open`` (free-text names,
    embeddings cached) and ``open`` with the name cache emptied before each request (the cost of
    encoding new names). Writes ``<name>_serving.{json,md}``."""
    from weclip_infer.data import build_dataset
    from weclip_infer.predictor import Segmenter
    from weclip_infer.serving.service import SegmentationService

    seg = Segmenter.from_pretrained(model_dir, device="cpu", backend="eager")
    svc = SegmentationService(seg, max_pixels=4_000_000)
    svc.model_dir = Path(model_dir)
    names = seg.class_names[1:]
    prompts = dict(zip(names, seg.model.cfg.text.class_prompts))
    val = build_dataset("voc", world, "val", class_names=names)
    samples = val.samples[:n]
    payloads = [(Path(s.image).read_bytes(), [names[k] for k in np.flatnonzero(s.label)]) for s in samples]
    svc.handle([({"body": payloads[0][0], "mode": "open", "labels": "red circle"}, {})])  # loads the text tower
    modes = {
        "decoder (default)": lambda b, c: {"body": b},
        "tags (the image's classes)": lambda b, c: {"body": b, "mode": "tags", "labels": ",".join(c)},
        "tags without labels (zero-shot tags)": lambda b, c: {"body": b, "mode": "tags"},
        "open, names cached": lambda b, c: {"body": b, "mode": "open", "labels": ",".join(prompts[x] for x in c)},
        "open, names encoded per request": lambda b, c: {"body": b, "mode": "open",
                                                         "labels": ",".join(prompts[x] for x in c)},
    }
    rows = {}
    for label, make in modes.items():
        times = []
        for body, classes in payloads:
            if "per request" in label:
                svc.annotator().text._cache.clear()
            t = time.perf_counter()
            (resp,) = svc.handle([(make(body, classes), {})])
            times.append(time.perf_counter() - t)
            assert resp.status == 200, resp.body
        rows[label] = {"s_per_request_median": statistics.median(times), "s_per_request_min": min(times),
                       "requests": len(times)}
        print(f"{label}: {statistics.median(times):.3f} s", flush=True)
    meta = {"threads": threads, "cpu": cpu_name(), "load_average": os.getloadavg(), "images": "demo-world val, 256x256"}
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}_serving.json").write_text(json.dumps({"meta": meta, "modes": rows}, indent=2) + "\n")
    lines = [f"Server modes in-process (one request at a time, PNG answer, {threads} threads, {cpu_name()}, "
             f"load average {meta['load_average'][0]:.1f}); demo model, {len(payloads)} demo-world val images.", "",
             "| mode | s / request (median) | min |", "|---|---|---|"]
    lines += [f"| {k} | {v['s_per_request_median']:.3f} | {v['s_per_request_min']:.3f} |" for k, v in rows.items()]
    (out / f"{name}_serving.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", default="data/demo_world")
    ap.add_argument("--model", default=str(DEMO_MODEL))
    ap.add_argument("--max-images", type=int, default=300)
    ap.add_argument("--calib-images", type=int, default=200, help="train-split images for the tag threshold")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--threshold", type=float, default=None,
                    help="tag threshold (default: calibrate on the train split)")
    ap.add_argument("--no-crf", action="store_true")
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--name", default="annotate")
    ap.add_argument("--panel", default=None, help="also draw a picture (image, tags, masks) to this PNG")
    ap.add_argument("--panel-only", action="store_true", help="draw the picture (with the default threshold) and stop")
    ap.add_argument("--decoder", action="append", default=[], metavar="LABEL=CKPT",
                    help="only evaluate trained checkpoints on the val split (repeatable)")
    ap.add_argument("--note", action="append", default=[], help="a line for the --decoder results (repeatable)")
    ap.add_argument("--serving", type=int, default=0, metavar="N",
                    help="only measure the server's modes in-process on N val images")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from weclip_infer import Annotator, load_checkpoint
    from weclip_infer.crf import crf_available
    from weclip_infer.data import build_dataset
    from weclip_infer.imageio import load_image
    from weclip_infer.metrics import ConfusionMatrix

    if a.serving:
        serving_cost(a.model, a.world, a.serving, Path(a.out), a.name, a.threads)
        return 0
    if a.decoder:
        eval_decoders(a.decoder, a.world, a.max_images, Path(a.out), a.name, a.note)
        return 0
    t_start = time.time()
    model = load_checkpoint(a.model, device="cpu").eval()
    names = list(model.classes.names)
    C = len(names) + 1
    val = build_dataset("voc", a.world, "val", class_names=names)
    train = build_dataset("voc", a.world, "train", class_names=names)
    n = min(len(val), a.max_images)
    prompts = dict(zip(names, model.cfg.text.class_prompts))
    if a.panel_only:
        draw_panel(model, val, Path(a.panel or "annotate_panel.png"))
        return 0

    base = Annotator(model)
    if a.threshold is None:
        threshold, grid = calibrate(base, train, min(len(train), a.calib_images))
    else:
        threshold, grid = a.threshold, []

    auto = f"auto tags (threshold {threshold:g}) then tags, RFM"
    modes = {
        "tags, RFM (trained decoder's affinity)": (Annotator(model), "tags"),
        auto: (Annotator(model, tag_threshold=threshold), "auto"),
        "free-text names = the class prompts ('red circle', ...), open vocabulary": (Annotator(model), "prompts"),
    }
    use_crf = not a.no_crf and crf_available()
    if use_crf:
        modes["tags, RFM + DenseCRF"] = (Annotator(model, crf=True), "tags")
    modes.update({
        "tags, static refinement": (Annotator(model, refinement="static"), "tags"),
        "free-text names = the bare class names ('circle', ...), open vocabulary": (Annotator(model), "bare"),
        "tags, RFM, CAMs at scales 1.0 + 0.75": (Annotator(model, scales=(1.0, 0.75)), "tags"),
    })
    if use_crf:
        modes[auto + " + DenseCRF"] = (Annotator(model, tag_threshold=threshold, crf=True), "auto")
    load_start = os.getloadavg()

    def write(rows: dict, tagstats: dict, partial: bool) -> list:
        tp, fp, fn = tagstats["tp"], tagstats["fp"], tagstats["fn"]
        tagging = {"threshold": threshold, "precision": tp / max(tp + fp, 1), "recall": tp / max(tp + fn, 1),
                   "exact_tag_set_rate": tagstats["exact"] / n, "calibration_grid": grid,
                   "calibration_images": min(len(train), a.calib_images) if grid else 0,
                   "calibration_split": "train"}
        meta = {"world": str(a.world), "model": str(a.model), "val_images": n, "threads": a.threads, "cpu": cpu_name(),
                "cpus_visible": os.cpu_count(), "load_average_at_start": load_start,
                "load_average_now": os.getloadavg(),
                "torch": torch.__version__, "seconds": round(time.time() - t_start, 1), "partial": partial,
                "note": "labels at the images' own resolution (256x256 demo images = the model's long side); the "
                        "machine was shared with other jobs, so times are upper bounds"}
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        doc = {"meta": meta, "modes": rows, "auto_tagging": tagging}
        (out / f"{a.name}.json").write_text(json.dumps(doc, indent=2) + "\n")
        lines = [f"Annotator on the demo world: val split, {n} images, exact GT, mIoU (%) with background; shipped "
                 f"demo model; {a.threads} threads on {cpu_name()}. The machine was shared with other jobs (load "
                 f"average {load_start[0]:.1f} at the start on {os.cpu_count()} CPUs): median times are upper bounds, "
                 "the minimum is the closest to an idle machine.", "",
                 "| mode | mIoU | s / image (median) | s / image (min) |", "|---|---|---|---|"]
        for label, r in rows.items():
            lines.append(f"| {label} | {100 * r['miou']:.1f} | {r['s_per_image_median']:.3f} | "
                         f"{r['s_per_image_min']:.3f} |")
        how = (f"calibrated for the best tag F1 on {tagging['calibration_images']} train-split images" if grid
               else "given")
        lines += ["", f"Zero-shot tagging (one-vs-background score ≥ {threshold:g}, {how}): "
                  f"precision {100 * tagging['precision']:.1f}%, "
                  f"recall {100 * tagging['recall']:.1f}%, exact tag set {100 * tagging['exact_tag_set_rate']:.1f}% of "
                  "val images.", ""]
        (out / f"{a.name}.md").write_text("\n".join(lines))
        return lines

    rows: dict = {}
    tagstats = {"tp": 0, "fp": 0, "fn": 0, "exact": 0}
    for label, (ann, kind) in modes.items():
        cm = ConfusionMatrix(C)
        times = []
        for i in range(n):
            s = val.samples[i]
            img = load_image(s.image)
            gt = val.load_mask(s, img.shape[:2])
            present = [names[k] for k in np.flatnonzero(s.label)]
            t = time.perf_counter()
            if kind == "tags":
                res = ann.annotate(img, present)
            elif kind == "auto":
                res = ann.annotate(img, "auto")
            else:
                free = [prompts[c] for c in present] if kind == "prompts" else present
                res = ann.annotate(img, free, mode="open")
            times.append(time.perf_counter() - t)
            if kind in ("prompts", "bare"):  # open-vocabulary ids follow the given names → class ids
                lut = np.array([0] + [names.index(c) + 1 for c in present])
                pred = lut[res.labels]
            else:
                pred = res.labels
            cm.update(gt, pred)
            if kind == "auto" and "DenseCRF" not in label:
                got, want = set(res.classes), set(present)
                tagstats["tp"] += len(got & want)
                tagstats["fp"] += len(got - want)
                tagstats["fn"] += len(want - got)
                tagstats["exact"] += got == want
        r = cm.compute()
        rows[label] = {"miou": r["miou"], "iou_per_class": dict(zip(["background", *names], map(float, r["iou"]))),
                       "s_per_image_median": statistics.median(times), "s_per_image_min": min(times),
                       "images": n}
        print(f"{label}: mIoU {100 * r['miou']:.1f}  {statistics.median(times):.3f} s/img", flush=True)
        write(rows, tagstats, partial=True)
    lines = write(rows, tagstats, partial=False)
    if a.panel:
        draw_panel(model, val, Path(a.panel), threshold=threshold)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

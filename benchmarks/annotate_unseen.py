"""Classes the decoder never saw: a demo decoder trained on 6 of the demo world's 8 classes, then
the 2 held-out classes annotated by name (``weclip_infer.Annotator``, open vocabulary).

    python benchmarks/annotate_unseen.py [--world data/demo_world_unseen] [--n-train 600]
                                         [--max-iters 300] [--threads 2] [--max-val 300]

Steps:

1. the demo world (``python -m weclip_infer.demo.make_world --out WORLD --n-train N --n-val 300``,
   seed 0: its val images are the standard demo val split that ``benchmarks/annotate.py`` uses,
   since split ``s`` image ``k`` is ``generate_sample(seed, SPLIT_OFFSETS[s] + k)`` whatever the
   train count; checked against the generator below);
2. a custom training set over the TRAIN images: ``labels.csv`` (image,labels) naming only the 6
   seen classes, ``classes.txt`` with those 6; the last two classes of the world are held out.
   Images whose only objects are held-out classes are left out of ``labels.csv`` (an empty tag
   set has no class to explain); images with seen and held-out objects keep only the seen tags,
   so the held-out objects there are unlabelled, as in real data;
3. ``python -m weclip_infer.train --config custom ...`` with the demo recipe (prompts, background
   prompts, decoder depth, box threshold, PAR iterations, crop 256, batch 4) on the CPU;
4. the val images that contain a held-out class, annotated in open mode with the held-out names
   (the world's prompts, e.g. "pink heart"), by the 6-class checkpoint and, for reference, by the
   shipped 8-class demo model: IoU per held-out class and mIoU over background + the 2 classes
   (ground truth: the seen classes count as background, since they were not asked for). Open
   mode refines with the static CLIP attention by default, which does not use the decoder; the
   ``rfm`` rows use the decoder's affinity instead, the part of the 6-class model that was
   trained without the held-out classes. A second set of rows names every class in the image
   (seen ones by their prompts too) and scores all classes, reporting the held-out ones.

Writes ``benchmarks/results/annotate_unseen.{json,md}``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEMO_MODEL = ROOT / "weclip_infer" / "assets" / "demo_model"


def cpu_name() -> str:
    """The processor model, as the library reads it (weclip_infer.hardware)."""
    from weclip_infer.hardware import cpu_features

    return cpu_features().model


def yaml_list(items: list) -> str:
    return "[" + ", ".join(items) + "]"


def build_world(world: Path, n_train: int, n_val: int) -> dict:
    """Make (or resume/reuse) the world and check its val split is the standard demo val split."""
    cmd = [sys.executable, "-m", "weclip_infer.demo.make_world", "--out", str(world), "--n-train", str(n_train),
           "--n-val", str(n_val), "--quiet"]
    subprocess.run(cmd, check=True, cwd=ROOT)
    from weclip_infer.demo.generate import generate_sample
    from weclip_infer.demo.world_config import SPLIT_OFFSETS, WorldConfig

    meta = json.loads((world / "meta.json").read_text())
    assert meta["seed"] == 0 and meta["split_index_offsets"]["val"] == SPLIT_OFFSETS["val"], meta
    from PIL import Image

    for k in (1, n_val):  # first and last val image: the file's mask is the generator's
        want = generate_sample(0, SPLIT_OFFSETS["val"] + k, WorldConfig()).mask
        got = np.asarray(Image.open(world / "SegmentationClassAug" / f"demo_val_{k:06d}.png"))
        assert np.array_equal(want, got), f"val image {k} differs from the standard demo val split"
    return {"command": " ".join(["python", *cmd[1:]]), "seed": 0, "val_offset": SPLIT_OFFSETS["val"],
            "val_split_checked": "masks of val images 1 and N equal generate_sample(0, val_offset + k)"}


def write_training_set(world: Path, seen: list, dest: Path) -> dict:
    """labels.csv (train images, seen-class tags only) and classes.txt (the seen classes)."""
    meta = json.loads((world / "classes.json").read_text())
    names = meta["class_names"]
    labels = json.loads((world / "cls_labels.json").read_text())
    train = (world / "train.txt").read_text().split()
    dest.mkdir(parents=True, exist_ok=True)
    rows, skipped, with_unseen = ["image,labels"], 0, 0
    for name in train:
        present = [names[i] for i, v in enumerate(labels[name]) if v]
        tags = [c for c in present if c in seen]
        if len(tags) < len(present):
            with_unseen += 1
        if not tags:
            skipped += 1
            continue
        rows.append(f"{name}.jpg," + ";".join(tags))
    (dest / "labels.csv").write_text("\n".join(rows) + "\n")
    (dest / "classes.txt").write_text("\n".join(seen) + "\n")
    return {"train_images": len(train), "labelled": len(rows) - 1, "skipped_only_unseen": skipped,
            "with_unseen_objects": with_unseen, "with_unseen_objects_kept_seen_tags_only": with_unseen - skipped}


def train(world: Path, data: Path, run: Path, seen: list, prompts: dict, bg: list, a) -> dict:
    overrides = [
        f"data.root={world / 'JPEGImages'}", f"data.labels_file={data / 'labels.csv'}",
        f"data.class_names_file={data / 'classes.txt'}", "model.backbone.clip_weights=demo",
        f"train.max_iters={a.max_iters}",
        # the demo config's recipe, on the custom data kind
        f"model.text.class_prompts={yaml_list([prompts[c] for c in seen])}", f"model.text.bg_prompts={yaml_list(bg)}",
        "model.backbone.normalize=imagenet", "model.decoder.num_layers=3", "model.refine.box_threshold=0.4",
        "model.par.num_iter=20", "model.inference.long_side=256", f"train.batch_size={a.batch_size}",
        f"train.warmup_iters={max(1, round(50 * a.max_iters / 1200))}", "train.seed=1",
        f"data.crop_size={a.crop_size}", "data.workers=0",
        "train.progress=false", "train.tensorboard=false", "train.plots=false",
        f"train.checkpoint_every={a.max_iters}", "train.log_every=20",
    ]
    cmd = [sys.executable, "-m", "weclip_infer.train", "--config", "custom", *overrides, "--device", "cpu",
           "--out", str(run)]
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads), HF_HUB_OFFLINE="1")
    t = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    secs = time.time() - t
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-5000:])
        raise SystemExit(f"training failed (exit {proc.returncode})")
    summary = json.loads((run / "summary.json").read_text())
    return {"command": " ".join(["python", *cmd[1:]]), "seconds": round(secs, 1), "threads": a.threads,
            "iterations": summary["iterations"], "final_loss": summary["final_loss"],
            "checkpoint": summary["checkpoint"]}


def evaluate(model, val, names: list, unseen: list, prompts: dict, n: int, refinement: str, which: str) -> dict:
    """Open-mode annotation of the val images containing a held-out class. ``which``: ``unseen``
    (only the held-out names asked; GT seen classes → background) or ``all`` (every present class
    by its prompt; GT all classes)."""
    from weclip_infer import Annotator
    from weclip_infer.metrics import ConfusionMatrix

    ann = Annotator(model, refinement=refinement)
    uid = [names.index(c) for c in unseen]
    C = 1 + (len(unseen) if which == "unseen" else len(names))
    cm = ConfusionMatrix(C)
    times, count = [], 0
    for i in range(n):
        s = val.samples[i]
        present = [names[k] for k in np.flatnonzero(s.label)]
        if not any(c in unseen for c in present):
            continue
        asked = [c for c in present if c in unseen] if which == "unseen" else present
        t = time.perf_counter()
        res = ann.annotate(str(s.image), [prompts[c] for c in asked], mode="open")
        times.append(time.perf_counter() - t)
        gt = val.load_mask(s, res.labels.shape)
        if which == "unseen":
            gl = np.zeros(256, dtype=np.int64)  # GT: seen classes → background
            for j, k in enumerate(uid):
                gl[k + 1] = j + 1
            gl[255] = 255
            gt = gl[gt]
            lut = np.array([0] + [unseen.index(c) + 1 for c in asked])
        else:
            lut = np.array([0] + [names.index(c) + 1 for c in asked])
        cm.update(gt, lut[res.labels])
        count += 1
    r = cm.compute()
    iou = [float(x) for x in r["iou"]]
    per = {"background": iou[0]}
    for j, c in enumerate(unseen):
        per[c] = iou[1 + j] if which == "unseen" else iou[1 + names.index(c)]
    return {"iou": per, "miou_bg_plus_unseen": float(np.mean([per["background"], *(per[c] for c in unseen)])),
            "miou_all_classes_in_cm": float(r["miou"]), "images": count,
            "s_per_image_median": statistics.median(times) if times else None}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", default="data/demo_world_unseen")
    ap.add_argument("--n-train", type=int, default=600)
    ap.add_argument("--n-val", type=int, default=300)
    ap.add_argument("--max-iters", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--crop-size", type=int, default=256)
    ap.add_argument("--max-val", type=int, default=300, help="first N val images searched for held-out classes")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--holdout", type=int, default=2, help="hold out the last N classes of the world")
    ap.add_argument("--run", default="runs/annotate_unseen", help="training run folder")
    ap.add_argument("--reuse", action="store_true", help="reuse the run folder's checkpoint, no training")
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--name", default="annotate_unseen")
    a = ap.parse_args()
    import torch

    torch.set_num_threads(a.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from weclip_infer import load_checkpoint
    from weclip_infer.data import build_dataset

    t0 = time.time()
    world = Path(a.world).resolve()
    wmeta = build_world(world, a.n_train, a.n_val)
    cls = json.loads((world / "classes.json").read_text())
    names, prompts = list(cls["class_names"]), dict(zip(cls["class_names"], cls["class_prompts"]))
    seen, unseen = names[: -a.holdout], names[-a.holdout:]
    data = world / "seen_classes"
    dmeta = write_training_set(world, seen, data)
    run = Path(a.run).resolve()
    if a.reuse:
        s = json.loads((run / "summary.json").read_text())
        tmeta = {"reused": str(run), "iterations": s["iterations"], "checkpoint": s["checkpoint"]}
    else:
        if (run / "summary.json").exists():
            raise SystemExit(f"error: {run} holds a finished run; pass --reuse or another --run")
        tmeta = train(world, data, run, seen, prompts, list(cls["bg_prompts"]), a)
        print(f"trained {tmeta['iterations']} iterations in {tmeta['seconds']} s", flush=True)

    val = build_dataset("voc", str(world), "val", class_names=names)
    n = min(len(val), a.max_val)
    mine = load_checkpoint(tmeta["checkpoint"], device="cpu").eval()
    assert list(mine.classes.names) == seen
    models = {f"{len(seen)}-class decoder (held-out classes never seen)": mine,
              "shipped 8-class demo model (reference)": load_checkpoint(str(DEMO_MODEL), device="cpu").eval()}
    rows = {}
    for which in ("unseen", "all"):
        for refinement in ("static", "rfm"):
            for label, model in models.items():
                key = f"{label} | names: {'held-out only' if which == 'unseen' else 'all present'} | {refinement}"
                rows[key] = dict(model=label, names=which, refinement=refinement,
                                 **evaluate(model, val, names, unseen, prompts, n, refinement, which))
                r = rows[key]
                print(f"{key}: " + "  ".join(f"{c} {100 * v:.1f}" for c, v in r["iou"].items())
                      + f"  mIoU {100 * r['miou_bg_plus_unseen']:.1f}", flush=True)
    meta = {"world": wmeta, "training_set": dmeta, "training": tmeta, "seen": seen, "unseen": unseen,
            "unseen_names_asked": [prompts[c] for c in unseen], "val_images_searched": n,
            "threads": a.threads, "cpu": cpu_name(), "cpus_visible": os.cpu_count(), "torch": torch.__version__,
            "load_average_end": os.getloadavg(), "seconds_total": round(time.time() - t0, 1),
            "args": vars(a)}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{a.name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    u1, u2 = unseen
    tr = tmeta
    held = ", ".join(f'{c} ("{prompts[c]}")' for c in unseen)
    lines = [
        f"# Classes the decoder never saw ({u1}, {u2})", "",
        f"Decoder trained on the demo world's first {len(seen)} classes ({', '.join(seen)}); held out: "
        f"{held}. Training set: {dmeta['labelled']} of "
        f"{dmeta['train_images']} train images (seen-class tags only; {dmeta['skipped_only_unseen']} images whose "
        f"only objects are held-out classes left out, {dmeta['with_unseen_objects_kept_seen_tags_only']} with "
        "held-out objects kept with their seen tags only).",
        f"Training: {tr['iterations']} iterations, batch {a.batch_size}, crop {a.crop_size}, CPU "
        + (f"{tr['seconds']} s, {a.threads} threads" if 'seconds' in tr else "(reused run)")
        + f", {cpu_name()}.",
        f"Evaluation: the {rows[next(iter(rows))]['images']} of the first {n} standard demo val images that contain "
        f"{u1} or {u2}, annotated in open mode by name (the world's prompts); labels at 256x256, exact GT.", "",
        "| model | names asked | refinement | " + f"{u1} IoU | {u2} IoU | mIoU (bg + {u1} + {u2}) | s / image |",
        "|---|---|---|---|---|---|---|"]
    for r in rows.values():
        lines.append(f"| {r['model']} | {'held-out only' if r['names'] == 'unseen' else 'all present'} | "
                     f"{r['refinement']} | {100 * r['iou'][u1]:.1f} | {100 * r['iou'][u2]:.1f} | "
                     f"{100 * r['miou_bg_plus_unseen']:.1f} | {r['s_per_image_median']:.3f} |")
    lines += ["",
              "- names asked 'held-out only': the held-out classes present in the image; ground truth maps the seen "
              "classes to background. 'all present': every class in the image by its prompt; the IoU columns are "
              "the held-out classes' IoU in the full confusion matrix, the mIoU column bg + the 2 held-out classes.",
              "- refinement 'static' is open mode's default (CLIP attention only: the decoder is not used, so both "
              "models should agree); 'rfm' refines with the decoder's affinity.",
              "- The demo CLIP itself was pre-trained on all 8 classes; only the decoder never saw the held-out ones.",
              f"- Total {meta['seconds_total']} s; load average at the end {meta['load_average_end'][0]:.1f}.", ""]
    (out / f"{a.name}.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""What the frozen CLIP's arithmetic changes: fp32 vs bf16 (``backbone.precision``), and the
fp32 path with oneDNN's split-bf16 kernels vs the default fp32 kernels.

    python benchmarks/precision.py [--world data/demo_world] [--max-images 300] [--threads 2]

Measured, in one run on this machine:
* the shipped demo model on the demo world's val split: decoder mIoU (multi-scale + flip) with
  ``inference.precision`` bf16 (frozen CLIP and decoder) and the training-time pseudo labels
  (given the image-level labels) with ``backbone.precision`` bf16: mIoU and pixel agreement with
  fp32;
* the full-size random ViT-B/16 (OpenAI layout): relative logit error of ``segment`` at 320²
  (inference in bf16), and pseudo-label agreement with fp32 on random images with two classes
  each (frozen CLIP in bf16);
* the time of the frozen CLIP blocks (batch 4, 320²) on each path.
Writes ``benchmarks/results/precision.{json,md}``.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent


def _plain_fp32():
    """A context in which ``precision='fp32'`` uses the default kernels (no oneDNN split-bf16)."""
    from unittest import mock

    from weclip_infer import hardware

    return mock.patch.object(hardware, "fast_fp32_matmul_available", lambda: (False, "disabled for comparison"))


def _demo(world: Path, max_images: int) -> dict:
    from weclip_infer import Segmenter, load_checkpoint
    from weclip_infer.data import build_dataset
    from weclip_infer.metrics import ConfusionMatrix
    from weclip_infer.quickstart import DEMO_MODEL_DIR

    models = {}
    for prec in ("fp32", "bf16"):
        m = load_checkpoint(DEMO_MODEL_DIR, device="cpu").eval()
        m.cfg.backbone.precision = prec
        models[prec] = m
    names = models["fp32"].classes.names
    ds = build_dataset("voc", world, "val", class_names=names)
    n = min(len(ds), max_images)
    out: dict = {"val_images": n}
    C = len(names) + 1
    for prec, m in models.items():
        seg = Segmenter(m, precision=prec)  # inference.precision: the frozen CLIP and the decoder
        cm = ConfusionMatrix(C)
        t0 = time.perf_counter()
        preds = []
        for i in range(n):
            smp = ds.samples[i]
            res = seg.predict(str(smp.image))
            preds.append(res.labels)
            cm.update(ds.load_mask(smp, res.labels.shape), res.labels)
        out[f"decoder_miou_{prec}"] = cm.compute()["miou"]
        out[f"decoder_s_per_image_{prec}"] = (time.perf_counter() - t0) / n
        out[f"_preds_{prec}"] = preds
    out["decoder_pixel_agreement"] = float(np.mean([np.mean(a == b) for a, b in
                                                    zip(out.pop("_preds_fp32"), out.pop("_preds_bf16"))]))
    pls = {}
    for prec, m in models.items():
        cm = ConfusionMatrix(C)
        labs = []
        for s in range(0, n, 10):
            items = [ds[i] for i in range(s, min(n, s + 10))]
            x = torch.stack([it["image"] for it in items])
            cls = torch.stack([it["cls_label"] for it in items])
            gt = torch.stack([it["mask"] for it in items]).numpy()
            pl = m.pseudo_labels(x, cls, use_rfm=True).numpy()
            cm.update(gt, pl)
            labs.append(pl)
        out[f"pseudo_label_miou_{prec}"] = cm.compute()["miou"]
        pls[prec] = np.concatenate(labs)
    out["pseudo_label_agreement"] = float(np.mean(pls["fp32"] == pls["bf16"]))
    out["decoder_miou_delta_points"] = 100 * (out["decoder_miou_bf16"] - out["decoder_miou_fp32"])
    return out


def _clip_time(m, x, repeats: int = 3) -> float:
    ts = []
    for r in range(repeats + 1):
        t = time.perf_counter()
        with torch.no_grad():
            m._features(x, attn_blocks=3, pooled=True)
        if r:
            ts.append(time.perf_counter() - t)
    return float(np.median(ts))


def _fullsize() -> dict:
    from weclip_infer import build_model

    torch.manual_seed(0)
    base = build_model({"backbone": {"clip_weights": "random"}, "text": {"dataset": "voc"}}, device="cpu").eval()
    g = torch.Generator().manual_seed(0)
    x = base.normalize(torch.randint(0, 256, (4, 3, 320, 320), generator=g).float())
    cls = torch.zeros(4, 20)
    for b in range(4):
        cls[b, [b * 3 % 20, (b * 3 + 7) % 20]] = 1
    out: dict = {}
    with torch.no_grad():
        with _plain_fp32():
            ref = base.segment(x)
            ref_pl = base.pseudo_labels(x, cls, use_rfm=False)
            out["clip_blocks_s_fp32_default_kernels"] = _clip_time(base, x)
        fast = base.segment(x)
        fast_pl = base.pseudo_labels(x, cls, use_rfm=False)
        out["clip_blocks_s_fp32_onednn"] = _clip_time(base, x)
        base.cfg.backbone.precision = "bf16"
        bf = base.segment(x, precision="bf16")
        bf_pl = base.pseudo_labels(x, cls, use_rfm=False)
        out["clip_blocks_s_bf16"] = _clip_time(base, x)
        base.cfg.backbone.precision = "fp32"
    scale = float(ref.abs().max())
    out["logit_max_rel_error_fp32_onednn"] = float((fast - ref).abs().max()) / scale
    out["logit_max_rel_error_bf16"] = float((bf - ref).abs().max()) / scale
    out["pseudo_label_agreement_fp32_onednn"] = float((fast_pl == ref_pl).float().mean())
    out["pseudo_label_agreement_bf16"] = float((bf_pl == ref_pl).float().mean())
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", default="data/demo_world")
    ap.add_argument("--max-images", type=int, default=300)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(HERE / "results"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from weclip_infer.hardware import cpu_features, fast_fp32_matmul_available

    world = Path(a.world)
    if not (world / "ImageSets" / "Segmentation" / "val.txt").is_file():
        subprocess.run([sys.executable, "-m", "weclip_infer.demo.make_world", "--out", str(world), "--n-train", "0",
                        "--n-val", str(a.max_images)], check=True)
    t0 = time.time()
    res = {"cpu": cpu_features().as_dict(), "threads": a.threads, "torch": torch.__version__,
           "fast_fp32": fast_fp32_matmul_available()[1], "demo_world": _demo(world, a.max_images),
           "vit_b16_random": _fullsize()}
    res["seconds"] = time.time() - t0
    d, f = res["demo_world"], res["vit_b16_random"]
    md = "\n".join([
        f"Frozen-CLIP arithmetic, {res['cpu']['model']} ({res['cpu']['isa']}), {a.threads} threads, "
        f"torch {torch.__version__}.",
        f"fp32 path here: {res['fast_fp32']}.", "",
        f"Demo world val ({d['val_images']} images, shipped demo model), mIoU %:", "",
        "| | fp32 | bf16 | agreement |", "|---|---|---|---|",
        "| decoder, multi-scale + flip (inference.precision) | "
        f"{100 * d['decoder_miou_fp32']:.2f} | {100 * d['decoder_miou_bf16']:.2f} | "
        f"{100 * d['decoder_pixel_agreement']:.2f}% of pixels |",
        "| pseudo labels (RFM + PAR, image-level labels given; backbone.precision) | "
        f"{100 * d['pseudo_label_miou_fp32']:.2f} | "
        f"{100 * d['pseudo_label_miou_bf16']:.2f} | {100 * d['pseudo_label_agreement']:.2f}% of pixels |", "",
        f"bf16 changes the decoder's mIoU by {d['decoder_miou_delta_points']:+.2f} points.", "",
        "Full-size random ViT-B/16, batch 4, 320², against fp32 with the default kernels:", "",
        "| | fp32 (oneDNN split-bf16) | bf16 |", "|---|---|---|",
        f"| max relative logit error | {f['logit_max_rel_error_fp32_onednn']:.1e} | "
        f"{f['logit_max_rel_error_bf16']:.1e} |",
        f"| pseudo-label agreement | {100 * f['pseudo_label_agreement_fp32_onednn']:.2f}% | "
        f"{100 * f['pseudo_label_agreement_bf16']:.2f}% |",
        f"| frozen CLIP blocks, s (default fp32 kernels: {f['clip_blocks_s_fp32_default_kernels']:.2f}) | "
        f"{f['clip_blocks_s_fp32_onednn']:.2f} | {f['clip_blocks_s_bf16']:.2f} |", ""])
    print(md)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "precision.json").write_text(json.dumps(res, indent=2) + "\n")
    (out / "precision.md").write_text(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())

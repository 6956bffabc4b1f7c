"""The paper's ablation ladder measured on the demo world (held-out val split, exact GT).

    python benchmarks/demo_ablation.py --world data/demo_world \
        --rfm runs/demo_rfm --norfm runs/demo_norfm --full runs/demo_full [--noref runs/demo_noref] [--max-images 300]

Each run folder is a training output (``checkpoints/latest`` is used) or a checkpoint directory.
Rows: initial CAM · + static refinement (CLIP-ES) · + PAR · RFM pseudo labels (+PAR) with the
RFM-trained decoder's affinity · Table-6 refining maps · decoders (single scale, + multi-scale
and flip, + DenseCRF) · fully supervised upper bound · zero-shot accuracy of the small CLIP.
Writes ``benchmarks/results/<name>.{md,json}`` (``--name``, default ``demo_ablation``).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent


def resolve(path: str) -> Path:
    p = Path(path)
    latest = p / "checkpoints" / "latest"
    if latest.is_file():
        name = latest.read_text().strip()
        q = Path(name)
        return q if q.is_absolute() else p / "checkpoints" / name
    return p


def labels_from_cams(cams: list, keys: list, size) -> torch.Tensor:
    """Per image K×h×w CAMs → argmax over [1 − max; min-max-normalised CAMs] at ``size``."""
    from weclip_infer.cam import minmax_normalize

    out = []
    for c, k in zip(cams, keys):
        up = F.interpolate(minmax_normalize(c)[None], size=size, mode="bilinear", align_corners=False)[0]
        stack = torch.cat([1 - up.max(0, keepdim=True).values, up], 0)
        lut = torch.tensor([0] + [i + 1 for i in k])
        out.append(lut[stack.argmax(0)])
    return torch.stack(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", default="data/demo_world")
    ap.add_argument("--rfm", required=True)
    ap.add_argument("--norfm", default=None)
    ap.add_argument("--full", default=None)
    ap.add_argument("--noref", default=None,
                    help="decoder trained with model.refine.use_refinement=false (CAM + PAR labels)")
    ap.add_argument("--max-images", type=int, default=300)
    ap.add_argument("--batch", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-crf", action="store_true")
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--name", default="demo_ablation",
                    help="output file stem (e.g. demo_ablation_badge for the badge world)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from weclip_infer import Segmenter, load_checkpoint
    from weclip_infer.crf import crf_available
    from weclip_infer.data import build_dataset
    from weclip_infer.metrics import ConfusionMatrix, format_iou_table

    t_start = time.time()
    model = load_checkpoint(resolve(a.rfm), device="cpu").eval()
    names = ["background", *model.classes.names]
    C = len(names)
    ds = build_dataset("voc", a.world, "val", class_names=model.classes.names)
    n = min(len(ds), a.max_images)
    rows: dict = {}

    def cm():
        return ConfusionMatrix(C)

    # ---- pseudo-label stages (GT image-level labels, full 256² images, no augmentation) ----
    stages = {k: cm() for k in ("initial CAM", "+ static refinement (CLIP-ES)", "+ static refinement + PAR",
                                "initial CAM + PAR (no refinement)", "RFM pseudo labels (+PAR)")}
    table6 = {k: cm() for k in ("af", "as", "g_as", "af_as", "all")}
    r = model.cfg.refine
    for s in range(0, n, a.batch):
        items = [ds[i] for i in range(s, min(n, s + a.batch))]
        x = torch.stack([it["image"] for it in items])
        cls = torch.stack([it["cls_label"] for it in items])
        gt = torch.stack([it["mask"] for it in items]).numpy()
        size = x.shape[-2:]
        with torch.no_grad():
            tr = model.intermediates(x, cls, use_rfm=False)
            stages["initial CAM"].update(gt, labels_from_cams(tr["cam_init"], tr["cam_keys"], size).numpy())
            stages["+ static refinement (CLIP-ES)"].update(
                gt, labels_from_cams(tr["cam_static"], tr["cam_keys"], size).numpy())
            stages["+ static refinement + PAR"].update(gt, tr["pseudo_label"].numpy())
            r.use_refinement = False
            stages["initial CAM + PAR (no refinement)"].update(gt, model.pseudo_labels(x, cls, use_rfm=False).numpy())
            r.use_refinement = True
            for mode, meter in table6.items():
                r.refine_map = mode
                pl = model.pseudo_labels(x, cls, use_rfm=True).numpy()
                meter.update(gt, pl)
                if mode == "all":
                    stages["RFM pseudo labels (+PAR)"].update(gt, pl)
            r.refine_map = "all"
    for k, m in stages.items():
        rows[k] = m.compute()["miou"]
    t6 = {k: m.compute()["miou"] for k, m in table6.items()}

    # ---- decoders through the shared predictor ----
    def eval_seg(seg, **opts):
        m = cm()
        for i in range(n):
            smp = ds.samples[i]
            res = seg.predict(str(smp.image), **opts)
            m.update(ds.load_mask(smp, res.labels.shape), res.labels)
        return m.compute()

    seg = Segmenter(model)
    dec = {}
    if a.norfm:
        seg_n = Segmenter(load_checkpoint(resolve(a.norfm), device="cpu"))
        dec["decoder trained without RFM (static pseudo labels), single scale"] = eval_seg(
            seg_n, scales=[1.0], flip=False)["miou"]
        dec["decoder trained without RFM, multi-scale + flip"] = eval_seg(seg_n)["miou"]
    if a.noref:
        seg_r = Segmenter(load_checkpoint(resolve(a.noref), device="cpu"))
        dec["decoder trained without refinement (initial CAM + PAR labels), multi-scale + flip"] = (
            eval_seg(seg_r)["miou"])
    dec["decoder trained with RFM, single scale"] = eval_seg(seg, scales=[1.0], flip=False)["miou"]
    ms = eval_seg(seg)
    dec["decoder trained with RFM, multi-scale + flip"] = ms["miou"]
    if not a.no_crf and crf_available():
        t0 = time.time()
        dec["decoder trained with RFM, multi-scale + flip + DenseCRF"] = eval_seg(seg, crf=True)["miou"]
        crf_s = (time.time() - t0) / n
    else:
        crf_s = None
    if a.full:
        seg_f = Segmenter(load_checkpoint(resolve(a.full), device="cpu"))
        dec["fully supervised decoder (same frozen CLIP), multi-scale + flip"] = eval_seg(seg_f)["miou"]

    # ---- zero-shot classification of the small CLIP (single-object val images) ----
    from weclip_infer.backbone import FrozenCLIP, load_clip
    from weclip_infer.text import text_embeddings

    clip = load_clip(model.cfg.backbone)
    bb = FrozenCLIP(clip)
    temb = text_embeddings(bb, model.classes.prompts, model.classes.templates)
    correct = total = 0
    with torch.no_grad():
        for i in range(n):
            it = ds[i]
            if int(it["cls_label"].sum()) != 1:
                continue
            feats, _, _ = bb.forward_features(it["image"][None], num_blocks=bb.num_blocks, need_attn=False)
            pred = int((bb.pooled_embedding(feats[-1]) @ temb.t()).argmax())
            correct += int(pred == int(it["cls_label"].argmax()))
            total += 1
    zs = correct / max(total, 1)

    full = dec.get("fully supervised decoder (same frozen CLIP), multi-scale + flip")
    result = {"val_images": n, "pseudo_labels": rows, "table6_refining_map": t6, "decoders": dec,
              "zero_shot_top1": zs, "zero_shot_images": total, "crf_s_per_image": crf_s,
              "ws_over_fully_supervised": (ms["miou"] / full) if full else None,
              "per_class_iou_rfm_ms": format_iou_table(ms, names), "seconds": time.time() - t_start}
    lines = [f"Demo world val split ({a.world}), {n} images, exact GT. mIoU (%), background included.", "",
             "| stage | mIoU |", "|---|---|"]
    lines += [f"| {k} | {100 * v:.1f} |" for k, v in rows.items()]
    lines += [f"| {k} | {100 * v:.1f} |" for k, v in dec.items()]
    lines += ["", "Refining map R (paper Table 6), RFM pseudo labels + PAR, affinity from the RFM-trained decoder:", "",
              "| R | mIoU |", "|---|---|"]
    label6 = {"af": "A_f only", "as": "A_s only (all maps averaged)", "g_as": "G·A_s", "af_as": "A_f ⊙ A_s",
              "all": "A_f ⊙ G·A_s (WeCLIP)"}
    lines += [f"| {label6[k]} | {100 * v:.1f} |" for k, v in t6.items()]
    lines += ["", f"Zero-shot top-1 of the small CLIP on {total} single-object val images: {100 * zs:.1f}% "
                  f"(chance {100 / (C - 1):.1f}%)."]
    if full:
        lines.append(f"Weakly supervised (RFM, MS+flip) / fully supervised: {100 * ms['miou'] / full:.1f}%.")
    if crf_s:
        lines.append(f"DenseCRF adds {crf_s:.3f} s per 256×256 image.")
    md = "\n".join(lines) + "\n"
    print(md)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{a.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{a.name}.md").write_text(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())

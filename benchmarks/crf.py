"""DenseCRF backends side by side: accuracy on the demo world and time per image.

    python benchmarks/crf.py [--world data/demo_world] [--max-images 300] [--threads 2]

For each held-out val image of the demo world (generated into a temporary folder when
``--world`` does not exist: the val split only depends on the world seed), the shipped demo model
predicts class probabilities (scales 1 and 0.75 + flip, no CRF); the label map is then taken
as is, refined by pydensecrf (the reference backend) and by the torch backend, with the same
CRF parameters. Reports mIoU for the three and the marginals' agreement of the two backends.
Time per image is measured on a 375×500 version of a val image (the size of a typical VOC photo):
median of ``--repeats`` calls after one warm-up, each backend given the same probabilities.
Writes ``benchmarks/results/crf.{json,md}``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent


def cpu_model() -> str:
    """The processor model, as the library reads it (weclip_infer.hardware)."""
    from weclip_infer.hardware import cpu_features

    return cpu_features().model


def machine_info(threads: int) -> dict:
    return {"cpu": cpu_model(), "logical_cpus": os.cpu_count(), "threads": threads, "torch": torch.__version__,
            "python": platform.python_version(), "load_average_start": list(os.getloadavg())}


def ensure_world(path: Path, n_val: int) -> Path:
    if (path / "val.txt").is_file():
        return path
    from weclip_infer.demo.make_world import main as make_world

    out = Path(tempfile.mkdtemp(prefix="weclip_crf_world_"))
    rc = make_world(["--out", str(out), "--n-train", "1", "--n-val", str(n_val), "--seed", "0", "--quiet"])
    if rc != 0:
        raise SystemExit(f"could not generate the demo world into {out}")
    return out


def time_call(fn, repeats: int) -> dict:
    """Wall and process-CPU seconds per call (median and minimum after a warm-up). CPU seconds
    are the sum over threads; on a shared machine they vary less than wall time."""
    fn()  # warm-up (imports, caches)
    wall, cpu = [], []
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return {"median_s": round(statistics.median(wall), 4), "min_s": round(min(wall), 4),
            "cpu_median_s": round(statistics.median(cpu), 4), "runs": repeats}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", default="data/demo_world")
    ap.add_argument("--max-images", type=int, default=300)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--device", default="cpu", help="device of the torch backend (cpu, cuda)")
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--name", default="crf")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from PIL import Image

    from weclip_infer import Segmenter
    from weclip_infer.crf import crf_available, dense_crf
    from weclip_infer.crf.permutohedral import dense_crf_torch
    from weclip_infer.data import build_dataset
    from weclip_infer.imageio import load_image
    from weclip_infer.metrics import ConfusionMatrix
    from weclip_infer.quickstart import DEMO_MODEL_DIR

    if not crf_available():
        print("error: pydensecrf is needed for the reference backend (pip install 'weclip-infer[crf]')",
              file=sys.stderr)
        return 2
    info = machine_info(a.threads)
    dev = torch.device(a.device)
    seg = Segmenter.from_pretrained(DEMO_MODEL_DIR, device="cpu", backend="eager")
    C = len(seg.class_names)
    world = ensure_world(Path(a.world), a.max_images)
    ds = build_dataset("voc", str(world), "val", class_names=seg.class_names[1:])
    n = min(len(ds), a.max_images)
    meters = {k: ConfusionMatrix(C) for k in ("no CRF", "densecrf", "torch")}
    agree, max_diff = [], 0.0
    t_dense = t_torch = 0.0
    for i in range(n):
        smp = ds.samples[i]
        img = np.array(load_image(smp.image))  # writable copy
        res = seg.predict(img, crf=False, keep_probs=True)
        gt = ds.load_mask(smp, res.labels.shape)
        t = time.perf_counter()
        q_ref = dense_crf(img, res.probs)
        t_dense += time.perf_counter() - t
        t = time.perf_counter()
        q_t = dense_crf_torch([torch.from_numpy(img).to(dev)], [torch.from_numpy(res.probs).to(dev)])[0].cpu().numpy()
        t_torch += time.perf_counter() - t
        meters["no CRF"].update(gt, res.labels)
        meters["densecrf"].update(gt, q_ref.argmax(0))
        meters["torch"].update(gt, q_t.argmax(0))
        agree.append(float((q_ref.argmax(0) == q_t.argmax(0)).mean()))
        max_diff = max(max_diff, float(np.abs(q_ref - q_t).max()))
    miou = {k: round(float(m.compute()["miou"]), 4) for k, m in meters.items()}

    # time per image at 375×500 (same probabilities for both backends)
    img = np.asarray(Image.fromarray(load_image(ds.samples[0].image)).resize((500, 375), Image.BILINEAR))
    probs = seg.predict(img, crf=False, keep_probs=True).probs
    img_t, probs_t = torch.from_numpy(np.ascontiguousarray(img)).to(dev), torch.from_numpy(probs).to(dev)

    def run_torch():
        dense_crf_torch([img_t], [probs_t])
        if dev.type == "cuda":
            torch.cuda.synchronize()

    from weclip_infer.crf import permutohedral
    from weclip_infer.crf.permutohedral import dense_crf_labels_torch

    compiled = dev.type == "cpu" and permutohedral._compiled_construction() is not None
    if compiled:
        import numba

        info["lattice_construction"] = f"compiled loops (numba {numba.__version__})"
    else:
        info["lattice_construction"] = "torch operations"
    timing = {"densecrf": time_call(lambda: dense_crf(img, probs), a.repeats)}
    for threads in sorted({1, a.threads}):
        torch.set_num_threads(threads)
        timing[f"torch_{threads}_threads"] = time_call(run_torch, a.repeats)
    torch.set_num_threads(a.threads)
    # the label map alone (what Segmenter and the server ask for: no softmax after the last step)
    timing[f"torch_labels_{a.threads}_threads"] = time_call(lambda: dense_crf_labels_torch([img_t], [probs_t]),
                                                           a.repeats)
    if compiled:  # what runs without numba: the lattices built with torch operations
        real = permutohedral._compiled_construction
        permutohedral._compiled_construction = lambda: None
        try:
            timing[f"torch_{a.threads}_threads_torch_construction"] = time_call(run_torch, a.repeats)
        finally:
            permutohedral._compiled_construction = real

    permutohedral._CACHE.clear()  # first image of a new size: the smoothness lattice is built too
    t = time.perf_counter()
    run_torch()
    timing["torch_new_size_s"] = round(time.perf_counter() - t, 4)
    info["load_average_end"] = list(os.getloadavg())
    shared = max(info["load_average_start"][0], info["load_average_end"][0]) > 1.5 * a.threads
    out = {
        "what": "DenseCRF: pydensecrf (reference) vs the torch backend (permutohedral lattice), same parameters",
        "machine": info,
        "note": ("measured while other jobs shared the machine (see load averages); times are indicative, "
                 "the accuracy figures are exact") if shared else "the machine was otherwise idle (load averages)",
        "val_images": n, "classes": C, "torch_device": str(dev),
        "miou": miou,
        "label_agreement_torch_vs_densecrf": round(float(np.mean(agree)), 6),
        "max_marginal_difference": round(max_diff, 6),
        "val_seconds_total": {"densecrf": round(t_dense, 2), "torch": round(t_torch, 2)},
        "time_375x500": timing,
    }
    dest = Path(a.out)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / f"{a.name}.json").write_text(json.dumps(out, indent=1) + "\n")
    md = [
        f"# DenseCRF backends ({n} demo-world val images, shipped demo model)", "",
        f"Machine: {info['cpu']}, {a.threads} threads, torch {info['torch']}; torch CRF on `{dev}`, lattices "
        f"built by {info['lattice_construction']}. "
        f"Load average {info['load_average_start'][0]:.1f} at start, {info['load_average_end'][0]:.1f} at end"
        + (" (other jobs shared the machine: times are indicative)." if shared else "."), "",
        "| | mIoU |", "|---|---|",
        *[f"| {k} | {v * 100:.2f} |" for k, v in miou.items()], "",
        f"Labels of the two backends agree on {np.mean(agree) * 100:.3f} % of the pixels; largest difference of a "
        f"marginal {max_diff:.2e}.", "",
        "| time per 375×500 image | wall, median | wall, min | CPU seconds (all threads), median |",
        "|---|---|---|---|",
        *[f"| {k.replace('_', ' ')} | {v['median_s']:.3f} s | {v['min_s']:.3f} s | {v['cpu_median_s']:.3f} s |"
          for k, v in timing.items() if isinstance(v, dict)],
        f"| torch, first image of a new size ({a.threads} threads) | {timing['torch_new_size_s']:.3f} s | | |", "",
        "pydensecrf is single-threaded C++; the torch backend uses torch's intra-op threads.", "",
    ]
    (dest / f"{a.name}.md").write_text("\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

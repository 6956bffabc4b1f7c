"""Shared network passes inside a server batch vs each request on its own (in-process, no HTTP).

    python benchmarks/batching.py [MODEL_DIR] [--batch 8] [--repeats 5] [--threads 2] [--size 375x500]

Loads MODEL_DIR (default: the embedded demo model) into the serving layer twice — once with the
default ``network_batch`` and once with ``network_batch=1`` (each request's network passes run
alone) — and times ``SegmentationService.handle`` on the same batch of ``--batch`` same-size JPEG
requests, alternating the two for ``--repeats`` rounds. Checks that both give byte-identical
responses. Writes ``benchmarks/results/batching_<timestamp>.json`` and ``.md``. Other jobs on the
machine slow both variants alike (they alternate); the load average is recorded.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir", nargs="?", default=None, help="checkpoint or bundle (default: the demo model)")
    ap.add_argument("--batch", type=int, default=8, help="requests per server batch (default 8)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    ap.add_argument("--size", default="375x500", help="HxW of the request images")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    a = ap.parse_args(argv)
    import torch
    from PIL import Image

    from weclip_infer.predictor import Segmenter
    from weclip_infer.quickstart import DEMO_MODEL_DIR
    from weclip_infer.serving.service import SegmentationService

    torch.set_num_threads(a.threads)
    model_dir = Path(a.model_dir) if a.model_dir else DEMO_MODEL_DIR
    h, w = (int(v) for v in a.size.lower().split("x"))
    rng = np.random.RandomState(0)
    bodies = []
    for _ in range(a.batch):
        buf = io.BytesIO()
        Image.fromarray((rng.rand(h, w, 3) * 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
        bodies.append(buf.getvalue())
    requests = [({"body": bytearray(b)}, {}) for b in bodies]
    services = {}
    for name, nb in (("shared", 16), ("alone", 1)):
        seg = Segmenter.from_pretrained(model_dir, device="cpu")
        services[name] = SegmentationService(seg, seg.max_pixels, network_batch=nb)
        services[name].handle(requests)  # warm-up (first-call costs of each input shape)
        services[name].network.network_calls = 0
    load_before = os.getloadavg()
    times = {k: [] for k in services}
    bodies_out = {}
    for _ in range(a.repeats):
        for name, svc in services.items():
            t0 = time.perf_counter()
            res = svc.handle(requests)
            times[name].append(time.perf_counter() - t0)
            assert all(r.status == 200 for r in res), [r.body[:200] for r in res if r.status != 200]
            bodies_out[name] = [r.body for r in res]
    identical = bodies_out["shared"] == bodies_out["alone"]
    calls = {k: s.network.network_calls for k, s in services.items()}
    res = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "model_dir": str(model_dir), "image_size": [h, w],
        "batch": a.batch, "repeats": a.repeats, "threads": a.threads,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "loadavg_before": load_before,
                    "loadavg_after": os.getloadavg()},
        "seconds_per_batch": {k: {"median": float(np.median(v)), "min": float(min(v))} for k, v in times.items()},
        "images_per_s": {k: a.batch / float(np.median(v)) for k, v in times.items()},
        "network_calls_total": calls, "responses_identical": identical,
    }
    res["speedup_median"] = res["seconds_per_batch"]["alone"]["median"] / res["seconds_per_batch"]["shared"]["median"]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d_%H%M%S")
    (out / f"batching_{stamp}.json").write_text(json.dumps(res, indent=1))
    md = [f"# Shared network passes in a server batch ({res['time']})", "",
          f"- model {model_dir.name}, {a.batch} requests of {h}×{w} per batch, {a.threads} torch threads, "
          f"{os.cpu_count()} CPUs, load average {load_before[0]:.2f} before / {res['machine']['loadavg_after'][0]:.2f} "
          "after (other jobs shared the CPUs)", "",
          "| variant | s per batch (median) | min | images/s | network calls |", "|---|---|---|---|---|"]
    labels = {"shared": "shared passes (network_batch 16)", "alone": "one request at a time (network_batch 1)"}
    for k, label in labels.items():
        md.append(f"| {label} | {res['seconds_per_batch'][k]['median']:.2f} | {res['seconds_per_batch'][k]['min']:.2f} "
                  f"| {res['images_per_s'][k]:.2f} | {calls[k]} |")
    md += ["", f"Speed-up (median): ×{res['speedup_median']:.2f}; responses byte-identical: {identical}."]
    (out / f"batching_{stamp}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0 if identical else 1


if __name__ == "__main__":
    raise SystemExit(main())

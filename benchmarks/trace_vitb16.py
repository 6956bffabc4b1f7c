"""Time and peak memory of one full-size ViT-B/16 WeCLIP ``trace`` at 320×320 on this machine.

Random OpenAI-format weights are loaded through the local-file path (the reference fixture's
generator when available, else random open_clip weights). Prints a table and writes JSON.

    python benchmarks/trace_vitb16.py [--threads 2] [--batch 2] [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--size", type=int, default=320)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--clip", default=None, help="OpenAI-format ViT-B-16 file (default: random weights)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from weclip_infer import build_model

    t0 = time.perf_counter()
    model = build_model({"backbone": {"clip_weights": a.clip or "random"}, "text": {"dataset": "voc"}}, device="cpu").eval()
    build_s = time.perf_counter() - t0
    rss_model = peak_rss_mb()
    g = torch.Generator().manual_seed(0)
    x = model.normalize(torch.randint(0, 256, (a.batch, 3, a.size, a.size), generator=g).float())
    cls = torch.zeros(a.batch, 20)
    for b in range(a.batch):
        cls[b, [b % 20, (b + 7) % 20]] = 1
    rows = {}
    for name, rfm in (("trace static", False), ("trace RFM", True)):
        model.trace(x, cls, use_rfm=rfm)  # warm-up
        ts = []
        for _ in range(a.repeats):
            t = time.perf_counter()
            model.trace(x, cls, use_rfm=rfm)
            ts.append(time.perf_counter() - t)
        rows[name] = statistics.median(ts)
    model.train()
    opt = torch.optim.AdamW(model.decoder.parameters(), lr=2e-3)
    ts = []
    for i in range(a.repeats + 1):
        t = time.perf_counter()
        out = model(x, cls, use_rfm=True)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        if i:
            ts.append(time.perf_counter() - t)
    rows["train step (fwd+bwd+AdamW)"] = statistics.median(ts)
    with torch.inference_mode():
        model.eval()
        ts = []
        for i in range(a.repeats + 1):
            t = time.perf_counter()
            model.segment(x)
            if i:
                ts.append(time.perf_counter() - t)
    rows["segment (inference forward)"] = statistics.median(ts)
    result = {"machine": platform.node(), "cpu": platform.processor(), "torch": torch.__version__, "threads": a.threads,
              "batch": a.batch, "size": a.size, "build_s": build_s, "rss_after_build_mb": rss_model,
              "peak_rss_mb": peak_rss_mb(), "median_s": rows, "date": time.strftime("%Y-%m-%d")}
    print(f"ViT-B/16 WeCLIP, batch {a.batch}, {a.size}×{a.size}, {a.threads} threads, torch {torch.__version__}")
    print("| stage | median s |\n|---|---|")
    for k, v in rows.items():
        print(f"| {k} | {v:.3f} |")
    print(f"| peak RSS | {result['peak_rss_mb']:.0f} MB (after build {rss_model:.0f} MB) |")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"trace_vitb16-{platform.node()}-{result['date']}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

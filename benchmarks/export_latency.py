"""CPU latency of the full-size ViT-B/16 WeCLIP inference graph: eager vs TorchScript vs ONNX Runtime.

Random OpenAI-format weights (the reference fixture's file when given/cached, else random
open_clip weights); the graph is ``WeCLIP.segment`` exported by ``weclip_infer.export``. Inputs
go straight to the graph (no resize): 320×320, 384×512, 512×512 by default. Median of
``--repeats`` runs after ``--warmup`` runs; torch and ONNX Runtime use the same thread count.
Prints a markdown table and writes JSON to ``benchmarks/results/``.

    python benchmarks/export_latency.py [--threads 2] [--repeats 5] [--batch 1] [--clip PATH]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch


def _timeit(fn, x, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn(x)
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn(x)
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--sizes", default="320x320,384x512,512x512")
    ap.add_argument("--clip", default=None, help="OpenAI-format ViT-B-16 file (default: cached test file or random)")
    ap.add_argument("--note", default="", help="free text stored with the results (e.g. 'machine loaded')")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)

    import onnxruntime as ort

    from weclip_infer import build_model
    from weclip_infer.bundle import load_bundle_backend
    from weclip_infer.export import example_input, write_bundle

    clip = a.clip
    cached = Path.home() / ".cache" / "weclip_infer" / "tests" / "reference_random_vitb16.pt"
    if clip is None and cached.is_file():
        clip = str(cached)
    model = build_model({"backbone": {"clip_weights": clip or "random"}, "text": {"dataset": "voc"}},
                        device="cpu").eval()
    sizes = [tuple(int(v) for v in s.lower().split("x")) for s in a.sizes.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        man = write_bundle(model, tmp, parity_cases=((a.batch, *sizes[0]),))
        export_s = time.perf_counter() - t0
        ts_fn, _, _ = load_bundle_backend(tmp, backend="torchscript", device="cpu")
        ort_fn, _, _ = load_bundle_backend(tmp, backend="onnx", device="cpu")

        def eager(x):
            with torch.inference_mode():
                return model.segment(x)

        for h, w in sizes:
            x = example_input(model, a.batch, h, w)
            row = {"input": f"{a.batch}×3×{h}×{w}"}
            for name, fn in (("eager", eager), ("torchscript", ts_fn), ("onnxruntime", ort_fn)):
                row[name] = _timeit(fn, x, a.warmup, a.repeats)
            rows.append(row)
            print(row, flush=True)
    result = {
        "benchmark": "export_latency", "model": "WeCLIP ViT-B/16 (random weights), segment()", "device": "cpu",
        "threads": a.threads, "ort_intra_op_threads": torch.get_num_threads(), "batch": a.batch,
        "warmup": a.warmup, "repeats": a.repeats, "statistic": "median seconds", "export_seconds": export_s,
        "parity": {k: man["parity"][k] for k in ("torchscript", "onnx")}, "rows": rows, "note": a.note,
        "cpu_count": os.cpu_count(), "load_avg": list(os.getloadavg()), "platform": platform.platform(),
        "torch": torch.__version__, "onnxruntime": ort.__version__,
    }
    print(f"\nthreads={a.threads}, batch={a.batch}, median of {a.repeats} after {a.warmup} warm-up; "
          f"load avg {result['load_avg'][0]:.2f} on {os.cpu_count()} CPUs{'; ' + a.note if a.note else ''}\n")
    print("| input | eager (ms) | TorchScript (ms) | ONNX Runtime (ms) | ORT speed-up |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['input']} | {r['eager'] * 1e3:.0f} | {r['torchscript'] * 1e3:.0f} | {r['onnxruntime'] * 1e3:.0f} "
              f"| {r['eager'] / r['onnxruntime']:.2f}× |")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    f = out / f"export_latency_{time.strftime('%Y%m%d-%H%M%S')}.json"
    f.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Batch segmentation wall time with compute threads sized per process vs one thread per CPU in
every process, alone and with two shards running at once on the same machine.

Each configuration runs ``weclip-segment`` (shipped demo model, ``--workers 2``) as separate
processes on the same folder of demo-world JPEGs; "2 shards" starts ``--shard 0/2`` and
``--shard 1/2`` together and reports the time until both have finished. "all CPUs" passes
``--threads <CPUs>`` to every process (what PyTorch picks by itself); "auto" lets
``weclip-segment`` divide the available CPUs by the number of shards.

    python benchmarks/batch_threads.py [--images 60] [--repeats 1]

Writes ``benchmarks/results/batch_threads.json`` and ``.md``. The machine's load average is
recorded with each run: other work on the machine changes these figures.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _make_folder(dst: Path, n: int) -> None:
    from PIL import Image

    from weclip_infer.demo.world import SPLIT_OFFSETS, WorldConfig, generate_sample

    dst.mkdir(parents=True)
    for k in range(n):
        s = generate_sample(0, SPLIT_OFFSETS["test"] + k + 1, WorldConfig(size=256))
        Image.fromarray(s.image).save(dst / f"{k:04d}.jpg", quality=90)


def _run(src: Path, out_root: Path, shards: int, threads: int | None) -> float:
    procs = []
    t0 = time.perf_counter()
    for i in range(shards):
        cmd = [sys.executable, "-m", "weclip_infer.segment", str(src), "--out", str(out_root / f"s{i}"),
               "--workers", "2", "--quiet"]
        if shards > 1:
            cmd += ["--shard", f"{i}/{shards}"]
        if threads is not None:
            cmd += ["--threads", str(threads)]
        env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    for p in procs:
        _, err = p.communicate()
        if p.returncode != 0:
            raise RuntimeError(f"weclip-segment failed ({p.returncode}): {err[-1000:]}")
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=60, help="images in the folder (default: %(default)s)")
    ap.add_argument("--repeats", type=int, default=1, help="runs per configuration; the fastest is kept")
    args = ap.parse_args()
    from weclip_infer.threads import available_cpus

    budget = available_cpus()
    configs = [("alone, auto threads", 1, None), ("alone, all CPUs", 1, budget.cpus),
               ("2 shards at once, all CPUs each", 2, budget.cpus), ("2 shards at once, auto threads", 2, None)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "in"
        _make_folder(src, args.images)
        for name, shards, threads in configs:
            times = []
            for r in range(args.repeats):
                load = os.getloadavg()[0]
                times.append(_run(src, Path(tmp) / f"out_{len(rows)}_{r}", shards, threads))
            per_process = threads or max(1, budget.cpus // shards)
            rows.append({"config": name, "shards": shards, "threads_per_process": per_process,
                         "seconds": round(min(times), 2), "all_seconds": [round(t, 2) for t in times],
                         "load_avg_1min_before": round(load, 2)})
            print(f"{name}: {min(times):.1f} s", flush=True)
    result = {"benchmark": "batch_threads", "images": args.images, "model": "shipped demo model",
              "image_size": "256x256", "cpus": budget.describe(), "machine": platform.processor() or platform.machine(),
              "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "runs": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "batch_threads.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# Batch segmentation: threads per process ({args.images} images, {budget.describe()})", "",
             "| configuration | threads / process | wall time (s) | load avg before |", "|---|---|---|---|"]
    lines += [f"| {r['config']} | {r['threads_per_process']} | {r['seconds']} | {r['load_avg_1min_before']} |"
              for r in rows]
    lines += ["", f"Measured {result['date']}; other work on the machine (see load average) changes these figures."]
    (RESULTS / "batch_threads.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

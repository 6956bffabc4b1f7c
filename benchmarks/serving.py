"""Latency / throughput through TorchServe vs the in-process ``Segmenter`` (server overhead ratio).

    python benchmarks/serving.py MODEL_DIR [--n 40] [--concurrency 4] [--size 240x320] [--threads 1]
                                 [--batch-size 4] [--network-batch 16]

Builds a .mar from MODEL_DIR (checkpoint with backbone, or export bundle), starts TorchServe on
free loopback ports for all five listeners in a temp folder (own TMPDIR, token auth on), so it can
run beside ``make demo``. ``--network-batch 1`` turns off the batching of network passes inside a
TorchServe batch (for a comparison with the default). Measures sequential latency
(p50/p90) in-process and over HTTP, then throughput with ``--concurrency`` clients; prints a table
and writes JSON to benchmarks/results/serving_<timestamp>.json. Always stops TorchServe.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def _image(h, w) -> bytes:
    from PIL import Image

    arr = (np.random.RandomState(0).rand(h, w, 3) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _stats(xs) -> dict:
    a = np.asarray(xs) * 1000.0
    return {"n": len(xs), "mean_ms": float(a.mean()), "p50_ms": float(np.percentile(a, 50)),
            "p90_ms": float(np.percentile(a, 90))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir")
    ap.add_argument("--n", type=int, default=40, help="requests per measurement")
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--size", default="240x320", help="HxW of the test JPEG")
    ap.add_argument("--threads", type=int, default=1, help="torch threads, in-process and in the worker")
    ap.add_argument("--batch-size", type=int, default=4, help="TorchServe batchSize")
    ap.add_argument("--network-batch", type=int, default=16, help="serve_config network_batch: most images per "
                    "network call (1: each request's network passes run alone)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    a = ap.parse_args(argv)
    import torch

    from weclip_infer.export.mar import build_mar
    from weclip_infer.predictor import Segmenter
    from weclip_infer.serving import torchserve_config_file
    from weclip_infer.serving.ts_config import derive_config, free_ports, models_setting

    torch.set_num_threads(a.threads)
    h, w = (int(v) for v in a.size.lower().split("x"))
    img = _image(h, w)
    ts_bin = Path(sys.executable).parent / "torchserve"
    ts_bin = str(ts_bin) if ts_bin.is_file() else shutil.which("torchserve")
    if ts_bin is None or shutil.which("java") is None:
        print("torchserve or java missing", file=sys.stderr)
        return 2

    seg = Segmenter.from_pretrained(a.model_dir, device="cpu")
    seg.predict(img)  # warm-up
    lat_inproc = []
    for _ in range(a.n):
        t0 = time.perf_counter()
        seg.predict(img)
        lat_inproc.append(time.perf_counter() - t0)

    root = Path(tempfile.mkdtemp(prefix="weclip_serve_bench_"))
    ports = free_ports()
    env = dict(os.environ, TMPDIR=str(root / "tmp"), LOG_LOCATION=str(root / "logs"),
               METRICS_LOCATION=str(root / "logs"), OMP_NUM_THREADS=str(a.threads))
    (root / "tmp").mkdir()
    (root / "logs").mkdir()
    result = {}
    try:
        build_mar(a.model_dir, root / "store", name="weclip",
                  serve_config={"num_threads": a.threads, "network_batch": a.network_batch})
        derive_config(torchserve_config_file(), root / "config.properties", ports, model_store=root / "store",
                      overrides={"models": models_setting("weclip", "weclip.mar", batch_size=a.batch_size,
                                                          max_batch_delay_ms=10)[len("models="):],
                                 "vmargs": f"-Xmx1g -XX:+UseSerialGC -Djava.io.tmpdir={root / 'tmp'}"})
        t_start = time.time()
        with open(root / "logs" / "start.log", "wb") as log:
            subprocess.run([ts_bin, "--start", "--ncs", "--model-store", str(root / "store"), "--models",
                            "weclip=weclip.mar", "--ts-config", str(root / "config.properties")], cwd=root, env=env,
                           stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, timeout=60, check=True)
        url = f"http://127.0.0.1:{ports['inference']}/predictions/weclip"
        key = None

        def post():
            req = urllib.request.Request(url, data=img, method="POST", headers={
                "Authorization": f"Bearer {key}", "Content-Type": "image/jpeg"})
            with urllib.request.urlopen(req, timeout=120) as r:
                r.read()
                return r.status

        while True:
            if time.time() - t_start > 120:
                raise RuntimeError(f"TorchServe not ready; logs in {root / 'logs'}")
            time.sleep(0.5)
            try:
                key = json.loads((root / "key_file.json").read_text())["inference"]["key"]
                if post() == 200:
                    break
            except (OSError, ValueError, KeyError, urllib.error.URLError):
                continue
        startup = time.time() - t_start
        lat_http = []
        for _ in range(a.n):
            t0 = time.perf_counter()
            post()
            lat_http.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        with ThreadPoolExecutor(a.concurrency) as ex:
            codes = list(ex.map(lambda _: post(), range(a.n * 2)))
        conc_s = time.perf_counter() - t0
        ip, hp = _stats(lat_inproc), _stats(lat_http)
        result = {
            "model_dir": str(a.model_dir), "image_size": [h, w], "threads": a.threads, "n": a.n,
            "torchserve_startup_s": startup, "in_process": ip, "torchserve_sequential": hp,
            "overhead_ratio_p50": hp["p50_ms"] / ip["p50_ms"], "overhead_ms_p50": hp["p50_ms"] - ip["p50_ms"],
            "in_process_throughput_rps": 1000.0 / ip["mean_ms"],
            "torchserve_concurrent": {"concurrency": a.concurrency, "requests": len(codes),
                                      "errors": sum(c != 200 for c in codes), "throughput_rps": len(codes) / conc_s},
            "batch_size": a.batch_size, "network_batch": a.network_batch, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
    finally:
        subprocess.run([ts_bin, "--stop"], cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       timeout=60)
    print(f"{'':28s}{'p50 ms':>10s}{'p90 ms':>10s}{'req/s':>10s}")
    print(f"{'in-process Segmenter':28s}{ip['p50_ms']:10.1f}{ip['p90_ms']:10.1f}"
          f"{result['in_process_throughput_rps']:10.1f}")
    print(f"{'TorchServe sequential':28s}{hp['p50_ms']:10.1f}{hp['p90_ms']:10.1f}{1000.0 / hp['mean_ms']:10.1f}")
    tc = result["torchserve_concurrent"]
    print(f"{'TorchServe x' + str(a.concurrency):28s}{'':10s}{'':10s}{tc['throughput_rps']:10.1f}"
          f"  errors={tc['errors']}")
    print(f"server overhead (p50): x{result['overhead_ratio_p50']:.2f} (+{result['overhead_ms_p50']:.1f} ms); "
          f"startup {startup:.1f} s")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    f = out / f"serving_{time.strftime('%Y%m%d_%H%M%S')}.json"
    f.write_text(json.dumps(result, indent=2))
    print(f"wrote {f}")
    shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

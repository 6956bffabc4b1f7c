"""Bounded soak test of the TorchServe deployment: many clients, many requests, memory over time.

    python benchmarks/soak.py [--requests 2000] [--clients 8] [--bad-every 50] [--sample-s 2] [--crf]

Builds the demo model's archive, starts TorchServe with a copy of the shipped
``config.properties`` (free loopback ports, the shipped batching, token auth on) in a temp
folder, then ``--clients`` threads send ``--requests`` requests in total: the bundled sample
images in turn, and every ``--bad-every``-th request an undecodable body (which must get a 400).
``--crf`` asks for the dense CRF on every image (``X-WeCLIP-Crf: true``).
Every ``--sample-s`` seconds it records completed requests, failures and the resident memory of
the frontend and each Python worker. Writes ``benchmarks/results/soak_<timestamp>.json`` and
``.md`` and always stops the server. Numbers depend on what else runs on the machine: the load
average before and after is recorded next to them.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def _post(url: str, key: str, body: bytes, ctype: str = "image/jpeg", timeout: float = 300, crf: bool = False):
    headers = {"Authorization": f"Bearer {key}", "Content-Type": ctype}
    if crf:
        headers["X-WeCLIP-Crf"] = "true"
    req = urllib.request.Request(url, data=body, method="POST", headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            r.read()
            return r.status
    except urllib.error.HTTPError as e:
        e.read()
        return e.code
    except (urllib.error.URLError, OSError):
        return -1  # connection error / timeout


def _rss_mb(frontend) -> Dict[str, float]:
    import psutil

    out = {}
    try:
        out["frontend"] = frontend.memory_info().rss / 2**20
        for i, c in enumerate(frontend.children(recursive=True)):
            out[f"worker{i}"] = c.memory_info().rss / 2**20
    except psutil.Error:
        pass
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=2000, help="requests in total (default 2000)")
    ap.add_argument("--clients", type=int, default=8, help="concurrent clients (default 8)")
    ap.add_argument("--bad-every", type=int, default=50, help="every N-th request is an undecodable body (0: none)")
    ap.add_argument("--sample-s", type=float, default=2.0, help="seconds between memory samples")
    ap.add_argument("--crf", action="store_true", help="dense CRF on every image")
    ap.add_argument("--crf-backend", default=None, choices=("auto", "torch", "densecrf"),
                    help="the archive's serve_config crf_backend (default: the library's)")
    ap.add_argument("--workers", type=int, default=None, help="TorchServe workers of the model (default: the "
                    "shipped config.properties')")
    ap.add_argument("--threads", type=int, default=None, help="compute threads per worker (the archive's "
                    "serve_config num_threads; default: the library's choice)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    a = ap.parse_args(argv)
    for name in ("requests", "clients", "workers", "threads"):
        if getattr(a, name) is not None and getattr(a, name) < 1:
            ap.error(f"--{name} must be at least 1")
    import psutil

    from weclip_infer.export.mar import build_mar
    from weclip_infer.quickstart import DEMO_MODEL_DIR, MAR_NAME, MODEL_NAME, ensure_samples
    from weclip_infer.serving import torchserve_config_file
    from weclip_infer.serving.ts_config import derive_config, free_ports, read_properties

    ts_bin = Path(sys.executable).parent / "torchserve"
    samples = [p.read_bytes() for p in ensure_samples()]
    root = Path(tempfile.mkdtemp(prefix="weclip_soak_"))
    tmp = root / "tmp"
    tmp.mkdir()
    (root / "logs").mkdir()
    ports = free_ports()
    serve_config = {k: v for k, v in (("crf_backend", a.crf_backend), ("num_threads", a.threads)) if v}
    build_mar(DEMO_MODEL_DIR, root / "store", name=MAR_NAME, serve_config=serve_config or None)
    overrides = {"vmargs": f"-Xmx1g -XX:+UseSerialGC -Djava.io.tmpdir={tmp}"}
    if a.workers:
        shipped = json.loads(read_properties(torchserve_config_file())["models"])
        shipped[MODEL_NAME]["1.0"].update(minWorkers=a.workers, maxWorkers=a.workers)
        overrides["models"] = json.dumps(shipped)
    cfg = derive_config(torchserve_config_file(), root / "config.properties", ports, model_store=root / "store",
                        overrides=overrides)
    models = json.loads(read_properties(cfg)["models"])[MODEL_NAME]["1.0"]
    env = dict(os.environ, TMPDIR=str(tmp), LOG_LOCATION=str(root / "logs"), METRICS_LOCATION=str(root / "logs"))
    load_before = os.getloadavg()
    frontend = None
    try:
        t0 = time.time()
        with open(root / "logs" / "start.log", "wb") as log:
            subprocess.run([str(ts_bin), "--start", "--ncs", "--model-store", str(root / "store"), "--models",
                            f"{MODEL_NAME}={MAR_NAME}.mar", "--ts-config", str(cfg)], cwd=root, env=env, stdout=log,
                           stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, timeout=120, check=True)
        frontend = psutil.Process(int((tmp / ".model_server.pid").read_text()))
        url = f"http://127.0.0.1:{ports['inference']}/predictions/{MODEL_NAME}"
        key = ""
        while True:
            if time.time() - t0 > 180:
                raise RuntimeError(f"TorchServe not ready after 180 s; logs in {root / 'logs'}")
            time.sleep(1.0)
            try:
                key = json.loads((root / "key_file.json").read_text())["inference"]["key"]
            except (OSError, ValueError, KeyError):
                continue
            if _post(url, key, samples[0]) == 200:
                break
        startup_s = time.time() - t0
        lock = threading.Lock()
        done = {"ok": 0, "bad_ok": 0, "failures": 0}
        failures: List[str] = []
        latencies: List[float] = []

        def one(i: int) -> None:
            bad = a.bad_every > 0 and i % a.bad_every == a.bad_every - 1
            body = b"this is not an image" if bad else samples[i % len(samples)]
            t = time.perf_counter()
            code = _post(url, key, body, crf=a.crf)
            dt = time.perf_counter() - t
            with lock:
                if bad and code == 400:
                    done["bad_ok"] += 1
                elif not bad and code == 200:
                    done["ok"] += 1
                    latencies.append(dt)
                else:
                    done["failures"] += 1
                    failures.append(f"request {i}: HTTP {code}{' (bad input)' if bad else ''}")

        timeline = []
        stop = threading.Event()
        t_start = time.time()

        def sampler() -> None:
            while not stop.is_set():
                with lock:
                    snap = dict(done)
                timeline.append({"t_s": round(time.time() - t_start, 1), **snap,
                                 "rss_mb": {k: round(v, 1) for k, v in _rss_mb(frontend).items()}})
                stop.wait(a.sample_s)

        th = threading.Thread(target=sampler, daemon=True)
        th.start()
        with ThreadPoolExecutor(a.clients) as ex:
            list(ex.map(one, range(a.requests)))
        wall = time.time() - t_start
        stop.set()
        th.join()
        timeline.append({"t_s": round(wall, 1), **done,
                         "rss_mb": {k: round(v, 1) for k, v in _rss_mb(frontend).items()}})
    finally:
        if frontend is not None:  # stop exactly the server started here
            family = [frontend, *frontend.children(recursive=True)]
            frontend.terminate()
            _, alive = psutil.wait_procs(family, timeout=60)
            for p in alive:
                p.kill()
    workers = sorted({k for s in timeline for k in s["rss_mb"] if k.startswith("worker")})
    rss = {k: [s["rss_mb"][k] for s in timeline if k in s["rss_mb"]] for k in ["frontend", *workers]}
    lat = np.asarray(latencies) * 1000.0
    result = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                                                "loadavg_before": load_before,
                                                                "loadavg_after": os.getloadavg()},
        "model": "embedded demo model", "crf": a.crf, "crf_backend": a.crf_backend or "default",
        "samples": len(samples), "requests": a.requests,
        "clients": a.clients,
        "bad_every": a.bad_every, "batch_size": models["batchSize"], "max_batch_delay_ms": models["maxBatchDelay"],
        "workers": models.get("minWorkers"), "threads_per_worker": a.threads,
        "startup_s": round(startup_s, 1), "wall_s": round(wall, 1), "throughput_rps": round(a.requests / wall, 2),
        **done, "failure_examples": failures[:20],
        "latency_ms": {"p50": float(np.percentile(lat, 50)), "p90": float(np.percentile(lat, 90)),
                       "p99": float(np.percentile(lat, 99)), "max": float(lat.max())} if lat.size else {},
        "rss_mb": {k: {"first": v[0], "max": max(v), "last": v[-1]} for k, v in rss.items() if v},
        "timeline": timeline,
    }
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d_%H%M%S")
    stamp += f"_crf_{a.crf_backend or 'default'}" if a.crf else ""
    stamp += f"_w{a.workers}" if a.workers else ""
    stamp += f"_t{a.threads}" if a.threads else ""
    (out / f"soak_{stamp}.json").write_text(json.dumps(result, indent=1))
    md = [f"# Soak: {a.requests} requests, {a.clients} clients, TorchServe + demo model"
          f"{' with CRF (' + (a.crf_backend or 'default') + ' backend)' if a.crf else ''} ({result['time']})", "",
          f"- machine: {os.cpu_count()} CPUs, load average before {load_before[0]:.2f}, after "
          f"{result['machine']['loadavg_after'][0]:.2f} (other jobs shared the CPUs: throughput and latency are "
          "lower bounds; failures and memory are the point)",
          f"- batching: batchSize {models['batchSize']}, maxBatchDelay {models['maxBatchDelay']} ms; workers "
          f"{models.get('minWorkers')}, threads per worker {a.threads or 'default'}",
          f"- requests: {a.requests} ({done['ok']} images answered 200, {done['bad_ok']} undecodable bodies "
          f"answered 400), **failures: {done['failures']}**",
          f"- wall {wall:.0f} s, {result['throughput_rps']} requests/s; latency p50 "
          f"{result['latency_ms'].get('p50', 0):.0f} ms, p90 {result['latency_ms'].get('p90', 0):.0f} ms, "
          f"p99 {result['latency_ms'].get('p99', 0):.0f} ms, max {result['latency_ms'].get('max', 0):.0f} ms", "",
          "| process | RSS first (MB) | RSS max (MB) | RSS last (MB) |", "|---|---|---|---|"]
    md += [f"| {k} | {v['first']:.0f} | {v['max']:.0f} | {v['last']:.0f} |" for k, v in result["rss_mb"].items()]
    md += ["", "RSS over time (every ~10th sample):", "", "| t (s) | done | failures | " +
           " | ".join(f"{k} MB" for k in rss) + " |", "|---" * (3 + len(rss)) + "|"]
    step = max(1, len(timeline) // 12)
    for s in timeline[::step] + ([timeline[-1]] if (len(timeline) - 1) % step else []):
        md.append(f"| {s['t_s']:.0f} | {s['ok'] + s['bad_ok']} | {s['failures']} | " +
                  " | ".join(f"{s['rss_mb'].get(k, float('nan')):.0f}" for k in rss) + " |")
    (out / f"soak_{stamp}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    print(f"\nwrote {out / f'soak_{stamp}.json'} and .md")
    return 1 if done["failures"] else 0


if __name__ == "__main__":
    raise SystemExit(main())

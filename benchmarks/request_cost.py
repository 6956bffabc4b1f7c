"""Cost of one request in the library: peak memory and time for large images, with and without CRF.

    python benchmarks/request_cost.py [--threads 2] [--cases big,big_crf,...]

Each case runs in a fresh process (so its peak resident memory is its own): load the shipped demo
model, then ``Segmenter.predict`` once on encoded image bytes (decode included), default options
(scales 1 and 0.75 + flip, long side 512). Reported: wall seconds of the request, the process's
peak resident memory (``VmHWM``) and its resident memory after loading the model (so the
request's own share is the difference). Writes ``benchmarks/results/request_cost.{json,md}``.

Cases: ``big`` — a 6320×6320 PNG (39.9 MP, just under the 40 MP decode limit) of a demo-world
scene scaled up; ``big_crf`` — the same with CRF (torch backend, the default);
``big_crf_densecrf`` — with the pydensecrf backend; ``noise_crf`` — 4000×3000 random noise with
CRF (the worst content for a DenseCRF: every pixel a different colour); ``voc`` / ``voc_crf`` —
a 375×500 image, for scale.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CASES = ("voc", "voc_crf", "big", "big_crf", "big_crf_densecrf", "noise_crf")


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return -1


def _image_bytes(case: str) -> tuple[bytes, tuple[int, int]]:
    import numpy as np
    from PIL import Image

    if case.startswith("noise"):
        arr = np.random.default_rng(0).integers(0, 256, (3000, 4000, 3), dtype=np.uint8)
        img = Image.fromarray(arr)
        fmt = "PNG"
    else:
        from weclip_infer.demo.world import WorldConfig, generate_sample

        sample = generate_sample(0, 1, WorldConfig())
        base = Image.fromarray(sample.image)
        size = (500, 375) if case.startswith("voc") else (6320, 6320)
        img = base.resize(size, Image.NEAREST if size[0] > 1000 else Image.BILINEAR)
        fmt = "PNG" if size[0] > 1000 else "JPEG"
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"compress_level": 6} if fmt == "PNG" else {"quality": 90}))
    return buf.getvalue(), img.size


def child(case: str, threads: int) -> dict:
    """One request in this process; returns the measurements."""
    import torch

    torch.set_num_threads(threads)
    from weclip_infer import Segmenter
    from weclip_infer.quickstart import DEMO_MODEL_DIR

    data, (w, h) = _image_bytes(case)
    kw = {"crf_backend": "densecrf"} if case.endswith("densecrf") else {}
    seg = Segmenter.from_pretrained(DEMO_MODEL_DIR, device="cpu", backend="eager", **kw)
    seg.predict(_image_bytes("voc")[0])  # warm-up on a small image (lazy imports, allocator)
    rss_loaded = _status_kb("VmRSS")
    t = time.perf_counter()
    res = seg.predict(data, crf="crf" in case)
    wall = time.perf_counter() - t
    return {"case": case, "size": f"{w}x{h}", "megapixels": round(w * h / 1e6, 2), "encoded_bytes": len(data),
            "crf": "crf" in case, "crf_backend": seg.crf_backend if "crf" in case else None,
            "crf_size": list(res.crf_size) if res.crf_size else None, "seconds": round(wall, 3),
            "timings": {k: round(v, 3) for k, v in res.timings.items()},
            "peak_rss_mb": round(_status_kb("VmHWM") / 1024, 1), "rss_after_model_load_mb": round(rss_loaded / 1024, 1),
            "threads": threads}


def cpu_model() -> str:
    """The processor model, as the library reads it (weclip_infer.hardware)."""
    from weclip_infer.hardware import cpu_features

    return cpu_features().model


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--timeout", type=int, default=900, help="seconds per case")
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--name", default="request_cost")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child, a.threads)))
        return 0
    import torch

    from weclip_infer.predictor import DEFAULT_CRF_MAX_PIXELS

    cases = [c for c in a.cases.split(",") if c]
    unknown = set(cases) - set(CASES)
    if unknown:
        print(f"error: unknown cases {sorted(unknown)}; choose from {', '.join(CASES)}", file=sys.stderr)
        return 2
    info = {"cpu": cpu_model(), "logical_cpus": os.cpu_count(), "threads": a.threads, "torch": torch.__version__,
            "python": platform.python_version(), "crf_max_pixels": DEFAULT_CRF_MAX_PIXELS,
            "load_average_start": list(os.getloadavg())}
    rows = []
    for case in cases:
        cmd = [sys.executable, __file__, "--child", case, "--threads", str(a.threads)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout)
        except subprocess.TimeoutExpired:
            rows.append({"case": case, "error": f"timed out after {a.timeout} s"})
            continue
        if proc.returncode != 0:
            rows.append({"case": case, "error": proc.stderr.strip().splitlines()[-1] if proc.stderr else "failed"})
            continue
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    info["load_average_end"] = list(os.getloadavg())
    shared = max(info["load_average_start"][0], info["load_average_end"][0]) > 1.5 * a.threads
    load_note = ("other jobs shared this machine during the run (see load averages): times are upper bounds"
                 if shared else "the machine was otherwise idle (see load averages)")
    out = {"what": "one Segmenter.predict on encoded bytes, fresh process per case, shipped demo model",
           "machine": info,
           "note": load_note + "; the first CRF of a process includes loading the compiled lattice construction",
           "targets": {"peak_rss_gb": 3.0, "seconds_at_40mp": 10.0}, "results": rows}
    dest = Path(a.out)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / f"{a.name}.json").write_text(json.dumps(out, indent=1) + "\n")
    md = [f"# Cost of one request ({info['cpu']}, {a.threads} threads, torch {info['torch']})", "",
          f"Load average {info['load_average_start'][0]:.1f} at start, {info['load_average_end'][0]:.1f} at end: "
          f"{load_note}. Fresh process per case (a CRF case includes loading the compiled lattice construction, "
          "about 0.4 s); peak RSS includes the "
          f"model (RSS after loading it in the last column). CRF pixel budget: {DEFAULT_CRF_MAX_PIXELS:,} pixels.", "",
          "| case | image | CRF (size refined) | seconds | peak RSS | RSS after model load |",
          "|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            md.append(f"| {r['case']} | | | error: {r['error']} | | |")
            continue
        crf = f"{r['crf_backend']} ({r['crf_size'][1]}×{r['crf_size'][0]})" if r["crf"] else "no"
        md.append(f"| {r['case']} | {r['size']} ({r['megapixels']} MP, {r['encoded_bytes'] // 1024} KB) | {crf} | "
                  f"{r['seconds']:.2f} | {r['peak_rss_mb'] / 1024:.2f} GB | "
                  f"{r['rss_after_model_load_mb'] / 1024:.2f} GB |")
    (dest / f"{a.name}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

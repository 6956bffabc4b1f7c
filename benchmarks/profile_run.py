"""Profile one training iteration and one inference of the full-size (random ViT-B/16) WeCLIP with
``torch.profiler`` and keep the tables as artefacts, so the next person sees where time goes:

    python benchmarks/profile_run.py [--threads 2] [--device cpu]

Writes ``benchmarks/results/profile_train.txt`` and ``profile_infer.txt`` (top operators by
self time, and per-stage ``record_function`` ranges from the model's stage timer) and a Chrome
trace ``profile_train.json.gz`` (open in chrome://tracing or Perfetto).
"""
from __future__ import annotations

import argparse
import gzip
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile, record_function

HERE = Path(__file__).resolve().parent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=str(HERE / "results"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from weclip_infer import Segmenter, build_model

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device(a.device)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    model = build_model({"backbone": {"clip_weights": "random"}, "text": {"dataset": "voc"}}, device=dev)
    from weclip_infer.memory import reuse_freed_memory

    reuse_freed_memory(device=dev)  # as training, the batch CLI and the handler do
    model.train()
    opt = torch.optim.AdamW(model.decoder.parameters(), lr=2e-4)
    g = torch.Generator().manual_seed(0)
    x = model.normalize(torch.randint(0, 256, (4, 3, 320, 320), generator=g).float().to(dev))
    cls = torch.zeros(4, 20, device=dev)
    for b in range(4):
        cls[b, [b * 3 % 20, (b * 3 + 7) % 20]] = 1

    def step():
        with record_function("forward"):
            loss = model(x, cls, use_rfm=True)["loss"]
        opt.zero_grad(set_to_none=True)
        with record_function("backward"):
            loss.backward()
        with record_function("optimizer"):
            opt.step()

    step()  # warm-up
    with profile(activities=acts, record_shapes=False) as prof:
        step()
    sort = "self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total"
    (out / "profile_train.txt").write_text(
        "One training iteration, batch 4, 320², 2 classes/image, RFM on, full-size random ViT-B/16, "
        f"{a.threads} threads, torch {torch.__version__}\n\n"
        + prof.key_averages().table(sort_by=sort, row_limit=40) + "\n")
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        with open(trace, "rb") as f, gzip.open(out / "profile_train.json.gz", "wb") as z:
            shutil.copyfileobj(f, z)

    model.eval()
    seg = Segmenter(model)
    img = np.random.default_rng(0).integers(0, 256, (375, 500, 3), dtype=np.uint8)
    seg.predict(img)
    with profile(activities=acts) as prof:
        seg.predict(img)
    (out / "profile_infer.txt").write_text(
        "One inference, 375×500, scales {1, 0.75} + flip, eager backend, full-size random ViT-B/16, "
        f"{a.threads} threads\n\n" + prof.key_averages().table(sort_by=sort, row_limit=30) + "\n")
    print(f"wrote {out / 'profile_train.txt'}, {out / 'profile_infer.txt'}, {out / 'profile_train.json.gz'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

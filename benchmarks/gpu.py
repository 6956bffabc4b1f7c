"""GPU checks and figures, one prepared run on a CUDA machine:

    python benchmarks/gpu.py --iters 500 --out results/gpu.json

1. CPU vs CUDA parity of the full-size (random ViT-B/16) WeCLIP training forward: seg logits,
   initial CAMs, pseudo labels (TF32 off, so fp32 on both).
2. Training speed: ``--iters`` iterations of forward (GradCAM, RFM, PAR, decoder, losses) +
   backward + AdamW at batch 4, 320², 1–3 classes per image, new random images every iteration
   (data loading excluded: it runs in DataLoader workers), timed end to end with one sync at the
   end; projected to 30k iterations (VOC). fp32, and again with ``train.amp`` (fp16 autocast).
3. Serving throughput: ``Segmenter`` on CUDA, 512×384 images (512 long side), scales {1, 0.75} +
   flip, no CRF.
4. The real training CLI on CUDA for a few iterations on a generated demo world (end to end:
   data, RFM switch, checkpoint, evaluation).
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

import numpy as np
import torch


def parity() -> dict:
    from weclip_infer import build_model

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    cfg = {"backbone": {"clip_weights": "random", "seed": 0}, "text": {"dataset": "voc"}}
    torch.manual_seed(0)
    m_cpu = build_model(cfg, device="cpu")
    m_gpu = build_model(cfg, device="cuda")
    m_gpu.decoder.load_state_dict(m_cpu.decoder.state_dict())
    m_cpu.eval(), m_gpu.eval()  # decoder dropout off: same function on both devices
    g = torch.Generator().manual_seed(1)
    x = m_cpu.normalize(torch.randint(0, 256, (2, 3, 320, 320), generator=g).float())
    cls = torch.zeros(2, 20)
    cls[0, [4, 11]] = 1
    cls[1, [0]] = 1
    out = {}
    for use_rfm in (False, True):
        a = m_cpu.intermediates(x, cls, use_rfm=use_rfm)
        b = m_gpu.intermediates(x.cuda(), cls.cuda(), use_rfm=use_rfm)
        rel = lambda u, v: float((u.float() - v.float().cpu()).abs().max() / (u.float().abs().max() + 1e-12))  # noqa: E731
        key = "rfm" if use_rfm else "static"
        out[key] = {
            "seg_logits_rel": rel(a["seg_logits"], b["seg_logits"]),
            "cam_init_rel": max(rel(u, v) for u, v in zip(a["cam_init"], b["cam_init"])),
            "pseudo_label_agreement": float((a["pseudo_label"] == b["pseudo_label"].cpu()).float().mean()),
            "cam_refined_rel": max(rel(u, v) for u, v in zip(a["cam_refined"], b["cam_refined"])),
            "cam_par_rel": rel(a["cam_par"], b["cam_par"]),
            "loss_cpu": float(a["loss"]), "loss_cuda": float(b["loss"]),
        }
        if use_rfm:
            out[key].update(affinity_rel=rel(a["affinity"], b["affinity"]),
                            transition_rel=rel(a["transition"], b["transition"]),
                            layer_keep_equal=bool(torch.equal(a["layer_keep"], b["layer_keep"].cpu())),
                            layer_scores_rel=rel(a["layer_scores"], b["layer_scores"]),
                            layer_scores_cpu=a["layer_scores"].tolist())
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = True  # torch defaults again
    return out


def train_speed(iters: int, amp: bool, device: str = "cuda") -> dict:
    from weclip_infer import build_model

    dev = torch.device(device)
    cuda = dev.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    model = build_model({"backbone": {"clip_weights": "random"}, "text": {"dataset": "voc"}}, device=dev)
    model.train()
    opt = torch.optim.AdamW(model.decoder.parameters(), lr=2e-4, weight_decay=0.01)
    scaler = torch.amp.GradScaler("cuda", enabled=amp and cuda)
    rng = np.random.default_rng(0)
    batches = []
    for _ in range(8):  # a few distinct batches, cycled (host → device copy every iteration)
        x = torch.randint(0, 256, (4, 3, 320, 320), dtype=torch.uint8)
        cls = torch.zeros(4, 20)
        for b in range(4):
            cls[b, rng.choice(20, size=int(rng.integers(1, 4)), replace=False)] = 1
        batches.append((x.pin_memory(), cls.pin_memory()) if cuda else (x, cls))

    def step(i):
        x, cls = batches[i % len(batches)]
        x = model.normalize(x.to(dev, non_blocking=True).float())
        with torch.autocast(dev.type, dtype=torch.float16, enabled=amp and cuda):
            out = model(x, cls.to(dev, non_blocking=True), use_rfm=True)
        opt.zero_grad(set_to_none=True)
        scaler.scale(out["loss"]).backward()
        scaler.step(opt)
        scaler.update()
        return out["loss"]

    for i in range(10 if cuda else 1):  # warm-up (cuDNN autotune, allocator)
        step(i)
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    for i in range(iters):
        loss = step(i)
    sync()
    dt = time.perf_counter() - t
    return {"iters": iters, "amp": amp, "seconds": dt, "s_per_iter": dt / iters,
            "projected_30k_iters_h": dt / iters * 30000 / 3600,
            "peak_cuda_gb": torch.cuda.max_memory_allocated() / 1024 ** 3 if cuda else None, "final_loss": float(loss)}


def serve_speed(n: int, device: str = "cuda") -> dict:
    from weclip_infer import Segmenter, build_model

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    model = build_model({"backbone": {"clip_weights": "random"}, "text": {"dataset": "voc"}}, device=device).eval()
    seg = Segmenter(model, scales=(1.0, 0.75), flip=True, crf=False)
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 256, (384, 512, 3), dtype=np.uint8) for _ in range(8)]
    for i in range(5 if device == "cuda" else 1):
        seg.predict(imgs[i % 8])
    sync()
    t = time.perf_counter()
    for i in range(n):
        r = seg.predict(imgs[i % 8])
    sync()
    dt = time.perf_counter() - t
    return {"images": n, "size": "512x384", "scales": [1.0, 0.75], "flip": True, "crf": False,
            "images_per_s": n / dt, "ms_per_image": 1000 * dt / n, "last_timings": r.timings}


def cli_run(tmp: Path, device: str = "cuda", iters: int = 40) -> dict:
    world = tmp / "world"
    env = dict(os.environ)
    subprocess.run([sys.executable, "-m", "weclip_infer.demo.make_world", "--out", str(world), "--n-train", "64",
                    "--n-val", "16", "--seed", "0"], check=True, env=env, capture_output=True)
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "weclip_infer.train", "--config", "weclip_infer/configs/demo.yaml",
                        f"data.root={world}", f"train.out_dir={tmp / 'run'}", f"train.device={device}",
                        f"train.max_iters={iters}", f"model.refine.rfm_switch_iter={iters // 2}", "train.eval_every=0",
                        f"train.checkpoint_every={iters // 2}",
                        "train.tensorboard=false", "train.plots=false", "data.workers=2"],
                       env=env, capture_output=True, text=True)
    summary = {}
    if (tmp / "run" / "summary.json").is_file():
        summary = json.loads((tmp / "run" / "summary.json").read_text())
    return {"returncode": p.returncode, "seconds": time.perf_counter() - t, "stderr_tail": p.stderr[-2000:],
            "device": summary.get("device"), "final_loss": summary.get("final_loss"),
            "val_miou": (summary.get("eval") or {}).get("miou")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--iters", type=int, default=500)
    ap.add_argument("--amp-iters", type=int, default=200)
    ap.add_argument("--serve-images", type=int, default=100)
    ap.add_argument("--out", default="benchmarks/results/gpu.json")
    ap.add_argument("--only", default=None, help="run only this check (e.g. parity)")
    ap.add_argument("--smoke-cpu", action="store_true", help="check this script on CPU with tiny counts (no figures)")
    args = ap.parse_args()
    if args.smoke_cpu:
        with tempfile.TemporaryDirectory() as tmp:
            print(json.dumps({"train": train_speed(1, False, "cpu"), "serve": serve_speed(1, "cpu"),
                              "cli": cli_run(Path(tmp), "cpu", 4)}, indent=1, default=str))
        return 0
    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    res = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "python": platform.python_version(),
           "date": time.strftime("%Y-%m-%d")}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save():
        out.write_text(json.dumps(res, indent=2) + "\n")
        print(json.dumps(res, indent=2), flush=True)

    for name, fn in (("parity_cpu_vs_cuda", parity), ("train_fp32", lambda: train_speed(args.iters, False)),
                     ("train_amp_fp16", lambda: train_speed(args.amp_iters, True)),
                     ("serve", lambda: serve_speed(args.serve_images))):
        if args.only and not name.startswith(args.only):
            continue
        t = time.perf_counter()
        try:
            res[name] = fn()
        except Exception as e:  # noqa: BLE001 - record and go on to the next check
            res[name] = {"error": f"{type(e).__name__}: {e}"}
        res[name]["wall_s"] = time.perf_counter() - t
        save()
    if not args.only:
        with tempfile.TemporaryDirectory() as tmp:
            res["train_cli_cuda"] = cli_run(Path(tmp))
        save()
    return 0


if __name__ == "__main__":
    sys.exit(main())

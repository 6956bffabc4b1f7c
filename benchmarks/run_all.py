"""The benchmark suite: training iteration and inference of the full-size ViT-B/16 WeCLIP on CPU
(or CUDA), per stage, with peak memory. One command:

    python benchmarks/run_all.py [--threads 2] [--repeats 5] [--device cpu] [--skip-onnx]

Writes ``benchmarks/results/<machine>-<date>.json`` and ``.md`` and prints the markdown table.
Each result records the processor (model, instruction-set extensions), torch / ONNX Runtime
versions and the same-run matmul peak of each compute path (fp32 torch, fp32 ONNX Runtime, bf16),
and reports the network stages also as a fraction of the peak of the path they ran on.
Random full-size OpenAI-format weights (speed does not depend on the values). Each figure is the
median of ``--repeats`` runs after one warm-up. The report puts the figures beside ``TARGETS`` and
the authors' code's figures (``AUTHORS``), both set for the same 2-core machine: a training
iteration at batch 4, 320², 2 classes/image, its peak RSS, and inference on a 375×500 image with
scales {1, 0.75} + flip.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
AUTHORS = {"train_step_s": 10.1, "train_peak_rss_gb": 2.25, "infer_375x500_s": 3.6, "crf_s": 0.62}
TARGETS = {"train_step_s": 3.4, "train_peak_rss_gb": 1.8, "infer_375x500_s": 1.45}
# Targets on CPUs with AVX-512 + BF16 (2 threads): inference from a checkpoint directory in fp32
# and with inference.precision=bf16, and the training step in fp32 and with backbone.precision=bf16.
TARGETS_AVX512 = {"infer_ckpt_fp32_s": 1.35, "infer_bf16_s": 0.7, "train_fp32_s": 1.8, "train_bf16_s": 1.3}


def rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0 / 1024.0


def med(xs):
    return statistics.median(xs) if xs else float("nan")


def bench_train(args) -> dict:
    """Runs in its own process so that its peak RSS is the training process's peak."""
    from weclip_infer import build_model
    from weclip_infer.hardware import fp32_matmul
    from weclip_infer.memory import reuse_freed_memory

    dev = torch.device(args.device)
    model = build_model({"backbone": {"clip_weights": "random", "precision": args.precision},
                         "text": {"dataset": "voc"}}, device=dev)
    rss_built = rss_gb()
    reuse_freed_memory(device=dev)  # as the training loop does
    model.train()
    opt = torch.optim.AdamW(model.decoder.parameters(), lr=2e-3, weight_decay=0.01)
    g = torch.Generator().manual_seed(0)
    x = model.normalize(torch.randint(0, 256, (4, 3, 320, 320), generator=g).float().to(dev))
    cls = torch.zeros(4, 20, device=dev)
    for b in range(4):
        cls[b, [b * 3 % 20, (b * 3 + 7) % 20]] = 1  # 2 classes per image
    rows: dict = {}
    totals = []
    for rep in range(args.repeats + 1):
        model.timings = {"_sync": dev.type == "cuda"}
        with fp32_matmul(dev.type):  # as the training loop's step
            t0 = time.perf_counter()
            out = model(x, cls, use_rfm=True)
            t1 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            out["loss"].backward()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t2 = time.perf_counter()
            opt.step()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t3 = time.perf_counter()
        if rep == 0:
            continue
        tm = {k: v for k, v in model.timings.items() if not k.startswith("_")}
        tm["forward (all)"] = t1 - t0
        tm["backward"] = t2 - t1
        tm["optimizer"] = t3 - t2
        for k, v in tm.items():
            rows.setdefault(k, []).append(v)
        totals.append(t3 - t0)
    model.timings = None
    res = {"stages_s": {k: med(v) for k, v in rows.items()}, "total_s": med(totals),
           "rss_after_build_gb": rss_built, "peak_rss_gb": rss_gb(),
           "stage_gflop": {k: v / 1e9 for k, v in train_stage_flops(model, x, cls).items()}}
    if dev.type == "cuda":
        res["peak_cuda_gb"] = torch.cuda.max_memory_allocated() / 1024 ** 3
    return res


def _flop_mapping() -> dict:
    """FLOP formulas FlopCounterMode lacks: the bf16 frozen CLIP's pre-packed oneDNN products
    (``weclip_infer.packed_linear``) count as the linear layers they compute."""
    try:
        op = torch.ops.mkldnn._linear_pointwise
    except (AttributeError, RuntimeError):
        return {}

    def linear_flops(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
        rows = 1
        for d in x_shape[:-1]:
            rows *= d
        return 2 * rows * x_shape[-1] * w_shape[0]

    return {op: linear_flops}


def train_stage_flops(model, x: torch.Tensor, cls: torch.Tensor) -> dict:
    """FLOPs of each timed stage of one training step (and of its backward), counted by torch's
    FlopCounterMode at the boundaries of the model's stage timer (GradCAM's own backward is part
    of its stage)."""
    import contextlib

    from torch.utils.flop_counter import FlopCounterMode

    import weclip_infer.model as wm

    orig = wm._stage
    counts: dict = {}
    with FlopCounterMode(display=False, custom_mapping=_flop_mapping()) as fc:
        @contextlib.contextmanager
        def counting(owner, name):
            before = fc.get_total_flops()
            with orig(owner, name):
                yield
            counts[name] = counts.get(name, 0) + fc.get_total_flops() - before

        wm._stage = counting  # type: ignore[assignment]
        try:
            out = model(x, cls, use_rfm=True)
            before = fc.get_total_flops()
            out["loss"].backward()
            counts["backward"] = fc.get_total_flops() - before
        finally:
            wm._stage = orig  # type: ignore[assignment]
    model.decoder.zero_grad(set_to_none=True)
    return counts


def network_flops(model, x: torch.Tensor) -> float:
    """FLOPs of one ``model.segment`` call on ``x`` (counted by torch's FlopCounterMode)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=_flop_mapping()) as fc:
        model.segment(x)
    return float(fc.get_total_flops())


def bench_peaks(args) -> dict:
    """The processor and the same-run matmul peak (GFLOP/s) of each path."""
    from weclip_infer.hardware import cpu_features, inference_path, matmul_peaks

    try:
        import onnxruntime as ort

        ort_version = ort.__version__
    except ImportError:
        ort_version = None
    from weclip_infer.hardware import fast_fp32_matmul_available

    return {"cpu": cpu_features().as_dict(), "inference_path": inference_path(args.device),
            "fast_fp32": fast_fp32_matmul_available()[0],
            "torch": torch.__version__, "onnxruntime": ort_version, "matmul_gflops": matmul_peaks()}


def bench_infer(args) -> dict:
    from PIL import Image

    from weclip_infer import Segmenter, build_model
    from weclip_infer.crf import crf_available, dense_crf
    from weclip_infer.memory import reuse_freed_memory

    dev = torch.device(args.device)
    model = build_model({"backbone": {"clip_weights": "random"}, "text": {"dataset": "voc"}}, device=dev).eval()
    reuse_freed_memory(device=dev)  # as the batch CLI and the TorchServe handler do
    img = np.random.default_rng(0).integers(0, 256, (375, 500, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=90)
    jpeg = buf.getvalue()
    backends = {"eager": Segmenter(model), "eager bf16": Segmenter(model, precision="bf16")}
    tmp = None
    out: dict = {}
    # network FLOPs per scale of this image (long side 512: 384×512, and 0.75 of it), for fractions
    # of peak; with flip each scale runs as a batch of two (the image and its mirror)
    x1 = torch.zeros(2, 3, 384, 512, device=dev)
    out["network_gflop"] = {"network@1": network_flops(model, x1) / 1e9,
                            "network@0.75": network_flops(model, torch.zeros(2, 3, 288, 384, device=dev)) / 1e9}
    timed: set = set()

    def time_paths(todo: dict) -> None:
        for name, seg in todo.items():
            rows: dict = {}
            for rep in range(args.repeats + 1):
                r = seg.predict(jpeg)
                if rep:
                    for k, v in r.timings.items():
                        rows.setdefault(k, []).append(v)
            out.setdefault("paths", {})[name] = {k: med(v) for k, v in rows.items()}
            timed.add(name)

    # the eager paths first: ONNX Runtime's worker threads keep spinning for a while after each
    # run (its export check runs the graph) and would take CPU from a path timed right after
    time_paths(backends)
    if not args.skip_onnx:
        try:
            from weclip_infer.checkpoint import save_checkpoint
            from weclip_infer.export.bundle_writer import write_bundle

            tmp = tempfile.TemporaryDirectory()
            write_bundle(model, Path(tmp.name) / "bundle", formats=("onnx",), parity_cases=[(1, 320, 320)])
            backends["onnxruntime"] = Segmenter.from_pretrained(Path(tmp.name) / "bundle", backend="onnx", device=dev)
            # a checkpoint directory with the processor-chosen path (what users get by default)
            ck = save_checkpoint(model, Path(tmp.name) / "ckpt", include_backbone=True)
            os.environ["WECLIP_CACHE_DIR"] = str(Path(tmp.name) / "cache")
            os.environ.pop("WECLIP_BACKEND", None)
            t = time.perf_counter()
            backends["checkpoint (auto)"] = Segmenter.from_pretrained(ck, device=dev)
            out["checkpoint_first_load_s"] = time.perf_counter() - t
            t = time.perf_counter()
            Segmenter.from_pretrained(ck, device=dev)
            out["checkpoint_cached_load_s"] = time.perf_counter() - t
            out["checkpoint_auto_backend"] = "eager" if backends["checkpoint (auto)"].model is not None else "onnx"
        except Exception as e:  # noqa: BLE001 - the eager figures still stand
            print(f"(ONNX Runtime backend skipped: {e})", file=sys.stderr)
    time_paths({k: v for k, v in backends.items() if k not in timed})
    if crf_available():
        # The bilateral term's cost depends on the image: per-pixel noise (the image above) fills
        # the permutohedral lattice and is a worst case (~8× a natural image). The headline
        # figure uses a demo-world scene with the shipped demo model's probabilities, padded with
        # 1e-3 to VOC's 21 labels (CRF cost grows with the label count).
        scene, probs21 = _crf_scene()
        for key, (im, pr) in {"crf_s": (scene, probs21),
                              "crf_noise_s": (img, torch.softmax(torch.randn(21, 375, 500), 0).numpy())}.items():
            ts = []
            for rep in range(args.repeats + 1):
                t = time.perf_counter()
                dense_crf(im, pr)
                if rep:
                    ts.append(time.perf_counter() - t)
            out[key] = med(ts)
    if tmp is not None:
        tmp.cleanup()
    return out


def _crf_scene() -> tuple[np.ndarray, np.ndarray]:
    """A 375×500 demo-world scene and 21×375×500 class probabilities for it (shipped demo model)."""
    from weclip_infer import Segmenter
    from weclip_infer.demo.world import SPLIT_OFFSETS, WorldConfig, generate_sample
    from weclip_infer.quickstart import DEMO_MODEL_DIR

    scene = generate_sample(0, SPLIT_OFFSETS["test"] + 1, WorldConfig(size=512)).image[:375, :500].copy()
    probs = Segmenter.from_pretrained(DEMO_MODEL_DIR, device="cpu").predict(scene, keep_probs=True).probs
    p21 = np.full((21, 375, 500), 1e-3, np.float32)
    p21[: probs.shape[0]] = probs
    return scene, p21 / p21.sum(0, keepdims=True)


def bench_folder(args) -> dict:
    """Batch segmentation (``segment_folder``) of ``--folder-images`` demo-world images (256², JPEG)
    with the shipped demo model: images/s without and with DenseCRF, decode (and CRF) in worker
    processes."""
    from PIL import Image

    from weclip_infer import Segmenter
    from weclip_infer.crf import crf_available
    from weclip_infer.demo.world import SPLIT_OFFSETS, WorldConfig, generate_sample
    from weclip_infer.quickstart import DEMO_MODEL_DIR
    from weclip_infer.segment import segment_folder

    out: dict = {"images": args.folder_images, "model": "shipped demo model", "image_size": "256x256"}
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "in"
        src.mkdir()
        for k in range(args.folder_images):
            s = generate_sample(0, SPLIT_OFFSETS["test"] + k + 1, WorldConfig(size=256))
            Image.fromarray(s.image).save(src / f"{k:04d}.jpg", quality=90)
        seg = Segmenter.from_pretrained(DEMO_MODEL_DIR, device=args.device)
        from weclip_infer.memory import reuse_freed_memory

        reuse_freed_memory(device=seg.device)  # as the batch CLI does
        seg.predict(np.asarray(Image.open(src / "0000.jpg")))  # warm-up
        for crf in ([False, True] if crf_available() else [False]):
            r = segment_folder(seg, src, Path(tmp) / f"out_{crf}", workers=1, crf=crf, progress=False)
            out["crf" if crf else "no_crf"] = {"images_per_s": r["images_per_s"], "seconds": r["seconds"],
                                               "failed": r["failed"]}
    return out


def render_md(result: dict) -> str:
    """The markdown table of a ``run_all`` result (also for re-rendering a stored JSON)."""
    peaks = {"cpu": result["cpu"], "onnxruntime": result["onnxruntime"], "matmul_gflops": result["matmul_gflops"],
             "inference_path": result["inference_path"]}
    train, infer, folder = result["train_batch4_320"], result["infer_375x500"], result["folder"]
    threads, repeats, date, device = result["threads"], result["repeats"], result["date"], result["device"]
    # the eager path's frozen CLIP uses oneDNN's split-bf16 fp32 kernels where they are exact enough
    fast_fp32 = result.get("fast_fp32", result["cpu"]["isa"] in ("avx512_bf16", "amx"))
    mm = peaks["matmul_gflops"]
    lines = [f"Machine {result['machine']} ({peaks['cpu']['model']}, {peaks['cpu']['arch']}, "
             f"ISA {peaks['cpu']['isa']}, {result['cpus']} CPUs), device {device}, {threads} threads, "
             f"torch {result['torch']}, "
             f"onnxruntime {peaks['onnxruntime']}, median of {repeats} after warm-up, {date}", "",
             "Same-run matmul peaks (1604×768 @ 768×3072), GFLOP/s: "
             + ", ".join(f"{k} {v:.0f}" for k, v in mm.items()), "",
             f"Inference path chosen for checkpoints here: {peaks['inference_path'][0]} "
             f"({peaks['inference_path'][1]})", "",
             ]
    # the training step: fp32, and with the bf16 frozen CLIP where the run measured it
    runs = {"fp32": train}
    if result.get("train_batch4_320_bf16"):
        runs["bf16 frozen CLIP"] = result["train_batch4_320_bf16"]
    lines += ["| training iteration (batch 4, 320², 2 classes/image, RFM), s (% of the path's matmul peak) | "
              + " | ".join(runs) + " |",
              "|---|" + "---|" * len(runs)]
    # the peak of the path each stage runs on: the frozen CLIP at its precision, everything else
    # in fp32 (oneDNN's split-bf16 kernels where the CPU has them)
    fp32_peak = mm.get("torch_fp32_bf16_flag") if fast_fp32 else mm.get("torch_fp32")
    clip_peak = {"fp32": fp32_peak, "bf16 frozen CLIP": mm.get("torch_bf16")}
    for k in train["stages_s"]:
        cells = []
        for name, r in runs.items():
            t = r["stages_s"].get(k, float("nan"))
            cell = f"{t:.3f}"
            flop = r.get("stage_gflop", {}).get(k)
            peak = clip_peak[name] if k == "clip" else fp32_peak
            if flop and peak and t == t and flop > 0.5:
                cell += f" ({100 * flop / t / peak:.0f}%)"
            cells.append(cell)
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    lines.append(f"| **total** (authors' code {AUTHORS['train_step_s']} s; target ≤ {TARGETS['train_step_s']} s) | "
                 + " | ".join(f"**{r['total_s']:.3f}**" for r in runs.values()) + " |")
    rss_t = f"authors' {AUTHORS['train_peak_rss_gb']} GB; target ≤ {TARGETS['train_peak_rss_gb']} GB"
    lines.append(f"| peak RSS ({rss_t}) | "
                 + " | ".join(f"{r['peak_rss_gb']:.2f} GB" for r in runs.values()) + " |")
    paths = infer["paths"]
    eager_peak = mm.get("torch_fp32_bf16_flag") if fast_fp32 else mm.get("torch_fp32")
    peak_of = {"eager": eager_peak, "eager bf16": mm.get("torch_bf16"), "onnxruntime": mm.get("ort_fp32"),
               "checkpoint (auto)": (mm.get("ort_fp32") if infer.get("checkpoint_auto_backend") == "onnx"
                                     else eager_peak)}
    lines += ["", "| inference, 375×500 JPEG, scales {1, 0.75} + flip (s; % of the path's matmul peak) | "
              + " | ".join(paths) + " |", "|---|" + "---|" * len(paths)]
    stages = sorted({st for v in paths.values() for st in v})
    for st in stages:
        cells = []
        for k in paths:
            t = paths[k].get(st, float("nan"))
            cell = f"{t:.3f}"
            flop = infer["network_gflop"].get(st)
            if flop and peak_of.get(k) and t == t:
                cell += f" ({100 * flop / t / peak_of[k]:.0f}%)"
            cells.append(cell)
        lines.append(f"| {st} | " + " | ".join(cells) + " |")
    if "checkpoint_first_load_s" in infer:
        lines.append(f"\nCheckpoint directory, processor-chosen path ({infer['checkpoint_auto_backend']}): first load "
                     f"{infer['checkpoint_first_load_s']:.1f} s (includes the one-time export when ONNX Runtime is "
                     f"chosen), cached load {infer['checkpoint_cached_load_s']:.1f} s.")
    if "crf_s" in infer:
        lines.append(f"\nDenseCRF on 375×500, 21 labels, 10 iterations: {infer['crf_s']:.3f} s on a demo-world scene "
                     f"(authors' {AUTHORS['crf_s']} s on a VOC image); {infer['crf_noise_s']:.3f} s on per-pixel noise "
                     "(worst case for the bilateral lattice)")
    lines.append(f"\nInference target ≤ {TARGETS['infer_375x500_s']} s (authors' code {AUTHORS['infer_375x500_s']} s).")
    t5 = TARGETS_AVX512
    lines.append(f"\nTargets on CPUs with AVX-512 + BF16: inference from a checkpoint directory ≤ "
                 f"{t5['infer_ckpt_fp32_s']} s in fp32 and ≤ {t5['infer_bf16_s']} s in bf16; training step ≤ "
                 f"{t5['train_fp32_s']} s in fp32 and ≤ {t5['train_bf16_s']} s with the bf16 frozen CLIP.")
    lines.append(f"\nBatch segmentation, {folder['images']} demo-world JPEGs ({folder['image_size']}, "
                 f"{folder['model']}, decode and CRF in worker processes): "
                 f"{folder['no_crf']['images_per_s']:.2f} images/s without CRF"
                 + (f", {folder['crf']['images_per_s']:.2f} images/s with CRF" if "crf" in folder else ""))
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--skip-onnx", action="store_true")
    ap.add_argument("--part", choices=["all", "peaks", "train", "infer", "folder"], default="all")
    ap.add_argument("--folder-images", type=int, default=200)
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                    help="frozen-CLIP arithmetic of the training part (model.backbone.precision)")
    ap.add_argument("--render", metavar="JSON", help="only print the markdown of a stored result")
    args = ap.parse_args()
    if args.render:
        print(render_md(json.loads(Path(args.render).read_text())))
        return 0
    torch.set_num_threads(args.threads)
    parts = {"peaks": bench_peaks, "train": bench_train, "infer": bench_infer, "folder": bench_folder}
    if args.part in parts:  # one part, in this process: its JSON on the last line
        print(json.dumps(parts[args.part](args)))
        return 0
    base = [sys.executable, __file__, "--threads", str(args.threads), "--repeats", str(args.repeats),
            "--device", args.device]
    if args.skip_onnx:
        base.append("--skip-onnx")

    def run_part(*extra: str) -> dict:
        """One part in a fresh process; its result is the JSON on the last line of its output."""
        proc = subprocess.run(base + list(extra), check=True, capture_output=True, text=True)
        return json.loads(proc.stdout.strip().splitlines()[-1])

    peaks = run_part("--part", "peaks")
    train = run_part("--part", "train")
    train16 = run_part("--part", "train", "--precision", "bf16")
    infer = run_part("--part", "infer")
    folder = run_part("--part", "folder", "--folder-images", str(args.folder_images))
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = None
    date = time.strftime("%Y-%m-%d")
    result = {"machine": platform.node(), "processor": peaks["cpu"]["model"], "cpu": peaks["cpu"],
              "cpus": os.cpu_count(), "device": args.device, "threads": args.threads, "repeats": args.repeats,
              "torch": torch.__version__,
              "onnxruntime": peaks["onnxruntime"], "matmul_gflops": peaks["matmul_gflops"],
              "inference_path": peaks["inference_path"], "fast_fp32": peaks.get("fast_fp32"),
              "date": date, "load_avg_1min_at_end": load, "train_batch4_320": train,
              "train_batch4_320_bf16": train16, "infer_375x500": infer,
              "folder": folder,
              "authors_code": AUTHORS, "targets": TARGETS}
    md = render_md(result)
    print(md)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{platform.node()}-{date}-{args.device}"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{stem}.md").write_text(md)
    print(f"wrote {out / (stem + '.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

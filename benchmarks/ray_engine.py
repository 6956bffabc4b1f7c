"""Images/s of ``weclip-segment --engine ray`` vs the local engine on the same folder and machine.

    python benchmarks/ray_engine.py [--n 120] [--cpus 2] [--model DIR] [--gpus-per-actor 0]
                                    [--configs 1x1] [--crf]

The folder is ``--n`` copies of the bundled sample images (demo-world scenes and one photo-like
picture). The local engine runs with its defaults (decode workers, threads from the CPU quota).
The Ray engine runs on a private single-node Ray with ``--cpus`` CPUs, once per actor layout
``AxC`` (A actors with C CPUs each; ``--gpus-per-actor`` GPUs each on a GPU machine). Reported
per run: images/s over the whole run (actor start and model load included, as a user sees it)
and the Ray start-up time separately. Every Ray run's masks are compared byte for byte with the
local engine's. Writes benchmarks/results/ray_engine.json and .md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _folder(root: Path, n: int) -> Path:
    samples = sorted((REPO / "weclip_infer" / "assets" / "samples").glob("*.jpg"))
    src = root / "in"
    for i in range(n):
        s = samples[i % len(samples)]
        d = src / f"part{i % 4}" / f"{s.stem}_{i:04d}.jpg"
        d.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(s, d)
    return src


def _masks(out: Path) -> dict:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*.png"))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=120, help="images in the folder")
    ap.add_argument("--cpus", type=int, default=2, help="CPUs of the private Ray")
    ap.add_argument("--model", default=None, help="model folder (default: the shipped demo model)")
    ap.add_argument("--configs", default="1x1", help="actor layouts AxC (A actors, C CPUs each; together fewer "
                    "CPUs than --cpus: decoding and encoding need one)")
    ap.add_argument("--gpus-per-actor", type=float, default=0.0)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--crf", action="store_true")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    a = ap.parse_args(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

    import ray

    from weclip_infer.ray.data import segment_folder_ray

    layouts = []
    for c in a.configs.split(","):
        actors, cpus = (int(v) for v in c.lower().split("x"))
        layouts.append((actors, cpus))
    res: dict = {"machine": {"host": platform.node(), "cpus_visible": os.cpu_count(),
                             "load_avg_at_start": list(os.getloadavg()), "python": platform.python_version()},
                 "n_images": a.n, "model": a.model or "demo model (shipped)", "crf": a.crf, "runs": []}
    with tempfile.TemporaryDirectory(prefix="weclip-ray-bench-") as tmp:
        root = Path(tmp)
        src = _folder(root, a.n)
        n_small = max(1, a.n // 4)
        small = _folder(root / "small", n_small)
        extra = ["--crf"] if a.crf else []
        model = ["--model", a.model] if a.model else []

        def run_local(tag: str, *flags: str) -> bool:
            t0 = time.perf_counter()
            rc = subprocess.run([sys.executable, "-m", "weclip_infer.segment", str(src), "--out", str(root / tag),
                                 "--quiet", *model, *extra, *flags], cwd=REPO, capture_output=True, text=True)
            wall = time.perf_counter() - t0
            if rc.returncode != 0:
                print(rc.stderr, file=sys.stderr)
                return False
            ips = float(rc.stdout.split("(")[-1].split(" img/s")[0])
            layout = " ".join(flags) or "defaults (2 decode workers, threads from the CPU quota)"
            res["runs"].append({"engine": "local", "layout": f"{layout}, {'after' if 'after' in tag else 'before'} "
                                "the Ray runs",
                                "images_per_s": ips, "process_wall_s": round(wall, 2)})
            print(f"local ({tag}): {ips:.2f} img/s (process {wall:.1f} s incl. model load)")
            return True

        if not run_local("local"):
            return 1
        ref = _masks(root / "local")
        if not run_local("local_1thread", "--threads", "1", "--workers", "1"):  # the Ray actor's layout
            return 1
        res["runs"][-1]["masks_identical_to_local"] = _masks(root / "local_1thread") == ref

        t0 = time.perf_counter()
        ray.init(address="local", num_cpus=a.cpus, num_gpus=None, include_dashboard=False,
                 _node_ip_address="127.0.0.1", logging_level="WARNING", log_to_driver=False)
        res["ray_start_s"] = round(time.perf_counter() - t0, 2)
        print(f"ray start: {res['ray_start_s']:.1f} s")
        try:
            for actors, cpus in layouts:
                walls = {}
                # the first run on a fresh Ray also starts its worker processes: a warm-up run first
                for folder, tag in ((small, "warmup"), (small, "small"), (src, "full")):
                    out = root / f"ray_{actors}x{cpus}_{tag}"
                    t0 = time.perf_counter()
                    s = segment_folder_ray(folder, out, model=a.model, crf=True if a.crf else None, progress=False,
                                           num_actors=actors, cpus_per_actor=cpus, gpus_per_actor=a.gpus_per_actor,
                                           batch_size=a.batch_size)
                    walls[tag] = time.perf_counter() - t0
                same = _masks(out) == ref
                # two folder sizes: the difference cancels the fixed cost of starting actors and loading models
                dt = walls["full"] - walls["small"]
                marginal = (a.n - n_small) / dt if dt > 0 else float("nan")
                res["runs"].append({"engine": "ray", "layout": f"{actors} actor(s) x {cpus} CPU"
                                    + (f" x {a.gpus_per_actor} GPU" if a.gpus_per_actor else ""),
                                    "images_per_s": s["images_per_s"], "run_wall_s": round(walls["full"], 2),
                                    "run_wall_s_small": round(walls["small"], 2), "n_small": n_small,
                                    "run_wall_s_warmup": round(walls["warmup"], 2),
                                    "marginal_images_per_s": round(marginal, 3),
                                    "masks_identical_to_local": same, "batch_size": a.batch_size})
                print(f"ray {actors}x{cpus}: {s['images_per_s']:.2f} img/s ({walls['full']:.1f} s; {n_small} images "
                      f"{walls['small']:.1f} s; marginal {marginal:.2f} img/s), identical: {same}")
        finally:
            ray.shutdown()
        if not run_local("local_after"):  # the machine is shared: the spread of the two local runs shows the noise
            return 1
        res["runs"][-1]["masks_identical_to_local"] = _masks(root / "local_after") == ref
    res["machine"]["load_avg_at_end"] = list(os.getloadavg())
    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "ray_engine.json").write_text(json.dumps(res, indent=2) + "\n")
    lines = [f"# Ray engine vs local engine ({a.n} images, {res['model']}{', CRF' if a.crf else ''})", "",
             f"Machine: {res['machine']['cpus_visible']} CPUs, load average at start "
             f"{res['machine']['load_avg_at_start'][0]:.1f} (shared with other jobs: numbers are indicative). "
             f"Private Ray with {a.cpus} CPUs, start-up {res['ray_start_s']} s (not included below). images/s: "
             "segmented images over the folder loop's time; for Ray this includes starting the actors and "
             "loading the model in them, for the local engine the model is loaded before.", "",
             "| engine | layout | images/s | images/s without start-up | masks = local |", "|---|---|---|---|---|"]
    for r in res["runs"]:
        lines.append(f"| {r['engine']} | {r['layout']} | {r['images_per_s']:.2f} | "
                     f"{r.get('marginal_images_per_s', r['images_per_s']):.2f} | "
                     f"{'yes' if r.get('masks_identical_to_local', True) else 'NO'} |")
    lines += ["", "Without start-up, Ray: (n - n/4) images over the difference of the wall times of a run on "
              "n and on n/4 images (the fixed cost of starting actors and loading the model cancels). Local: "
              "the model is loaded before the folder loop, so both columns are the same."]
    (out_dir / "ray_engine.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

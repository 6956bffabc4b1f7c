"""``weclip-segment``: batch segmentation of folders (thin CLI over ``Segmenter``).

    weclip-segment INPUT (folder or list file) --out OUT [--model DIR] [--ext jpg,png] [--overlay]
                   [--resume] [--shard i/n] [--workers 2] [--crf] [--scales 1,0.75] [--no-flip]

Output mirrors the input tree: ``<rel>.png`` palette masks (VOC palette, extended to 256 ids),
optional ``<rel>_overlay.jpg``, and ``results.jsonl`` (one line per image: classes, areas,
timings, or the error). Images are decoded in DataLoader worker processes while the model runs;
every output is written atomically, so a killed run never leaves a half-written PNG and
``--resume`` skips exactly the finished images. Bad files are logged with path and reason,
skipped and counted; the exit code is non-zero if any failed.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from collections import deque
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np

from .imageio import DEFAULT_MAX_PIXELS, ImageDecodeError, atomic_write_bytes, load_image, save_png_atomic
from .palette import overlay, voc_palette
from .crf import crf_labels

__all__ = ["list_inputs", "shard", "segment_folder", "main"]

DEFAULT_EXTS = ("jpg", "jpeg", "png", "bmp", "webp", "tif", "tiff")


def list_inputs(src: Path, exts: Sequence[str] = DEFAULT_EXTS) -> list[tuple[Path, str]]:
    """``(path, relative name without extension)`` for a folder (recursive, filtered by
    extension, sorted) or a list file (one path per line, relative to the list's folder)."""
    exts = tuple("." + e.lower().lstrip(".") for e in exts)
    if src.is_dir():
        files = sorted(p for p in src.rglob("*") if p.is_file() and p.suffix.lower() in exts)
        return [(p, p.relative_to(src).with_suffix("").as_posix()) for p in files]
    if src.is_file():
        out = []
        for line in src.read_text().splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            p = Path(line)
            p = p if p.is_absolute() else src.parent / p
            rel = Path(line).with_suffix("").as_posix().lstrip("/")
            out.append((p, rel.replace("..", "_")))
        return out
    raise FileNotFoundError(f"input not found: {src}")


def shard(items: list, spec: Optional[str]) -> list:
    """Keep every n-th item starting at i for ``spec = "i/n"`` (0 ≤ i < n)."""
    if not spec:
        return items
    try:
        i, n = (int(v) for v in spec.split("/"))
        assert 0 <= i < n
    except (ValueError, AssertionError):
        raise ValueError(f"--shard: expected i/n with 0 <= i < n, got {spec!r}") from None
    return items[i::n]


class _Decoded:
    """Decode images in worker processes; errors travel back as values, not exceptions."""

    def __init__(self, items: list[tuple[Path, str]], max_pixels: int):
        self.items, self.max_pixels = items, max_pixels

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        path, rel = self.items[i]
        t0 = time.perf_counter()
        try:
            img = load_image(path, max_pixels=self.max_pixels)
            return {"rel": rel, "path": str(path), "image": img, "error": None, "decode_s": time.perf_counter() - t0}
        except ImageDecodeError as e:
            return {"rel": rel, "path": str(path), "image": None, "error": e.reason, "decode_s": time.perf_counter() - t0}


def _iter_decoded(items, workers: int, max_pixels: int) -> Iterator[dict]:
    ds = _Decoded(items, max_pixels)
    if workers <= 0:
        for i in range(len(ds)):
            yield ds[i]
        return
    from torch.utils.data import DataLoader

    loader = DataLoader(ds, batch_size=None, shuffle=False, num_workers=workers, prefetch_factor=4,
                        collate_fn=lambda x: x)
    yield from loader


def segment_folder(segmenter, src: Path, out: Path, *, exts=DEFAULT_EXTS, resume: bool = False, shard_spec=None,
                   workers: int = 2, overlay_out: bool = False, crf: Optional[bool] = None, scales=None,
                   flip: Optional[bool] = None, max_pixels: int = DEFAULT_MAX_PIXELS, progress: bool = True) -> dict:
    """Segment every image under ``src`` into ``out``. Returns a summary dict."""
    from tqdm import tqdm

    items = shard(list_inputs(src, exts), shard_spec)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.rglob(".*.tmp"):  # temp files of a killed run (atomic writes never expose them)
        stale.unlink(missing_ok=True)
    todo = [(p, r) for p, r in items if not (resume and (out / f"{r}.png").is_file())]
    skipped = len(items) - len(todo)
    pal = voc_palette()
    log_path = out / "results.jsonl"
    n_ok = n_bad = 0
    failures = []
    t_start = time.perf_counter()
    crf = bool(segmenter.crf if crf is None else crf)
    # DenseCRF is single-threaded C++: with workers it runs in a worker process while the model
    # segments the next images (results are still written in input order).
    pool = None
    if crf and workers > 0:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        from .crf import _import_pydensecrf

        _import_pydensecrf()  # fail now with the install hint, not inside a worker
        pool = ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn"))
    pending: deque = deque()

    with open(log_path, "a", encoding="utf-8") as log:
        bar = tqdm(total=len(todo), disable=not progress, unit="img", desc="segment")

        def fail(rec: dict, path: str, reason: str) -> None:
            nonlocal n_bad
            n_bad += 1
            failures.append((path, reason))
            rec.update(ok=False, error=reason)
            tqdm.write(f"skipped {path}: {reason}", file=sys.stderr)

        def finish(item: dict, rec: dict, res, fut=None) -> None:
            nonlocal n_ok
            try:
                if fut is not None:
                    res.labels, res.timings["crf"] = fut.result()
                    res.timings["total"] += res.timings["crf"]
                if overlay_out:
                    buf = io.BytesIO()
                    from PIL import Image

                    Image.fromarray(overlay(item["image"], res.labels)).save(buf, format="JPEG", quality=90)
                    atomic_write_bytes(out / f"{item['rel']}_overlay.jpg", buf.getvalue())
                # the mask is written last: its presence marks the image as done (--resume)
                save_png_atomic(out / f"{item['rel']}.png", res.labels.astype(np.uint8), palette=pal)
            except Exception as e:  # noqa: BLE001 - report and continue
                fail(rec, item["path"], str(e))
            else:
                n_ok += 1
                t = dict(res.timings)
                t["decode"] = item["decode_s"]
                rec.update(ok=True, size=list(res.labels.shape), classes=sorted(res.areas()), areas=res.areas(),
                           timings={k: round(v, 5) for k, v in t.items()})
            log.write(json.dumps(rec) + "\n")
            log.flush()
            bar.update(1)

        try:
            for item in _iter_decoded(todo, workers, max_pixels):
                rec = {"image": item["path"], "mask": f"{item['rel']}.png"}
                if item["error"] is not None:
                    fail(rec, item["path"], item["error"])
                    pending.append((item, rec, None, None))
                else:
                    try:
                        if pool is not None:
                            res = segmenter.predict(item["image"], crf=False, scales=scales, flip=flip, keep_probs=True)
                            probs, res.probs = res.probs, None
                            pending.append((item, rec, res, pool.submit(crf_labels, item["image"], probs)))
                        else:
                            res = segmenter.predict(item["image"], crf=crf, scales=scales, flip=flip)
                            pending.append((item, rec, res, None))
                    except Exception as e:  # noqa: BLE001 - report and continue
                        fail(rec, item["path"], str(e))
                        pending.append((item, rec, None, None))
                # write finished items in order; at most a few CRFs queued behind the model
                while pending and (len(pending) > 2 or pending[0][3] is None or pending[0][3].done()):
                    _flush_one(pending, finish, log, bar)
            while pending:
                _flush_one(pending, finish, log, bar)
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
            bar.close()
    elapsed = time.perf_counter() - t_start
    summary = {"total": len(items), "segmented": n_ok, "failed": n_bad, "skipped_existing": skipped,
               "seconds": round(elapsed, 3), "images_per_s": round(n_ok / elapsed, 3) if elapsed > 0 and n_ok else 0.0,
               "failures": failures}
    return summary


def _flush_one(pending: deque, finish, log, bar) -> None:
    item, rec, res, fut = pending.popleft()
    if res is None:  # failed earlier: only the log line
        log.write(json.dumps(rec) + "\n")
        log.flush()
        bar.update(1)
    else:
        finish(item, rec, res, fut)


def _parse_scales(s: Optional[str]):
    if s is None:
        return None
    try:
        return [float(v) for v in s.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--scales: comma-separated numbers expected, got {s!r}") from None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="weclip-segment", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("input", type=Path, help="folder of images (recursive) or a list file")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--model", default=None, help="checkpoint dir or exported bundle (default: the embedded demo model)")
    ap.add_argument("--backend", default="auto", choices=["auto", "eager", "onnx", "torchscript"])
    ap.add_argument("--device", default=None, help="cpu | cuda | auto (default)")
    ap.add_argument("--ext", default=",".join(DEFAULT_EXTS), help="extensions to include")
    ap.add_argument("--resume", action="store_true", help="skip images whose mask already exists")
    ap.add_argument("--shard", default=None, help="i/n: process every n-th image starting at i")
    ap.add_argument("--workers", type=int, default=2, help="decoding worker processes (0: decode in the main process)")
    ap.add_argument("--overlay", action="store_true", help="also write <name>_overlay.jpg")
    ap.add_argument("--crf", action="store_true", help="DenseCRF post-processing (spec §8.2)")
    ap.add_argument("--scales", type=_parse_scales, default=None, help="e.g. 1,0.75")
    ap.add_argument("--no-flip", action="store_true")
    ap.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS)
    ap.add_argument("--quiet", action="store_true")
    a = ap.parse_args(argv)
    from .predictor import Segmenter
    from .quickstart import DEMO_MODEL_DIR

    try:
        shard([], a.shard)
        model = a.model or str(DEMO_MODEL_DIR)
        kw = {} if a.backend in ("auto", "eager") else {"backend": a.backend}
        seg = Segmenter.from_pretrained(model, device=a.device, **kw)
        from .memory import reuse_freed_memory

        reuse_freed_memory(device=seg.device)  # per-image temporaries reused, not page-faulted in again (issue 9)
        if a.crf:
            from .crf import crf_available, INSTALL_HINT

            if not crf_available():
                raise RuntimeError(INSTALL_HINT)
        summary = segment_folder(seg, a.input, a.out, exts=a.ext.split(","), resume=a.resume, shard_spec=a.shard,
                                 workers=a.workers, overlay_out=a.overlay, crf=a.crf or None, scales=a.scales,
                                 flip=False if a.no_flip else None, max_pixels=a.max_pixels, progress=not a.quiet)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"weclip-segment: error: {e}", file=sys.stderr)
        return 2
    print(f"segmented {summary['segmented']}, failed {summary['failed']}, skipped (existing) {summary['skipped_existing']} "
          f"of {summary['total']} in {summary['seconds']:.1f} s ({summary['images_per_s']:.2f} img/s)")
    for path, why in summary["failures"][:20]:
        print(f"  FAILED {path}: {why}", file=sys.stderr)
    return 1 if summary["failed"] else 0


if __name__ == "__main__":
    raise SystemExit(main())

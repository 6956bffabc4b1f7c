"""Writing the demo world to disk as a VOC-style data set (see :func:`write_voc_layout`)."""
from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Optional, Union

import numpy as np
from PIL import Image

from weclip_infer.imageio import save_png_atomic
from weclip_infer.io_utils import atomic_write_bytes
from weclip_infer.palette import voc_palette

from .generate import generate_sample
from .world_config import BACKGROUND_NAMES, CLASS_COLORS, GENERATOR_VERSION, SPLIT_OFFSETS, WorldConfig

__all__ = ["sample_name", "write_voc_layout"]

# --------------------------------------------------------------------------------------------
# VOC-style layout on disk
# --------------------------------------------------------------------------------------------
def sample_name(split: str, k: int) -> str:
    """File stem of the ``k``-th (1-based) image of ``split``: ``demo_<split>_<k:06d>``."""
    return f"demo_{split}_{k:06d}"


def _jpeg_bytes(image: np.ndarray, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality, subsampling=0)
    return buf.getvalue()


def _json_bytes(obj) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=False) + "\n").encode("utf-8")


_WORKER_STATE: dict = {}


def _write_one(job: tuple) -> dict:
    split, k = job
    st = _WORKER_STATE
    cfg, seed, out, overwrite, quality = st["cfg"], st["seed"], st["out"], st["overwrite"], st["quality"]
    s = generate_sample(seed, SPLIT_OFFSETS[split] + k, cfg)
    name = sample_name(split, k)
    jpg = out / "JPEGImages" / f"{name}.jpg"
    png = out / "SegmentationClassAug" / f"{name}.png"
    if overwrite or not jpg.exists():
        atomic_write_bytes(jpg, _jpeg_bytes(s.image, quality))
    if overwrite or not png.exists():
        save_png_atomic(png, s.mask, palette=voc_palette())  # palette PNG: pixel value = class index
    return {"name": name, "split": split, "classes": s.classes, "background": s.background,
            "background_name": s.background_name, "captions": s.captions}


def _init_worker(state: dict) -> None:
    _WORKER_STATE.clear()
    _WORKER_STATE.update(state)


def write_voc_layout(out_dir: Union[str, os.PathLike], n_train: int, n_val: int, seed: int = 0,
                     cfg: Optional[WorldConfig] = None, n_test: int = 0, workers: int = 1,
                     overwrite: bool = False, jpeg_quality: int = 95, progress: bool = False) -> dict:
    """Write a VOC-style data set of the demo world to ``out_dir`` and return its ``meta`` dict.

    Layout: ``JPEGImages/<name>.jpg`` (quality ``jpeg_quality``), ``SegmentationClassAug/<name>.png``
    (palette PNG, VOC palette, values 0..n_classes), ``train.txt`` / ``val.txt`` (/ ``test.txt`` when
    ``n_test``), ``cls_labels_onehot.npy`` (pickled dict name → float32[n_classes] multi-hot, as for
    VOC; load with ``np.load(p, allow_pickle=True).item()``), ``cls_labels.json`` (name → list of
    0/1 ints), ``captions.jsonl`` (one JSON object per image: name, split, classes, background,
    background_name, captions), ``classes.json`` (class_names, class_prompts, bg_prompts) and
    ``meta.json`` (generator/version, seed, config, counts, split index offsets, status).

    Split ``s`` image ``k`` (1-based) is ``generate_sample(seed, SPLIT_OFFSETS[s] + k, cfg)`` named
    ``demo_<s>_<k:06d>``, so splits never share random streams. Every file is written atomically
    (temp file + ``os.replace``). Re-running into the same folder resumes: existing images/masks are
    kept unless ``overwrite`` (they are identical anyway: same args → byte-identical files); the
    list/label/meta files are always rewritten. A folder made with a different seed, config or
    generator version is refused unless ``overwrite``.
    """
    cfg = cfg or WorldConfig()
    out = Path(out_dir)
    for n, what in ((n_train, "n_train"), (n_val, "n_val"), (n_test, "n_test")):
        if n < 0:
            raise ValueError(f"{what} must be >= 0")
    if max(n_train, n_val, n_test) >= SPLIT_OFFSETS["val"] - SPLIT_OFFSETS["train"]:
        raise ValueError("at most 9,999,999 images per split")
    ident = {"generator": "weclip_infer.demo.world", "version": GENERATOR_VERSION, "seed": int(seed),
             "config": cfg.to_dict(), "jpeg_quality": int(jpeg_quality)}
    meta_path = out / "meta.json"
    if meta_path.exists() and not overwrite:
        try:
            old = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            old = None
        if old is None or any(old.get(k) != v for k, v in ident.items()):
            raise ValueError(f"{out} holds a demo world made with other settings (see {meta_path}); "
                             "use another folder or overwrite (--overwrite)")
    (out / "JPEGImages").mkdir(parents=True, exist_ok=True)
    (out / "SegmentationClassAug").mkdir(parents=True, exist_ok=True)
    counts = {"train": int(n_train), "val": int(n_val), "test": int(n_test)}
    meta = dict(ident)
    meta.update({"counts": counts, "n_classes": cfg.n_classes,
                 "split_index_offsets": {k: SPLIT_OFFSETS[k] for k in ("train", "val", "test")},
                 "naming": "demo_<split>_<k:06d> = generate_sample(seed, split_index_offsets[split] + k, config), "
                           "k >= 1",
                 "status": "in_progress"})
    atomic_write_bytes(meta_path, _json_bytes(meta))

    jobs = [(split, k) for split in ("train", "val", "test") for k in range(1, counts[split] + 1)]
    state = {"cfg": cfg, "seed": int(seed), "out": out, "overwrite": bool(overwrite), "quality": int(jpeg_quality)}
    records: list[dict] = []
    if workers > 1 and len(jobs) > 1:
        import multiprocessing as mp

        ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
        with ctx.Pool(workers, initializer=_init_worker, initargs=(state,)) as pool:
            for i, rec in enumerate(pool.imap(_write_one, jobs, chunksize=16)):
                records.append(rec)
                if progress and (i + 1) % 500 == 0:
                    print(f"  {i + 1}/{len(jobs)}", flush=True)
    else:
        _init_worker(state)
        for i, job in enumerate(jobs):
            records.append(_write_one(job))
            if progress and (i + 1) % 500 == 0:
                print(f"  {i + 1}/{len(jobs)}", flush=True)

    for split in ("train", "val", "test"):
        names = [r["name"] for r in records if r["split"] == split]
        if split != "test" or n_test:
            atomic_write_bytes(out / f"{split}.txt", "".join(n + "\n" for n in names).encode())
    onehot: dict[str, np.ndarray] = {}
    plain: dict[str, list[int]] = {}
    for r in records:
        v = np.zeros(cfg.n_classes, dtype=np.float32)
        v[r["classes"]] = 1.0
        onehot[r["name"]] = v
        plain[r["name"]] = [int(x) for x in v]
    buf = io.BytesIO()
    np.save(buf, np.array(onehot, dtype=object), allow_pickle=True)  # a 0-d object array holding the dict

    atomic_write_bytes(out / "cls_labels_onehot.npy", buf.getvalue())
    atomic_write_bytes(out / "cls_labels.json", (json.dumps(plain) + "\n").encode())
    atomic_write_bytes(out / "captions.jsonl", "".join(json.dumps(r) + "\n" for r in records).encode())
    atomic_write_bytes(out / "classes.json", _json_bytes({
        "class_names": cfg.class_names, "class_prompts": cfg.class_prompts, "bg_prompts": list(BACKGROUND_NAMES),
        "class_colors": [list(c) for c in CLASS_COLORS[: cfg.n_classes]]}))
    fg_hist = np.zeros(cfg.n_classes, dtype=np.int64)
    for r in records:
        fg_hist[r["classes"]] += 1
    meta["status"] = "complete"
    meta["images_per_class"] = {cfg.class_names[i]: int(fg_hist[i]) for i in range(cfg.n_classes)}
    atomic_write_bytes(meta_path, _json_bytes(meta))
    return meta

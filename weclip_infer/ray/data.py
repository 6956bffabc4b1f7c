"""Batch segmentation on Ray Data: the model in a pool of actors, decoding, CRF and encoding as tasks.

Two entry points:

* :func:`segment_dataset` for users with a Ray pipeline: a ``ray.data.Dataset`` whose rows hold
  a ``path`` (decoded on the cluster, with the same decoder, limits and error messages as the
  local engine) or an ``image`` (H×W×3 uint8, e.g. from ``ray.data.read_images``) in, the same
  rows with ``mask`` (H×W uint8 class indices), ``classes``, ``timings`` and ``error`` out.
* :func:`segment_folder_ray`, the engine behind ``weclip-segment --engine ray``: the local
  engine's folder loop (listing, resume, ``results.jsonl``, bad-file report, atomic writes in
  input order on the driver) with decoding, the model, DenseCRF and PNG/JPEG encoding running
  on the cluster. Its outputs are byte-identical to the local engine's.

Pipeline: ``read`` (paths) → ``decode`` (tasks; Ray fuses them into the actors when both ask for
the same resources, as on CPU-only clusters) → ``segment`` (``map_batches`` with a callable
class: one model load per actor, ``num_actors`` actors with ``gpus_per_actor`` GPUs each) →
``crf`` (tasks; only rows that asked for it) → ``encode`` (tasks) → the driver. Ray Data
streams: at most a few batches per stage are in flight, so memory stays bounded for any folder
size. Input and model folders must be readable at the same path on every node (a shared file
system); outputs are written by the driver only.
"""
from __future__ import annotations

import logging
import os
import pickle
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Union

import numpy as np

from ..batch.workers import DecodedImage
from ..imageio import DEFAULT_MAX_PIXELS

__all__ = ["segment_dataset", "segment_folder_ray", "init_ray", "RayItem"]

logger = logging.getLogger(__name__)

_EMPTY = np.zeros((0, 0, 3), np.uint8)  # the image column of a row that could not be decoded


def init_ray(address: Optional[str] = None, num_cpus: Optional[int] = None) -> bool:
    """Connect to ``address`` (``auto``, ``ray://host:10001``) or, without one, start a private
    single-node Ray (node address 127.0.0.1, no dashboard; some of Ray's internal ports still
    listen on all interfaces, see docs/scale_out.md). Returns True when this call started or
    connected Ray (the caller then shuts it down), False when Ray was already initialised."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage report to the network
    if address:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
    else:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1",
                 logging_level=logging.WARNING, log_to_driver=False)
    return True


# ---- stages (run on the cluster) ---------------------------------------------------------------------
def _column(batch: Dict[str, np.ndarray], key: str, n: int, default: Any) -> List[Any]:
    return list(batch[key]) if key in batch else [default] * n


def _decode_batch(batch: Dict[str, np.ndarray], max_pixels: int) -> Dict[str, np.ndarray]:
    """``path`` → ``image`` (or ``error``), with the local engine's decoder."""
    from ..batch.workers import _Decoder

    paths = [str(p) for p in batch["path"]]
    n = len(paths)
    names = [str(x) for x in _column(batch, "name", n, "")]
    dec = _Decoder([(Path(p), nm) for p, nm in zip(paths, names)], max_pixels)
    images, errors, decode_s = [], [], []
    for i in range(n):
        d = dec[i]
        images.append(_EMPTY if d.image is None else d.image)
        errors.append(d.error or "")
        decode_s.append(d.decode_s)
    out = dict(batch)
    out.update(image=_objects(images), error=np.array(errors, dtype=object), decode_s=np.array(decode_s, np.float64))
    return out


def _objects(items: Sequence[Any]) -> np.ndarray:
    arr = np.empty(len(items), dtype=object)
    arr[:] = list(items)
    return arr


class _SegmentActor:
    """One model per actor; segments the rows of a batch one by one (images differ in size)."""

    def __init__(self, model: Optional[str], backend: str, device: Optional[str], scales, flip, crf: Optional[bool],
                 threads: int, precision: Optional[str] = None):
        import torch

        from ..memory import reuse_freed_memory
        from ..predictor import Segmenter
        from ..quickstart import DEMO_MODEL_DIR

        torch.set_num_threads(max(1, int(threads)))
        self.seg = Segmenter.from_pretrained(model or str(DEMO_MODEL_DIR), device=device, backend=backend,
                                             precision=precision)
        reuse_freed_memory(device=self.seg.device)
        self.scales, self.flip = scales, flip
        self.crf = bool(self.seg.crf if crf is None else crf)

    def __call__(self, batch: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        n = len(batch["image"])
        errors = [str(e) for e in _column(batch, "error", n, "")]
        results: List[bytes] = []
        for i in range(n):
            img = batch["image"][i]
            if errors[i]:
                results.append(b"")
                continue
            try:
                if self.crf and img.shape[0] * img.shape[1] > self.seg.crf_max_pixels:
                    # above the CRF pixel budget the Segmenter refines at a reduced size, here
                    # (as the local engine does): full-resolution probabilities are never built
                    res = self.seg.predict(img, crf=True, scales=self.scales, flip=self.flip)
                elif self.crf:  # DenseCRF runs in its own stage; the class probabilities travel with the row
                    res = self.seg.predict(img, crf=False, scales=self.scales, flip=self.flip, keep_probs=True)
                else:
                    res = self.seg.predict(img, crf=False, scales=self.scales, flip=self.flip)
                results.append(pickle.dumps(res, protocol=pickle.HIGHEST_PROTOCOL))
            except Exception as e:  # noqa: BLE001 - a failure of this input: reported, the run goes on
                errors[i] = str(e) or type(e).__name__
                results.append(b"")
        out = dict(batch)
        out.update(error=np.array(errors, dtype=object), res=_objects(results))
        return out


def _crf_batch(batch: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """DenseCRF for the rows whose result carries class probabilities (as the local engine's CRF worker)."""
    from ..crf import crf_labels

    res_col = list(batch["res"])
    for i, blob in enumerate(res_col):
        if not blob:
            continue
        res = pickle.loads(blob)
        if res.probs is None:
            continue
        probs, res.probs = res.probs, None
        res.labels, res.timings["crf"] = crf_labels(batch["image"][i], probs)
        res.timings["total"] += res.timings["crf"]
        res_col[i] = pickle.dumps(res, protocol=pickle.HIGHEST_PROTOCOL)
    out = dict(batch)
    out["res"] = _objects(res_col)
    return out


def _finish_batch(batch: Dict[str, np.ndarray], keep_image: bool) -> Dict[str, np.ndarray]:
    """Library output: ``mask``, ``classes``, ``timings`` (JSON text) and ``error`` per row."""
    import json

    masks: List[np.ndarray] = []
    classes: List[List[str]] = []
    timings: List[str] = []
    for blob in batch["res"]:
        if not blob:
            masks.append(np.zeros((0, 0), np.uint8))
            classes.append([])
            timings.append("{}")
            continue
        res = pickle.loads(blob)
        masks.append(res.labels.astype(np.uint8))
        classes.append(sorted(res.areas()))
        timings.append(json.dumps({k: round(float(v), 5) for k, v in res.timings.items()}))
    out = {k: v for k, v in batch.items() if k != "res" and (keep_image or k != "image")}
    out.update(mask=_objects(masks), classes=_objects(classes), timings=np.array(timings, dtype=object))
    return out


def _encode_batch(batch: Dict[str, np.ndarray], overlay_out: bool) -> Dict[str, np.ndarray]:
    """Folder engine: the local engine's per-image outputs (files + results.jsonl fields), pickled."""
    from ..batch.segmentation import image_result

    n = len(batch["path"])
    errors = [str(e) for e in batch["error"]]
    results: List[bytes] = []
    for i in range(n):
        if errors[i]:
            results.append(b"")
            continue
        item = DecodedImage(str(batch["path"][i]), str(batch["name"][i]), batch["image"][i], None,
                            float(batch["decode_s"][i]))
        try:
            results.append(pickle.dumps(image_result(item, pickle.loads(batch["res"][i]), overlay_out),
                                        protocol=pickle.HIGHEST_PROTOCOL))
        except Exception as e:  # noqa: BLE001 - a failure of this input: reported, the run goes on
            errors[i] = str(e) or type(e).__name__
            results.append(b"")
    return {"path": batch["path"], "name": batch["name"], "error": np.array(errors, dtype=object),
            "decode_s": batch["decode_s"], "result": _objects(results)}


# ---- the pipeline ------------------------------------------------------------------------------------
def _check_resources(num_actors: int, gpus_per_actor: float, cpus_per_actor: float, batch_size: int) -> None:
    if isinstance(num_actors, bool) or not isinstance(num_actors, int) or num_actors < 1:
        raise ValueError(f"num_actors must be an integer >= 1, got {num_actors!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if not 0 <= float(gpus_per_actor) <= 64:
        raise ValueError(f"gpus_per_actor must be in [0, 64], got {gpus_per_actor!r}")
    if not 0 < float(cpus_per_actor) <= 1024:
        raise ValueError(f"cpus_per_actor must be > 0, got {cpus_per_actor!r}")


def _check_cluster_fits(num_actors: int, gpus_per_actor: float, cpus_per_actor: float) -> None:
    """``ValueError`` when the actors would take every CPU (decode/CRF/encode tasks could then never
    run and the pipeline would stall) or need more GPUs than the cluster has."""
    import ray

    if not ray.is_initialized():
        return
    total = ray.cluster_resources()
    cpus, gpus = float(total.get("CPU", 0)), float(total.get("GPU", 0))
    if num_actors * float(cpus_per_actor) >= cpus:
        raise ValueError(f"{num_actors} actor(s) x {cpus_per_actor:g} CPU would take all {cpus:g} CPUs of the Ray "
                         "cluster; leave at least one CPU for decoding and encoding (fewer actors or CPUs per actor)")
    if num_actors * float(gpus_per_actor) > gpus:
        raise ValueError(f"{num_actors} actor(s) x {gpus_per_actor:g} GPU need more than the {gpus:g} GPU(s) "
                         "of the Ray cluster")


def _pipeline(ds, *, model: Optional[str], backend: str, device: Optional[str], num_actors: int,
              gpus_per_actor: float, cpus_per_actor: float, batch_size: int, crf: Optional[bool], scales, flip,
              max_pixels: int, precision: Optional[str] = None):
    _check_resources(num_actors, gpus_per_actor, cpus_per_actor, batch_size)
    _check_cluster_fits(num_actors, gpus_per_actor, cpus_per_actor)
    columns = set(ds.columns() or [])
    if "image" not in columns:
        if "path" not in columns:
            raise ValueError("the dataset needs a 'path' or an 'image' column")
        ds = ds.map_batches(_decode_batch, fn_kwargs={"max_pixels": int(max_pixels)}, batch_size=batch_size,
                            batch_format="numpy")
    model = _resolve_model(model)
    ds = ds.map_batches(
        _SegmentActor, fn_constructor_kwargs={"model": model, "backend": backend, "device": device, "scales": scales,
                                              "flip": flip, "crf": crf, "threads": max(1, int(cpus_per_actor)),
                                              "precision": precision},
        compute=_actor_pool(num_actors), num_cpus=cpus_per_actor, num_gpus=gpus_per_actor or None,
        batch_size=batch_size, batch_format="numpy")
    if crf is not False:  # None: the model's default decides, row by row
        ds = ds.map_batches(_crf_batch, batch_size=batch_size, batch_format="numpy")
    return ds


def _resolve_model(model: Optional[str]) -> Optional[str]:
    """Absolute model path (the actors may run elsewhere); checked here, because inside an actor a
    missing folder would only surface as a Ray error."""
    if model is None:
        return None
    path = Path(model).expanduser().resolve()
    if not path.is_dir():
        raise ValueError(f"model folder not found: {path}")
    return str(path)


def _actor_pool(n: int):
    from ray.data import ActorPoolStrategy

    return ActorPoolStrategy(size=n)


def segment_dataset(ds, model: Optional[Union[str, os.PathLike]] = None, *, backend: str = "auto",
                    device: Optional[str] = None, num_actors: int = 1, gpus_per_actor: float = 0.0,
                    cpus_per_actor: float = 1.0, batch_size: int = 4, crf: Optional[bool] = None, scales=None,
                    flip: Optional[bool] = None, max_pixels: int = DEFAULT_MAX_PIXELS, keep_image: bool = False,
                    precision: Optional[str] = None):
    """Segment the rows of a ``ray.data.Dataset`` (lazy: nothing runs until the result is consumed).

    Rows need ``path`` (a file readable on every node) or ``image`` (H×W×3 uint8); other columns
    are kept. Added: ``mask`` (H×W uint8 class indices; 0×0 when the row failed), ``classes``
    (names present), ``timings`` (JSON text, seconds per stage) and ``error`` (empty when fine).
    ``model``: checkpoint folder or export bundle (default: the embedded demo model), loaded once
    per actor. ``keep_image`` keeps the decoded image column. ``precision``: ``fp32`` or ``bf16``
    (default: the model's ``inference.precision``).
    """
    ds = _pipeline(ds, model=None if model is None else str(model), backend=backend, device=device,
                   num_actors=num_actors, gpus_per_actor=gpus_per_actor, cpus_per_actor=cpus_per_actor,
                   batch_size=batch_size, crf=crf, scales=scales, flip=flip, max_pixels=max_pixels,
                   precision=precision)
    return ds.map_batches(_finish_batch, fn_kwargs={"keep_image": keep_image}, batch_size=batch_size,
                          batch_format="numpy")


@dataclass
class RayItem(DecodedImage):
    """What the Ray source hands to the folder loop per input: the local engine's ``DecodedImage``
    (without the image, which stayed on the cluster) plus the finished per-image result."""

    result: Any = None


def _ray_source(todo: Sequence[tuple], *, overlay_out: bool, **pipeline_kw) -> Iterator[RayItem]:
    """The decoded-and-segmented inputs of ``todo`` in input order, computed on the cluster."""
    import ray.data

    if not todo:
        return
    ctx = ray.data.DataContext.get_current()
    saved = ctx.execution_options.preserve_order, ctx.enable_progress_bars
    ctx.execution_options.preserve_order = True  # results.jsonl in input order, as the local engine
    ctx.enable_progress_bars = False  # the folder loop has its own
    try:
        batch_size = pipeline_kw["batch_size"]
        ds = ray.data.from_items([{"path": str(p), "name": n} for p, n in todo],
                                 override_num_blocks=max(1, min(4096, (len(todo) + batch_size - 1) // batch_size)))
        ds = _pipeline(ds, **pipeline_kw)
        ds = ds.map_batches(_encode_batch, fn_kwargs={"overlay_out": overlay_out}, batch_size=batch_size,
                            batch_format="numpy")
        for row in ds.iter_rows():
            err = str(row["error"]) or None
            blob = row["result"]
            yield RayItem(str(row["path"]), str(row["name"]), None, err, float(row["decode_s"]),
                          pickle.loads(blob) if blob else None)
    finally:
        ctx.execution_options.preserve_order, ctx.enable_progress_bars = saved


def segment_folder_ray(src: Union[str, os.PathLike], out: Union[str, os.PathLike], *,
                       model: Optional[Union[str, os.PathLike]] = None, backend: str = "auto",
                       device: Optional[str] = None, exts=None, resume: bool = False, shard_spec: Optional[str] = None,
                       overlay_out: bool = False, crf: Optional[bool] = None, scales=None, flip: Optional[bool] = None,
                       max_pixels: int = DEFAULT_MAX_PIXELS, keep_ext: bool = False, listing=None,
                       progress: bool = True, fsync_log: bool = True, address: Optional[str] = None,
                       num_actors: int = 1, gpus_per_actor: float = 0.0, cpus_per_actor: float = 1.0,
                       batch_size: int = 4, num_cpus: Optional[int] = None, precision: Optional[str] = None) -> dict:
    """``weclip-segment --engine ray``: the local engine's ``segment_folder`` with the work on Ray.

    Same outputs (byte for byte), names, ``results.jsonl`` fields, summary, bad-file report and
    ``resume`` semantics (the folder loop is the local engine's own). ``address``: an existing
    cluster (``auto``, ``ray://host:10001``); without it a private single-node Ray is started on
    127.0.0.1 (``num_cpus`` CPUs) and stopped at the end.
    """
    from ..batch.listing import DEFAULT_EXTS
    from ..batch.runner import run_folder
    from ..batch.segmentation import mask_name, overlay_name

    _check_resources(num_actors, gpus_per_actor, cpus_per_actor, batch_size)
    model = _resolve_model(None if model is None else str(model))
    started = init_ray(address, num_cpus)
    t0 = time.perf_counter()
    # the folder loop shows its own progress bar and report: Ray Data's execution log would repeat it
    ray_data_log = logging.getLogger("ray.data")
    level = ray_data_log.level
    ray_data_log.setLevel(logging.WARNING)
    try:
        def source(todo):
            return _ray_source(todo, overlay_out=overlay_out, model=None if model is None else str(model),
                               backend=backend, device=device, num_actors=num_actors, gpus_per_actor=gpus_per_actor,
                               cpus_per_actor=cpus_per_actor, batch_size=batch_size, crf=crf, scales=scales, flip=flip,
                               max_pixels=max_pixels, precision=precision)

        def process(item: DecodedImage):
            return item.result  # type: ignore[attr-defined]  # a RayItem: computed on the cluster

        import ray.exceptions

        try:
            return run_folder(src, out, process, done_name=mask_name,
                              output_names=(lambda n: [mask_name(n), overlay_name(n)]) if overlay_out else
                              (lambda n: [mask_name(n)]),
                              exts=exts if exts is not None else DEFAULT_EXTS, keep_ext=keep_ext, listing=listing,
                              resume=resume, shard_spec=shard_spec, workers=0, max_pixels=max_pixels,
                              progress=progress, fsync_log=fsync_log, desc="segment (ray)", source=source)
        except ray.exceptions.RayError as e:  # e.g. the model cannot be loaded in the actors
            lines = [line.strip() for line in str(e).splitlines() if line.strip()]
            raise RuntimeError(f"the Ray pipeline failed: {lines[-1] if lines else type(e).__name__} "
                               "(finished outputs are kept; --resume continues)") from e
    finally:
        ray_data_log.setLevel(level)
        if started:
            import ray

            ray.shutdown()
        logger.debug("ray engine finished in %.1f s", time.perf_counter() - t0)

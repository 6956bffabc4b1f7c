"""Folder segmentation with a trained model: the per-image function of ``weclip-segment``.

Outputs per input name ``N``: ``N.png`` (palette mask, class index per pixel; the done marker),
optionally ``N_overlay.jpg``; the ``results.jsonl`` line holds ``size``, ``classes``, ``areas``
and ``timings`` (seconds per stage, decoding included).
"""
from __future__ import annotations

import contextlib
import functools
import os
from typing import Any, Iterator, Optional, Sequence, Union

import numpy as np

from ..crf import crf_labels
from ..imageio import DEFAULT_MAX_PIXELS, encode_label_png, encode_overlay_jpeg
from ..palette import voc_palette
from .listing import DEFAULT_EXTS, Listing
from .runner import Deferred, ImageResult, run_folder
from .workers import DecodedImage, worker_initializer

__all__ = ["segment_folder", "image_result", "mask_name", "overlay_name"]


def mask_name(name: str) -> str:
    return f"{name}.png"


def overlay_name(name: str) -> str:
    return f"{name}_overlay.jpg"


def image_result(item: DecodedImage, res: Any, overlay_out: bool = False) -> ImageResult:
    """The outputs of one segmented input (mask PNG, optional overlay JPEG) and its
    ``results.jsonl`` fields; shared with the Ray engine so both write the same bytes."""
    files = {}
    if overlay_out:
        assert item.image is not None, "only decoded inputs are segmented"
        files[overlay_name(item.name)] = encode_overlay_jpeg(item.image, res.labels, quality=90)
    files[mask_name(item.name)] = encode_label_png(res.labels.astype(np.uint8), voc_palette())
    t = dict(res.timings)
    t["decode"] = item.decode_s
    areas = res.areas()
    return ImageResult(files, {"size": list(res.labels.shape), "classes": sorted(areas), "areas": areas,
                               "timings": {k: round(v, 5) for k, v in t.items()}})


def _init_crf_worker(parent_pid: int) -> None:
    """The CRF worker dies with its parent and computes on one thread: it runs beside the model,
    which already uses the CPUs this process was given (more threads only contend)."""
    import torch

    worker_initializer(parent_pid)()
    torch.set_num_threads(1)


@contextlib.contextmanager
def _crf_pool(enabled: bool, backend: str = "auto") -> Iterator[Any]:
    """One spawn-context worker process for DenseCRF, tied to this process."""
    if not enabled:
        yield None
        return
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    from ..crf import _import_pydensecrf, resolve_crf_backend

    if resolve_crf_backend(backend) == "densecrf":
        _import_pydensecrf()  # fail now with the install hint, not inside a worker
    pool = ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn"),
                               initializer=functools.partial(_init_crf_worker, os.getpid()))
    try:
        yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def segment_folder(segmenter, src: Union[str, os.PathLike], out: Union[str, os.PathLike], *,
                   exts: Union[Sequence[str], str] = DEFAULT_EXTS, resume: bool = False,
                   shard_spec: Optional[str] = None,
                   workers: int = 2, overlay_out: bool = False, crf: Optional[bool] = None, scales=None,
                   flip: Optional[bool] = None, max_pixels: int = DEFAULT_MAX_PIXELS, keep_ext: bool = False,
                   listing: Optional[Listing] = None, progress: bool = True, fsync_log: bool = True) -> dict:
    """Segment every image under ``src`` into ``out`` with ``segmenter`` (a ``Segmenter``).

    With ``crf`` and ``workers > 0`` DenseCRF runs in a worker process while the model segments
    the next images (outputs are still written in input order). ``listing``: inputs already
    scanned with :func:`~weclip_infer.batch.listing.scan_inputs`. See
    :func:`~weclip_infer.batch.runner.run_folder` for the summary, resume and error semantics.
    """
    crf = bool(segmenter.crf if crf is None else crf)

    def result(item: DecodedImage, res) -> ImageResult:
        return image_result(item, res, overlay_out)

    backend = getattr(segmenter, "crf_backend", "auto")
    budget = getattr(segmenter, "crf_max_pixels", None)
    with _crf_pool(crf and workers > 0, backend) as pool:
        def process(item: DecodedImage):
            assert item.image is not None  # decoded inputs only reach process()
            h, w = item.image.shape[:2]
            if pool is None or (budget is not None and h * w > budget):
                # in-process: also every image above the CRF pixel budget, which the Segmenter
                # refines at a reduced size (full-resolution probabilities are never built)
                return result(item, segmenter.predict(item.image, crf=crf, scales=scales, flip=flip))
            res = segmenter.predict(item.image, crf=False, scales=scales, flip=flip, keep_probs=True)
            probs, res.probs = res.probs, None

            def finish(value) -> ImageResult:
                res.labels, res.timings["crf"] = value
                res.timings["total"] += res.timings["crf"]
                return result(item, res)

            return Deferred(pool.submit(crf_labels, item.image, probs, backend), finish)

        return run_folder(src, out, process, done_name=mask_name,
                          output_names=(lambda n: [mask_name(n), overlay_name(n)]) if overlay_out else mask_name_list,
                          exts=exts, keep_ext=keep_ext, listing=listing, resume=resume, shard_spec=shard_spec,
                          workers=workers,
                          max_pixels=max_pixels, progress=progress, fsync_log=fsync_log, desc="segment")


def mask_name_list(name: str) -> list[str]:
    return [mask_name(name)]

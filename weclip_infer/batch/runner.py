"""The folder loop shared by the batch CLIs: list → decode (worker processes) → per-image function
→ atomic outputs + ``results.jsonl``, with resume, bad-file accounting and early stop on write errors.

A batch tool supplies one function ``process(item: DecodedImage) -> ImageResult | Deferred``; the
runner does everything else the same way for every tool:

- inputs: :func:`~weclip_infer.batch.listing.scan_inputs` (ignored files reported, name
  collisions and an output folder inside the input folder refused up front), ``shard``;
- outputs: every file of an :class:`ImageResult` written atomically under ``out`` (temp file +
  rename), the *done marker* (``done_name(name)``, e.g. the mask) last, so ``resume`` skips
  exactly the inputs whose marker exists;
- the log: one record per input in input order (``image``, ``mask`` = the marker, ``ok``, then
  the result's own fields, or ``error``); on resume an input that fails again with the same
  reason is not logged twice, and an input whose marker exists but whose line is missing (a
  ``kill -9`` between the two) gets a line ``{"ok": true, "recovered": true}``; SIGINT/SIGTERM
  wait until an input's outputs and its line are both written;
- errors: an input that cannot be decoded or whose ``process`` raises is logged, counted and
  skipped; an output that cannot be written raises :class:`OutputWriteError` at once when the
  disk is full or the folder read-only (``fatal``), otherwise it is counted as a write failure.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence, Union

from ..imageio import DEFAULT_MAX_PIXELS, atomic_write_bytes
from .listing import DEFAULT_EXTS, Listing, check_output_location, scan_inputs, shard
from .results import OutputWriteError, ResultsLog, latest_by_image, read_results
from .workers import DecodedImage, iter_decoded

__all__ = ["ImageResult", "Deferred", "run_folder", "check_writable", "RESULTS_NAME"]

log = logging.getLogger(__name__)

RESULTS_NAME = "results.jsonl"


@dataclass
class ImageResult:
    """What a per-image function returns.

    ``files``: output path relative to the output folder → bytes (written atomically, in order,
    the done marker last); ``record``: fields added to the input's ``results.jsonl`` line after
    ``image``, ``mask`` and ``ok`` (JSON-serialisable).
    """

    files: dict[str, bytes]
    record: dict[str, Any] = field(default_factory=dict)


@dataclass
class Deferred:
    """A result still being computed elsewhere (e.g. DenseCRF in a worker process):
    ``finish(future.result())`` runs in the calling process, in input order, and gives the
    :class:`ImageResult`. Lets the model work on the next image meanwhile."""

    future: Future
    finish: Callable[[Any], ImageResult]


ProcessFn = Callable[[DecodedImage], Union[ImageResult, Deferred]]


@contextlib.contextmanager
def _signals_deferred():
    """Hold SIGINT/SIGTERM while an input's outputs and its log line are written, then deliver
    them: an interruption never leaves a finished mask without its results.jsonl line."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    sigs = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.signal(s, lambda signum, frame: caught.append(signum)) for s in sigs}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        for s in dict.fromkeys(caught):
            signal.raise_signal(s)


def check_writable(out: Union[str, os.PathLike]) -> None:
    """Create ``out`` and open its results log for appending, so that a read-only or full output
    location fails with :class:`OutputWriteError` before a model is loaded."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputWriteError(out, e) from e
    ResultsLog(out / RESULTS_NAME, fsync=False).open().close()


def _remove_stale_temp_files(out: Path, log_fd: int) -> None:
    """Remove the hidden temp files a killed run left in ``out`` (atomic writes never expose
    them) — unless another run is writing into ``out`` right now (shards sharing a folder), whose
    temp files are live. Every run holds a shared ``flock`` on its results log; the clean-up
    needs it exclusively for a moment."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): clean as before
        fcntl = None  # type: ignore[assignment]
    if fcntl is not None:
        try:
            fcntl.flock(log_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fcntl.flock(log_fd, fcntl.LOCK_SH)
            log.info("another run is writing into %s: its temporary files are left alone", out)
            return
    try:
        for stale in out.rglob(".*.tmp"):
            with contextlib.suppress(OSError):
                stale.unlink()
    finally:
        if fcntl is not None:
            fcntl.flock(log_fd, fcntl.LOCK_SH)


def _default_done_name(name: str) -> str:
    return f"{name}.png"


def run_folder(src: Union[str, os.PathLike], out: Union[str, os.PathLike], process: ProcessFn, *,
               done_name: Callable[[str], str] = _default_done_name,
               output_names: Optional[Callable[[str], Sequence[str]]] = None,
               exts: Union[Sequence[str], str] = DEFAULT_EXTS, keep_ext: bool = False,
               listing: Optional[Listing] = None,
               resume: bool = False, shard_spec: Optional[str] = None, workers: int = 2,
               max_pixels: int = DEFAULT_MAX_PIXELS, max_pending: int = 2, fsync_log: bool = True,
               progress: bool = True, desc: str = "images",
               source: Optional[Callable[[list[tuple[Path, str]]], Iterator[DecodedImage]]] = None) -> dict[str, Any]:
    """Run ``process`` over every input of ``src`` and write its outputs under ``out``.

    ``done_name(name)``: the output whose existence marks an input as finished (default
    ``<name>.png``); ``output_names(name)``: every output of an input (for the check that no
    output overwrites an input; default ``[done_name(name)]``). ``listing``: inputs already
    scanned (else ``scan_inputs(src, exts, keep_ext=keep_ext)``). ``max_pending``: results
    waiting behind an unfinished :class:`Deferred`. ``source(todo)``: where the decoded inputs come
    from, in ``todo`` order (default: :func:`iter_decoded` with ``workers`` processes); the Ray
    engine passes inputs already decoded and processed on a cluster.

    Returns a summary: ``total``, ``segmented`` (succeeded), ``failed``, ``write_failed``,
    ``skipped_existing``, ``ignored`` (``[(path, reason)]``), ``ignored_summary``, ``seconds``,
    ``images_per_s``, ``failures`` (``[(path, reason)]``). Raises
    :class:`~weclip_infer.batch.listing.InputError` for unusable inputs/output folder and
    :class:`OutputWriteError` (with ``.summary``) when the run had to stop because nothing more
    could be written. ``KeyboardInterrupt`` stops cleanly: finished outputs stay, workers stop.
    """
    from tqdm import tqdm

    src, out = Path(src), Path(out)
    listing = listing if listing is not None else scan_inputs(src, exts, keep_ext=keep_ext)
    items = shard(listing.items, shard_spec)
    check_output_location(src, out, items, output_names or (lambda n: [done_name(n)]))
    if listing.ignored:
        log.info("%s", listing.ignored_summary())
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputWriteError(out, e) from e
    todo = [(p, n) for p, n in items if not (resume and (out / done_name(n)).is_file())]
    previous = latest_by_image(read_results(out / RESULTS_NAME)) if resume else {}
    counts = {"ok": 0, "bad": 0, "write": 0}
    failures: list[tuple[str, str]] = []
    t_start = time.perf_counter()

    def summary() -> dict[str, Any]:
        elapsed = time.perf_counter() - t_start
        return {"total": len(items), "segmented": counts["ok"], "failed": counts["bad"] + counts["write"],
                "write_failed": counts["write"], "skipped_existing": len(items) - len(todo),
                "ignored": list(listing.ignored), "ignored_summary": listing.ignored_summary(),
                "seconds": round(elapsed, 3),
                "images_per_s": round(counts["ok"] / elapsed, 3) if elapsed > 0 and counts["ok"] else 0.0,
                "failures": failures}

    results = ResultsLog(out / RESULTS_NAME, fsync=fsync_log)
    try:
        results.open()
    except OutputWriteError as e:
        e.summary = summary()
        raise
    _remove_stale_temp_files(out, results.fileno())
    bar = tqdm(total=len(todo), disable=not progress, unit="img", desc=desc)
    pending: deque = deque()  # (item, ImageResult | Deferred | None, error or None)

    def write_record(item: DecodedImage, rec: dict[str, Any]) -> None:
        prev = previous.get(item.path)
        if not rec["ok"] and prev is not None and not prev.get("ok", True) and prev.get("error") == rec["error"]:
            return  # already logged by an earlier run, with the same reason
        results.append(rec)

    def fail(item: DecodedImage, reason: str, kind: str = "bad") -> dict[str, Any]:
        counts[kind] += 1
        failures.append((item.path, reason))
        tqdm.write(f"skipped {item.path}: {reason}", file=sys.stderr)
        return {"image": item.path, "mask": done_name(item.name), "ok": False, "error": reason}

    def flush_one() -> None:
        item, res, err = pending.popleft()
        if err is None:
            try:
                if isinstance(res, Deferred):
                    res = res.finish(res.future.result())
            except Exception as e:  # noqa: BLE001 - a failure of this input: report and continue
                err = str(e) or type(e).__name__
        with _signals_deferred():
            if err is not None:
                rec = fail(item, err)
            else:
                rec = write_outputs(item, res)
            write_record(item, rec)
        bar.update(1)

    def write_outputs(item: DecodedImage, res: ImageResult) -> dict[str, Any]:
        marker = done_name(item.name)
        names = [n for n in res.files if n != marker] + ([marker] if marker in res.files else [])
        for rel in names:  # the marker last: its presence means "done" (resume)
            try:
                atomic_write_bytes(out / rel, res.files[rel])
            except OSError as e:
                werr = OutputWriteError(out / rel, e)
                if werr.fatal:
                    werr.summary = summary()
                    raise werr from e
                return fail(item, str(werr), kind="write")
        counts["ok"] += 1
        return {"image": item.path, "mask": marker, "ok": True, **res.record}

    try:
        if resume:  # inputs finished by a run killed between writing their outputs and logging them
            todo_set = set(todo)
            for p, n in items:
                if (p, n) not in todo_set and str(p) not in previous:
                    results.append({"image": str(p), "mask": done_name(n), "ok": True, "recovered": True})
        stream = source(todo) if source is not None else iter_decoded(todo, workers, max_pixels)
        with contextlib.ExitStack() as stack:
            close = getattr(stream, "close", None)
            if close is not None:  # a generator: its workers stop as soon as the loop ends
                stack.callback(close)
            for item in stream:
                if item.error is not None:
                    pending.append((item, None, item.error))
                else:
                    try:
                        pending.append((item, process(item), None))
                    except OutputWriteError:
                        raise
                    except Exception as e:  # noqa: BLE001 - a failure of this input: report and continue
                        pending.append((item, None, str(e) or type(e).__name__))
                while pending and (len(pending) > max_pending or not isinstance(pending[0][1], Deferred)
                                   or pending[0][1].future.done()):
                    flush_one()
            while pending:
                flush_one()
        results.close()  # the final flush to disk can fail too
    except OutputWriteError as e:
        if e.summary is None:
            e.summary = summary()
        raise
    finally:
        for _, res, _ in pending:
            if isinstance(res, Deferred):
                res.future.cancel()
        with contextlib.suppress(OutputWriteError):  # only reached open when already failing
            results.close()
        bar.close()
    return summary()

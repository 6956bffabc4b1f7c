"""``results.jsonl``: one JSON line per processed input, safe against kills, full disks and resumes.

Writing: each record is one ``os.write`` of a complete line to a file opened with ``O_APPEND``
(whole lines, even with several processes appending to the same log, e.g. shards sharing an
output folder). A killed process loses nothing already written; against power loss the log is
fsynced at most ``fsync_interval_s`` after a line and on close (a per-line fsync would cost as
much as a small image's segmentation), and a line lost that way is restored as a ``recovered``
line by the next ``--resume`` because the mask it describes is on disk. If a crash or a full
disk left a partial last line, the next writer first ends it with a newline, so the fragment
never merges with a new record.

Reading: :func:`read_results` skips lines that are not complete JSON objects (a torn line) and
can keep only the latest record per input: a resumed run appends new records for inputs it
processed again, and the last one is the current state.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Iterable, Optional, Union

__all__ = ["ResultsLog", "read_results", "latest_by_image", "OutputWriteError", "FATAL_WRITE_ERRNOS"]

log = logging.getLogger(__name__)

#: errno values after which no further output can be expected to succeed: the run stops early.
FATAL_WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO})


class OutputWriteError(OSError):
    """An output (mask, overlay, log line) could not be written; ``fatal`` when the run must stop
    (disk full, read-only or unwritable folder)."""

    def __init__(self, path: Union[str, os.PathLike], cause: OSError):
        self.path = str(path)
        self.cause = cause
        self.fatal = cause.errno in FATAL_WRITE_ERRNOS
        self.summary: Optional[dict[str, Any]] = None  # the run's summary so far, set by the folder loop
        reason = cause.strerror or str(cause)
        super().__init__(cause.errno, f"could not write {self.path}: {reason}")

    def __str__(self) -> str:
        return self.strerror or ""


class ResultsLog:
    """Append-only JSON-lines log (``with ResultsLog(path) as log: log.append({...})``).

    Opening creates the file with the user's umask mode and raises :class:`OutputWriteError`
    when it cannot be written, so an unwritable output folder fails before any work is done.
    ``fsync_interval_s``: flush to disk when the last flush is older than this (0: after every
    line), and on close; ``fsync=False`` never flushes (tests, throw-away runs).
    """

    def __init__(self, path: Union[str, os.PathLike], fsync: bool = True, fsync_interval_s: float = 1.0):
        if fsync_interval_s < 0:
            raise ValueError(f"fsync_interval_s must be >= 0, got {fsync_interval_s}")
        self.path = Path(path)
        self.fsync = fsync
        self.fsync_interval_s = fsync_interval_s
        self._fd: int | None = None
        self._last_sync = float("-inf")
        self._dirty = False

    def open(self) -> "ResultsLog":
        try:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
            size = os.fstat(self._fd).st_size
            if size:
                with open(self.path, "rb") as f:
                    f.seek(size - 1)
                    torn = f.read(1) != b"\n"
                if torn:  # a previous run died mid-line: close that fragment off
                    log.warning("%s: the last line was incomplete (interrupted write); it is ignored", self.path)
                    self._write(b"\n")
        except OSError as e:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
            raise OutputWriteError(self.path, e) from e
        return self

    def _write(self, data: bytes) -> None:
        assert self._fd is not None, "ResultsLog is not open"
        n = os.write(self._fd, data)
        if n != len(data):  # only a full disk shortens a regular-file write
            raise OSError(errno.ENOSPC, f"short write ({n} of {len(data)} bytes)")
        self._dirty = True
        if self.fsync and time.monotonic() - self._last_sync >= self.fsync_interval_s:
            self._sync()

    def _sync(self) -> None:
        assert self._fd is not None
        os.fsync(self._fd)
        self._last_sync = time.monotonic()
        self._dirty = False

    def append(self, record: dict[str, Any]) -> None:
        """Append ``record`` as one line; :class:`OutputWriteError` if it cannot be written."""
        line = (json.dumps(record) + "\n").encode("utf-8")
        try:
            self._write(line)
        except OSError as e:
            raise OutputWriteError(self.path, e) from e

    def fileno(self) -> int:
        """The open file descriptor (e.g. to ``flock`` the log)."""
        if self._fd is None:
            raise ValueError("ResultsLog is not open")
        return self._fd

    def close(self) -> None:
        """Flush pending lines to disk and close; :class:`OutputWriteError` if the flush fails."""
        if self._fd is None:
            return
        fd = self._fd
        try:
            if self.fsync and self._dirty:
                self._sync()
        except OSError as e:
            raise OutputWriteError(self.path, e) from e
        finally:
            self._fd = None
            os.close(fd)

    def __enter__(self) -> "ResultsLog":
        return self.open() if self._fd is None else self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            self.close()
        else:  # already failing: do not mask that error with one from the final flush
            try:
                self.close()
            except OutputWriteError:
                pass


def read_results(path: Union[str, os.PathLike], *, latest: bool = False) -> list[dict[str, Any]]:
    """The records of a results log, in file order; lines that are not a complete JSON object
    (a torn write) are skipped with a warning. ``latest=True``: only the last record per
    ``image``, in the order of first appearance. A missing file gives ``[]``."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    records, bad = [], 0
    for raw in data.split(b"\n"):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError):
            bad += 1
            continue
        if isinstance(rec, dict):
            records.append(rec)
        else:
            bad += 1
    if bad:
        log.warning("%s: skipped %d incomplete or invalid line(s)", path, bad)
    return list(latest_by_image(records).values()) if latest else records


def latest_by_image(records: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """``{image: last record}`` (insertion order: first appearance)."""
    out: dict[str, dict[str, Any]] = {}
    for rec in records:
        key = rec.get("image")
        if isinstance(key, str):
            out[key] = rec
    return out

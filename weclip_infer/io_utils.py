"""Atomic, durable file and folder writes: the one place that publishes files.

Every output (checkpoints, masks, bundles, logs, JSON) goes through a temporary file in the
destination folder, is flushed to disk (``fsync``), gets the mode a plain ``open()`` would have
given it under the current umask (``mkstemp`` creates files 0600), is moved into place with
``os.replace`` and the folder is fsynced, so that a crash or power loss leaves either the old
file or the complete new one, never a torn one. Folders are published the same way with
:func:`atomic_dir`.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Union

__all__ = ["atomic_path", "atomic_write_bytes", "write_json_atomic", "atomic_dir", "default_file_mode",
           "default_dir_mode", "fsync_dir"]

PathLike = Union[str, os.PathLike]


def _umask() -> int:
    """The process umask: read from ``/proc`` where possible (no change of process state), else
    by setting and immediately restoring it."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_file_mode() -> int:
    """The mode ``open(path, "w")`` would give a new file: ``0o666 & ~umask``."""
    return 0o666 & ~_umask()


def default_dir_mode() -> int:
    """The mode ``os.mkdir`` would give a new folder: ``0o777 & ~umask``."""
    return 0o777 & ~_umask()


def fsync_dir(path: PathLike) -> None:
    """Flush a folder's entries (a rename into it) to disk; a no-op where folders cannot be opened."""
    try:
        fd = os.open(str(path), os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems do not support fsync on folders
    finally:
        os.close(fd)


def _fsync_file(path: PathLike) -> None:
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _publish(tmp: Path, path: Path) -> None:
    """fsync ``tmp``, give it the umask's mode, move it onto ``path`` and fsync the folder."""
    _fsync_file(tmp)
    os.chmod(tmp, default_file_mode())
    os.replace(tmp, path)
    fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` for the caller to write; on success it is made
    durable and replaces ``path`` atomically, on error it is removed and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        _publish(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically and durably (see the module docstring)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def write_json_atomic(path: PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON (with a final newline) to ``path`` atomically."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode("utf-8"))


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            p = Path(dirpath) / f
            if not p.is_symlink():
                _fsync_file(p)
        fsync_dir(dirpath)


@contextlib.contextmanager
def atomic_dir(path: PathLike, replace: bool = True) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``path`` for the caller to fill; on success every
    file in it is fsynced, the folder gets the umask's mode (``mkdtemp`` creates 0700) and is
    renamed to ``path`` (an existing ``path`` is replaced when ``replace`` is true, else
    ``FileExistsError``), then the parent folder is fsynced. On error the temporary folder is
    removed and ``path`` is untouched. Leftover temporaries of interrupted runs are named
    ``.<name>.*.tmp``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        _fsync_tree(tmp)
        os.chmod(tmp, default_dir_mode())
        if path.exists():
            if not replace:
                raise FileExistsError(f"{path} exists")
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / path.name)
            try:
                os.replace(tmp, path)
            except BaseException:
                os.replace(old / path.name, path)  # put the previous version back
                raise
            finally:
                shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)

"""Atomic, durable writes: published files get the umask's mode; failures leave nothing behind."""
from __future__ import annotations

import os
import stat

import pytest

from weclip_infer.imageio import save_png_atomic
from weclip_infer.io_utils import atomic_dir, atomic_path, atomic_write_bytes, write_json_atomic


@pytest.fixture(params=[0o022, 0o077, 0o002])
def umask(request):
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def _mode(p) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


def test_files_get_the_umask_mode(tmp_path, umask):
    import numpy as np

    atomic_write_bytes(tmp_path / "a.bin", b"abc")
    write_json_atomic(tmp_path / "b.json", {"x": 1})
    with atomic_path(tmp_path / "c.txt") as tmp:
        tmp.write_text("hello")
    save_png_atomic(tmp_path / "d.png", np.zeros((4, 5), np.uint8))
    for name in ("a.bin", "b.json", "c.txt", "d.png"):
        assert _mode(tmp_path / name) == 0o666 & ~umask, name
    assert (tmp_path / "a.bin").read_bytes() == b"abc"
    assert (tmp_path / "c.txt").read_text() == "hello"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "b.json", "c.txt", "d.png"]


def test_failed_write_leaves_old_file_and_no_temp(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("boom")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_atomic_write_bytes_overwrites(tmp_path):
    atomic_write_bytes(tmp_path / "sub" / "f", b"1")
    atomic_write_bytes(tmp_path / "sub" / "f", b"22")
    assert (tmp_path / "sub" / "f").read_bytes() == b"22"
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["f"]


def test_atomic_dir_publishes_and_replaces(tmp_path, umask):
    dest = tmp_path / "ck"
    with atomic_dir(dest) as tmp:
        (tmp / "w.bin").write_bytes(b"v1")
    assert (dest / "w.bin").read_bytes() == b"v1"
    assert _mode(dest) == 0o777 & ~umask
    with atomic_dir(dest) as tmp:
        (tmp / "w.bin").write_bytes(b"v2")
    assert (dest / "w.bin").read_bytes() == b"v2"
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]
    with pytest.raises(FileExistsError):
        with atomic_dir(dest, replace=False) as tmp:
            (tmp / "w.bin").write_bytes(b"v3")
    assert (dest / "w.bin").read_bytes() == b"v2"
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]


def test_atomic_dir_failure_keeps_old_and_cleans_temp(tmp_path):
    dest = tmp_path / "ck"
    dest.mkdir()
    (dest / "w.bin").write_bytes(b"old")
    with pytest.raises(ValueError):
        with atomic_dir(dest) as tmp:
            (tmp / "w.bin").write_bytes(b"new")
            raise ValueError("interrupted")
    assert (dest / "w.bin").read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]

"""Real signals against a running ``weclip-segment``: after ``kill -9`` of the main process no
decode or CRF worker survives; SIGTERM and SIGINT stop cleanly (no traceback, documented exit
code, no temp files, every finished mask logged) and ``--resume`` completes the folder."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from weclip_infer import save_checkpoint
from weclip_infer.batch import read_results
from weclip_infer.batch.cli import EXIT_INTERRUPTED, EXIT_TERMINATED
from weclip_infer.crf import crf_available

N_IMAGES = 40

pytestmark = pytest.mark.slow  # real processes and signals, ~25 s in all


@pytest.fixture(scope="module")
def ckpt(shared_tiny_model, tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    save_checkpoint(shared_tiny_model, d, include_backbone=True)
    return d


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    src = tmp_path_factory.mktemp("in")
    rng = np.random.default_rng(0)
    for i in range(N_IMAGES):
        Image.fromarray(rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)).save(src / f"{i:03d}.jpg", quality=90)
    return src


def _group_members(pgid: int) -> list[tuple[int, str]]:
    """Live (non-zombie) processes of process group ``pgid``, from /proc."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # state ppid pgrp ...
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append((int(entry), stat[stat.index("(") + 1:stat.rindex(")")]))
    return members


def _start(src: Path, out: Path, ckpt: Path, *extra: str, log: Path) -> subprocess.Popen:
    """The CLI in its own process group; output to a file, not a pipe (a surviving worker would
    hold a pipe open and hang the test instead of failing it)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(log, "w") as f:
        return subprocess.Popen([sys.executable, "-m", "weclip_infer.segment", str(src), "--out", str(out), "--model",
                                 str(ckpt), "--workers", "2", "--threads", "1", "--quiet", *extra],
                                env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)


def _kill(proc: subprocess.Popen, sig: int) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
    proc.wait(timeout=60)


def _wait_for_masks(proc: subprocess.Popen, out: Path, n: int) -> None:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None and len(list(out.glob("*.png"))) < n:
        time.sleep(0.05)
    log = (out.parent / "log.txt")
    assert proc.poll() is None, f"the run ended before it could be signalled:\n{log.read_text()[-3000:]}"


def _wait_group_gone(pgid: int, seconds: float = 30) -> list:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        left = _group_members(pgid)
        if not left:
            return []
        time.sleep(0.1)
    left = _group_members(pgid)
    if left:
        os.killpg(pgid, signal.SIGKILL)  # clean up before failing
    return left


@pytest.mark.parametrize("crf", [False, True], ids=["decode-workers", "decode+crf-workers"])
def test_kill_9_leaves_no_worker_behind(ckpt, folder, tmp_path, crf):
    if crf and not crf_available():
        pytest.skip("DenseCRF not installed")
    out = tmp_path / "out"
    src = folder
    if crf:  # smaller images: DenseCRF on noise is slow
        src = tmp_path / "small"
        src.mkdir()
        for p in sorted(folder.glob("*.jpg")):
            Image.open(p).resize((64, 48)).save(src / p.name)
    proc = _start(src, out, ckpt, *(["--crf"] if crf else []), log=tmp_path / "log.txt")
    try:
        _wait_for_masks(proc, out, 3)
        workers = [m for m in _group_members(proc.pid) if m[0] != proc.pid]
        assert len(workers) >= (3 if crf else 2), workers  # the decode (and CRF) workers are running
    finally:
        _kill(proc, signal.SIGKILL)  # the main process only: the workers are not signalled
    assert _wait_group_gone(proc.pid) == []
    assert not [p for p in out.glob("*.png") if p.stat().st_size == 0]


@pytest.mark.parametrize("sig,code,word", [(signal.SIGTERM, EXIT_TERMINATED, "terminated"),
                                           (signal.SIGINT, EXIT_INTERRUPTED, "interrupted")])
def test_sigterm_and_sigint_stop_cleanly_then_resume_finishes(ckpt, folder, tmp_path, sig, code, word):
    out = tmp_path / "out"
    log = tmp_path / "log.txt"
    proc = _start(folder, out, ckpt, log=log)
    try:
        _wait_for_masks(proc, out, 3)
    finally:
        _kill(proc, sig)
    err = log.read_text()
    assert proc.returncode == code, err
    assert "Traceback" not in err and f"weclip-segment: {word}" in err and "--resume" in err
    assert _wait_group_gone(proc.pid) == []
    assert not list(out.rglob("*.tmp"))
    masks = {p.name for p in out.glob("*.png")}
    assert 3 <= len(masks) < N_IMAGES
    logged = {Path(r["mask"]).name for r in read_results(out / "results.jsonl")}
    assert logged == masks  # every finished mask has its line, nothing else is logged
    proc = _start(folder, out, ckpt, "--resume", log=log)
    assert proc.wait(timeout=300) == 0, log.read_text()
    recs = read_results(out / "results.jsonl")
    assert len(recs) == N_IMAGES and all(r["ok"] for r in recs)  # one line per image, none twice
    assert len(list(out.glob("*.png"))) == N_IMAGES

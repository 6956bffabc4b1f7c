"""results.jsonl: whole-line appends (also from several processes), torn lines skipped by the
reader and closed off by the next writer, no duplicate failure records on resume, and the
folder loop's write-error handling (disk full stops the run, other write errors are counted)."""
from __future__ import annotations

import errno
import json
import multiprocessing as mp
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from weclip_infer.batch import ImageResult, OutputWriteError, ResultsLog, read_results, run_folder
from weclip_infer.batch import results as results_mod
from weclip_infer.batch import runner as runner_mod
from weclip_infer.batch.results import latest_by_image


def _writer(path: str, tag: str, n: int) -> None:
    with ResultsLog(path, fsync=False) as log:
        for i in range(n):
            log.append({"image": f"{tag}{i}", "pad": "x" * (i % 700)})


def test_concurrent_appends_keep_whole_lines(tmp_path):
    path = tmp_path / "results.jsonl"
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(str(path), tag, 400)) for tag in "ab"]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    lines = path.read_bytes().split(b"\n")
    assert lines[-1] == b"" and len(lines) == 801
    recs = [json.loads(x) for x in lines[:-1]]  # every line parses: none interleaved
    assert sorted(r["image"] for r in recs) == sorted(f"{t}{i}" for t in "ab" for i in range(400))


def test_torn_last_line_is_skipped_and_closed_off(tmp_path, caplog):
    path = tmp_path / "results.jsonl"
    with ResultsLog(path) as log:
        log.append({"image": "a", "ok": True})
        log.append({"image": "b", "ok": False, "error": "bad"})
    with open(path, "ab") as f:
        f.write(b'{"image": "c", "ok": tr')  # a crash (or a full disk) in the middle of a line
    assert [r["image"] for r in read_results(path)] == ["a", "b"]
    assert "skipped 1 incomplete" in caplog.text
    with ResultsLog(path) as log:  # the next run appends: the fragment must not swallow the record
        log.append({"image": "c", "ok": True})
    assert [r["image"] for r in read_results(path)] == ["a", "b", "c"]
    assert path.read_bytes().count(b"\n") == 4
    assert read_results(tmp_path / "missing.jsonl") == []


def test_latest_record_per_image():
    recs = [{"image": "a", "ok": False}, {"image": "b", "ok": True}, {"image": "a", "ok": True}, {"no": "image"}]
    assert latest_by_image(recs) == {"a": {"image": "a", "ok": True}, "b": {"image": "b", "ok": True}}


def test_log_that_cannot_be_opened_is_a_write_error(tmp_path):
    (tmp_path / "results.jsonl").mkdir()  # opening it for writing fails
    with pytest.raises(OutputWriteError, match="could not write"):
        ResultsLog(tmp_path / "results.jsonl").open()


def _folder(src: Path, good: int, bad: int) -> None:
    src.mkdir(parents=True)
    for i in range(good):
        Image.fromarray(np.full((6, 7, 3), i * 20, np.uint8)).save(src / f"g{i}.png")
    for i in range(bad):
        (src / f"z{i}.png").write_bytes(b"not an image")


def _process(item):
    return ImageResult({f"{item.name}.png": b"mask:" + item.image.tobytes()[:8], f"{item.name}.txt": b"side"},
                       {"mean": float(item.image.mean())})


def test_resume_does_not_log_the_same_failure_twice(tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    _folder(src, 3, 2)
    s = run_folder(src, out, _process, workers=0, progress=False)
    assert (s["segmented"], s["failed"]) == (3, 2)
    first = (out / "results.jsonl").read_bytes()
    assert len(first.splitlines()) == 5
    s = run_folder(src, out, _process, workers=0, resume=True, progress=False)
    assert (s["segmented"], s["failed"], s["skipped_existing"]) == (0, 2, 3)  # still failing, still counted
    assert (out / "results.jsonl").read_bytes() == first  # ... but not logged again
    # a torn line from a crash, one mask lost, one bad file repaired: only what changed is appended
    with open(out / "results.jsonl", "ab") as f:
        f.write(b'{"image": "x", "o')
    (out / "g1.png").unlink()
    Image.fromarray(np.zeros((5, 5, 3), np.uint8)).save(src / "z0.png")
    s = run_folder(src, out, _process, workers=0, resume=True, progress=False)
    assert (s["segmented"], s["failed"], s["skipped_existing"]) == (2, 1, 2)
    recs = read_results(out / "results.jsonl")
    assert len(recs) == 7
    latest = {Path(k).name: v for k, v in latest_by_image(recs).items()}
    assert [latest[f"g{i}.png"]["ok"] for i in range(3)] == [True] * 3
    assert latest["z0.png"]["ok"] and not latest["z1.png"]["ok"]
    assert latest["g0.png"]["mask"] == "g0.png" and "mean" in latest["g0.png"]


def test_files_are_written_in_order_with_the_marker_last(tmp_path, monkeypatch):
    src, out = tmp_path / "in", tmp_path / "out"
    _folder(src, 2, 0)
    written = []
    real = runner_mod.atomic_write_bytes
    monkeypatch.setattr(runner_mod, "atomic_write_bytes", lambda p, d: (written.append(Path(p).name), real(p, d)))

    def process(item):  # marker first in the dict: still written last
        return ImageResult({f"{item.name}.png": b"m", f"{item.name}.a": b"a", f"{item.name}.b": b"b"})

    run_folder(src, out, process, workers=0, progress=False)
    assert written == ["g0.a", "g0.b", "g0.png", "g1.a", "g1.b", "g1.png"]


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EACCES])
def test_fatal_write_error_stops_the_run(tmp_path, monkeypatch, code):
    src, out = tmp_path / "in", tmp_path / "out"
    _folder(src, 6, 0)
    real, calls = runner_mod.atomic_write_bytes, []

    def flaky(path, data):
        calls.append(path)
        if len(calls) > 4:  # two images (two files each) fit, then the disk is full
            raise OSError(code, os.strerror(code))
        real(path, data)

    monkeypatch.setattr(runner_mod, "atomic_write_bytes", flaky)
    with pytest.raises(OutputWriteError) as e:
        run_folder(src, out, _process, workers=0, progress=False)
    assert e.value.fatal and os.strerror(code) in str(e.value) and "g2.txt" in str(e.value)
    assert len(calls) == 5  # stopped at the first failure, no further attempts
    assert e.value.summary["segmented"] == 2
    assert [r["ok"] for r in read_results(out / "results.jsonl")] == [True, True]
    assert not (out / "g2.png").exists()


def test_non_fatal_write_error_is_counted_and_the_run_continues(tmp_path, monkeypatch):
    src, out = tmp_path / "in", tmp_path / "out"
    _folder(src, 3, 1)
    real = runner_mod.atomic_write_bytes

    def flaky(path, data):
        if Path(path).name == "g1.txt":
            raise OSError(errno.ENAMETOOLONG, os.strerror(errno.ENAMETOOLONG))
        real(path, data)

    monkeypatch.setattr(runner_mod, "atomic_write_bytes", flaky)
    s = run_folder(src, out, _process, workers=0, progress=False)
    assert (s["segmented"], s["failed"], s["write_failed"]) == (2, 2, 1)
    rec = {Path(r["image"]).name: r for r in read_results(out / "results.jsonl")}
    assert "could not write" in rec["g1.png"]["error"] and not (out / "g1.png").exists()


def test_log_append_failure_is_fatal(tmp_path, monkeypatch):
    src, out = tmp_path / "in", tmp_path / "out"
    _folder(src, 3, 0)
    real, n = ResultsLog._write, []

    def write(self, data):
        n.append(1)
        if len(n) > 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(self, data)

    monkeypatch.setattr(ResultsLog, "_write", write)
    with pytest.raises(OutputWriteError) as e:
        run_folder(src, out, _process, workers=0, progress=False)
    assert e.value.fatal and "results.jsonl" in str(e.value)


def test_resume_logs_an_input_whose_line_was_lost(tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    _folder(src, 3, 0)
    run_folder(src, out, _process, workers=0, progress=False)
    lines = (out / "results.jsonl").read_text().splitlines()
    (out / "results.jsonl").write_text(lines[0] + "\n" + lines[2] + "\n")  # g1's mask exists, its line does not
    s = run_folder(src, out, _process, workers=0, resume=True, progress=False)
    assert s["skipped_existing"] == 3
    recs = read_results(out / "results.jsonl")
    assert len(recs) == 3
    assert recs[-1] == {"image": str(src / "g1.png"), "mask": "g1.png", "ok": True, "recovered": True}
    run_folder(src, out, _process, workers=0, resume=True, progress=False)
    assert len(read_results(out / "results.jsonl")) == 3  # once only


def test_interrupt_waits_for_the_log_line(tmp_path, monkeypatch):
    """SIGINT arriving while an input's outputs are written is delivered after its log line."""
    import signal as _signal

    src, out = tmp_path / "in", tmp_path / "out"
    _folder(src, 3, 0)
    real = runner_mod.atomic_write_bytes

    def write(path, data):
        real(path, data)
        if Path(path).name == "g1.png":  # the marker of the second input is on disk ...
            _signal.raise_signal(_signal.SIGINT)  # ... and Ctrl-C arrives before its log line

    monkeypatch.setattr(runner_mod, "atomic_write_bytes", write)
    with pytest.raises(KeyboardInterrupt):
        run_folder(src, out, _process, workers=0, progress=False)
    recs = read_results(out / "results.jsonl")
    assert [Path(r["image"]).name for r in recs] == ["g0.png", "g1.png"] and all(r["ok"] for r in recs)
    assert not (out / "g2.png").exists()


def test_fsync_policy(tmp_path, monkeypatch):
    synced = []
    monkeypatch.setattr(results_mod.os, "fsync", lambda fd: synced.append(fd))
    with ResultsLog(tmp_path / "a.jsonl", fsync_interval_s=0) as log:
        for i in range(5):
            log.append({"image": str(i)})
        assert len(synced) == 5  # every line
    assert len(synced) == 5  # nothing left to flush on close
    synced.clear()
    log = ResultsLog(tmp_path / "b.jsonl", fsync_interval_s=3600).open()
    for i in range(50):
        log.append({"image": str(i)})
    assert len(synced) == 1  # the first line, then not again within the interval ...
    log.close()
    assert len(synced) == 2  # ... and on close
    synced.clear()
    with ResultsLog(tmp_path / "c.jsonl", fsync=False) as log:
        log.append({"image": "x"})
    assert synced == []
    with pytest.raises(ValueError):
        ResultsLog(tmp_path / "d.jsonl", fsync_interval_s=-1)


def test_stale_temp_files_removed_unless_another_run_writes_there(tmp_path):
    import fcntl

    src, out = tmp_path / "in", tmp_path / "out"
    _folder(src, 1, 0)
    out.mkdir()
    stale = out / ".g0.png.abc123.tmp"
    stale.write_bytes(b"half")
    with open(out / "results.jsonl", "ab") as other:  # another run (a shard) holds the folder
        fcntl.flock(other.fileno(), fcntl.LOCK_SH)
        run_folder(src, out, _process, workers=0, progress=False)
        assert stale.exists()  # may be that run's file in flight: left alone
    run_folder(src, out, _process, workers=0, progress=False)
    assert not stale.exists()  # nobody else here: a killed run's leftover, removed

"""``weclip-segment`` as a user meets it: help texts and their examples, exit codes (bad inputs 1,
usage 2, unwritable output 3) with one-line errors, name collisions and ``--out`` inside the
input refused before anything is written, ignored files reported, animated GIFs taken, output
file modes following the umask, and compute threads sized from the CPUs available."""
from __future__ import annotations

import errno
import json
import os
import shlex
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from weclip_infer import save_checkpoint
from weclip_infer.batch import read_results
from weclip_infer.batch import results as results_mod
from weclip_infer.batch import runner as runner_mod
from weclip_infer.batch.cli import EPILOG, build_parser
from weclip_infer.segment import main
from weclip_infer.threads import CpuBudget, available_cpus, cgroup_cpu_limit, plan_threads


@pytest.fixture(scope="module")
def ckpt(shared_tiny_model, tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    save_checkpoint(shared_tiny_model, d, include_backbone=True)
    return d


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _img(path: Path, size=(40, 56), seed=0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)


def _run(ckpt, *args) -> int:
    return main([*map(str, args), "--model", str(ckpt), "--workers", "0", "--quiet"])


def _error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if "error:" in line]


def test_every_option_has_help_and_the_examples_run(tmp_path, monkeypatch, capsys):
    ap = build_parser()
    for action in ap._actions:
        assert action.help and len(action.help) > 10, action.dest
        assert "spec" not in action.help.lower()
    text = ap.format_help()
    assert "--out OUT" in text and "exit codes" in text and "examples" in text
    monkeypatch.chdir(tmp_path)
    for i in range(2):
        _img(tmp_path / "photos" / f"p{i}.jpg", seed=i)
    Path("list.txt").write_text("photos/p0.jpg\nphotos/p1.jpg\n")
    examples = [line.strip() for line in EPILOG.splitlines() if line.strip().startswith("weclip-segment ")]
    assert len(examples) >= 3
    for line in examples:
        argv = shlex.split(line)[1:]
        assert main([*argv, "--quiet"]) == 0, line  # the embedded demo model: no --model needed
    assert sorted(p.relative_to("masks").as_posix() for p in Path("masks").rglob("*.png")) == [
        "p0.jpg.png", "p0.png", "p1.jpg.png", "p1.png", "photos/p0.png"]


def test_precision_option_reaches_the_network(ckpt, tmp_path):
    src = tmp_path / "in"
    _img(src / "a.png", seed=3)
    assert _run(ckpt, src, "--out", tmp_path / "fp32") == 0
    assert _run(ckpt, src, "--out", tmp_path / "bf16", "--precision", "bf16") == 0
    a = np.array(Image.open(tmp_path / "fp32" / "a.png"))
    b = np.array(Image.open(tmp_path / "bf16" / "a.png"))
    assert a.shape == b.shape and (a == b).mean() > 0.9
    with pytest.raises(SystemExit):
        _run(ckpt, src, "--out", tmp_path / "x", "--precision", "fp16")


def test_backend_option_is_honoured(ckpt, tmp_path, monkeypatch):
    """``--backend eager`` runs PyTorch even where the automatic choice would be ONNX Runtime."""
    from weclip_infer.predictor import Segmenter

    made = []
    real = Segmenter.from_pretrained.__func__  # type: ignore[attr-defined]

    def recording(cls, *a, **k):
        seg = real(cls, *a, **k)
        made.append((k.get("backend"), seg.model is not None))
        return seg

    monkeypatch.setattr(Segmenter, "from_pretrained", classmethod(recording))
    monkeypatch.setenv("WECLIP_BACKEND", "onnx")  # what auto would pick on an AVX-512 CPU
    src = tmp_path / "in"
    _img(src / "a.png", seed=4)
    assert _run(ckpt, src, "--out", tmp_path / "out", "--backend", "eager") == 0
    assert made == [("eager", True)]


def test_same_name_inputs_are_refused_before_writing(ckpt, tmp_path, capsys):
    src, out = tmp_path / "in", tmp_path / "out"
    _img(src / "a.jpg", seed=1)
    _img(src / "a.png", seed=2)
    assert _run(ckpt, src, "--out", out) == 2
    err = capsys.readouterr().err
    assert len(_error_lines(err)) == 1 and "a.jpg" in err and "--keep-ext" in err and "Traceback" not in err
    assert not out.exists()
    assert _run(ckpt, src, "--out", out, "--keep-ext") == 0
    assert sorted(p.name for p in out.glob("*.png")) == ["a.jpg.png", "a.png.png"]
    recs = {Path(r["image"]).name: r["mask"] for r in read_results(out / "results.jsonl")}
    assert recs == {"a.jpg": "a.jpg.png", "a.png": "a.png.png"}


@pytest.mark.parametrize("where", ["same", "inside"])
def test_out_in_the_input_folder_is_refused(ckpt, tmp_path, capsys, where):
    src = tmp_path / "in"
    _img(src / "a.png")
    before = (src / "a.png").read_bytes()
    out = src if where == "same" else src / "masks"
    assert _run(ckpt, src, "--out", out) == 2
    err = capsys.readouterr().err
    assert len(_error_lines(err)) == 1 and "input folder" in err
    assert (src / "a.png").read_bytes() == before and sorted(p.name for p in src.rglob("*")) == ["a.png"]


def test_ignored_files_are_reported_and_animated_gif_is_taken(ckpt, tmp_path, capsys):
    src, out = tmp_path / "in", tmp_path / "out"
    _img(src / "a.jpg")
    frames = [Image.fromarray(np.full((30, 44, 3), c, np.uint8)) for c in (20, 200, 90)]
    frames[0].save(src / "anim.gif", save_all=True, append_images=frames[1:], duration=40, loop=0)
    (src / "notes.txt").write_text("not an image")
    (src / "x.svg").write_text("<svg/>")
    assert _run(ckpt, src, "--out", out) == 0
    err = capsys.readouterr().err
    assert "2 file(s) ignored: 2 extension not taken (.svg, .txt)" in err
    assert Image.open(out / "anim.png").size == (44, 30)
    assert {Path(r["image"]).name for r in read_results(out / "results.jsonl")} == {"a.jpg", "anim.gif"}


def test_disk_full_stops_with_exit_3_and_one_line(ckpt, tmp_path, monkeypatch, capsys):
    src, out = tmp_path / "in", tmp_path / "out"
    for i in range(5):
        _img(src / f"i{i}.jpg", seed=i)
    real, calls = runner_mod.atomic_write_bytes, []

    def full(path, data):
        calls.append(path)
        if len(calls) > 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(path, data)

    monkeypatch.setattr(runner_mod, "atomic_write_bytes", full)
    assert _run(ckpt, src, "--out", out) == 3
    captured = capsys.readouterr()
    assert len(_error_lines(captured.err)) == 1 and "No space left on device" in captured.err
    assert "Traceback" not in captured.err and "--resume" in captured.err
    assert "segmented 2," in captured.out
    assert len(calls) == 3  # stopped at the first failure
    monkeypatch.setattr(runner_mod, "atomic_write_bytes", real)  # space again: resume finishes
    assert _run(ckpt, src, "--out", out, "--resume") == 0
    assert len(read_results(out / "results.jsonl")) == 5


def test_read_only_output_is_exit_3_before_any_work(ckpt, tmp_path, monkeypatch, capsys):
    src, out = tmp_path / "in", tmp_path / "out"
    _img(src / "a.jpg")
    real_open = os.open

    def ro_open(path, flags, *a, **k):
        if str(path).endswith("results.jsonl") and flags & os.O_WRONLY:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *a, **k)

    monkeypatch.setattr(results_mod.os, "open", ro_open)
    assert _run(ckpt, src, "--out", out) == 3
    err = capsys.readouterr().err
    assert len(_error_lines(err)) == 1 and "Read-only file system" in err and "Traceback" not in err
    assert not list(out.glob("*.png"))


def test_output_under_a_file_is_exit_3(ckpt, tmp_path, capsys):
    src = tmp_path / "in"
    _img(src / "a.jpg")
    (tmp_path / "file").write_text("x")
    assert _run(ckpt, src, "--out", tmp_path / "file" / "out") == 3
    err = capsys.readouterr().err
    assert len(_error_lines(err)) == 1 and "could not write" in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_really_read_only_output_folder(ckpt, tmp_path, capsys):
    src, out = tmp_path / "in", tmp_path / "out"
    _img(src / "a.jpg")
    out.mkdir()
    out.chmod(0o555)
    try:
        assert _run(ckpt, src, "--out", out) == 3
    finally:
        out.chmod(0o755)
    assert "Permission denied" in capsys.readouterr().err


def test_debug_shows_the_traceback(ckpt, tmp_path, capsys):
    assert main([str(tmp_path / "missing"), "--out", str(tmp_path / "o"), "--quiet", "--debug"]) == 2
    err = capsys.readouterr().err
    assert "input not found" in err and "Traceback" in err


@pytest.mark.parametrize("umask,file_mode,dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
def test_outputs_get_the_umask_mode(ckpt, tmp_path, umask, file_mode, dir_mode):
    src, out = tmp_path / "in", tmp_path / "out"
    _img(src / "sub" / "a.jpg")
    old = os.umask(umask)
    try:
        assert _run(ckpt, src, "--out", out, "--overlay") == 0
    finally:
        os.umask(old)
    for rel in ("sub/a.png", "sub/a_overlay.jpg", "results.jsonl"):
        assert stat.S_IMODE((out / rel).stat().st_mode) == file_mode, rel
    for rel in (".", "sub"):
        assert stat.S_IMODE((out / rel).stat().st_mode) == dir_mode, rel


def test_threads_follow_the_option_and_the_shards(ckpt, tmp_path, caplog, monkeypatch):
    import logging

    src = tmp_path / "in"
    _img(src / "a.jpg")
    caplog.set_level(logging.INFO)
    common = ["--model", str(ckpt), "--workers", "0"]
    assert main([str(src), "--out", str(tmp_path / "o1"), *common, "--threads", "3"]) == 0
    assert torch.get_num_threads() == 3 and "compute threads: 3 thread(s) as requested" in caplog.text
    monkeypatch.setattr("weclip_infer.threads.available_cpus", lambda: CpuBudget(4, 8, 4.0))
    assert main([str(src), "--out", str(tmp_path / "o2"), *common, "--shard", "0/2"]) == 0
    assert torch.get_num_threads() == 2
    assert "4 CPU(s) available (8 in the affinity mask, CPU quota 4) shared by 2 processes" in caplog.text
    with pytest.raises(SystemExit) as e:
        main([str(src), "--out", str(tmp_path / "o3"), "--threads", "0"])
    assert e.value.code == 2


def test_plan_threads():
    b = CpuBudget(cpus=2, affinity=2, quota=None)
    assert plan_threads(1, budget=b).threads == 2
    assert plan_threads(2, budget=b).threads == 1
    assert plan_threads(5, budget=b).threads == 1  # never 0
    assert plan_threads(3, requested=7, budget=b).threads == 7
    with pytest.raises(ValueError):
        plan_threads(1, requested=0)
    real = available_cpus()
    assert 1 <= real.cpus <= real.affinity == len(os.sched_getaffinity(0))


def test_cgroup_quota_v2_and_v1(tmp_path):
    root = tmp_path / "cg"
    (root / "job" / "step").mkdir(parents=True)
    (root / "cpu.max").write_text("max 100000\n")
    (root / "job" / "cpu.max").write_text("150000 100000\n")
    (root / "job" / "step" / "cpu.max").write_text("max 100000\n")
    proc = tmp_path / "cgroup"
    proc.write_text("0::/job/step\n")
    assert cgroup_cpu_limit(root, proc) == 1.5  # the tightest quota on the path up
    proc.write_text("0::/\n")
    assert cgroup_cpu_limit(root, proc) is None
    v1 = tmp_path / "v1"
    (v1 / "cpu,cpuacct" / "docker").mkdir(parents=True)
    (v1 / "cpu,cpuacct" / "docker" / "cpu.cfs_quota_us").write_text("300000\n")
    (v1 / "cpu,cpuacct" / "docker" / "cpu.cfs_period_us").write_text("100000\n")
    proc.write_text("4:memory:/docker\n3:cpu,cpuacct:/docker\n")
    assert cgroup_cpu_limit(v1, proc) == 3.0
    (v1 / "cpu,cpuacct" / "docker" / "cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_cpu_limit(v1, proc) is None


def test_unwritable_output_fails_before_the_model_loads(tmp_path, monkeypatch, capsys):
    src = tmp_path / "in"
    _img(src / "a.jpg")
    (tmp_path / "file").write_text("x")

    def no_model(*a, **k):
        raise AssertionError("the model must not be loaded")

    monkeypatch.setattr("weclip_infer.predictor.Segmenter.from_pretrained", no_model)
    assert main([str(src), "--out", str(tmp_path / "file" / "out"), "--model", "x", "--quiet"]) == 3
    assert "could not write" in capsys.readouterr().err


@pytest.mark.slow
def test_two_shards_at_once_into_one_folder(ckpt, tmp_path):
    """Both shards write into the same folder at the same time: every mask, one whole log line each."""
    import subprocess
    import sys

    src, out = tmp_path / "in", tmp_path / "out"
    for i in range(16):
        _img(src / f"i{i:02d}.jpg", size=(120, 160), seed=i)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "weclip_infer.segment", str(src), "--out", str(out), "--model",
                               str(ckpt), "--workers", "1", "--quiet", "--shard", f"{i}/2"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for i in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    assert len(list(out.glob("*.png"))) == 16 and not list(out.rglob("*.tmp"))
    lines = (out / "results.jsonl").read_text().splitlines()
    assert len(lines) == 16 and sorted(json.loads(x)["mask"] for x in lines) == [f"i{i:02d}.png" for i in range(16)]

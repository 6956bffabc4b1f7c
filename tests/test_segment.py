"""Batch segmentation CLI: bad files reported and skipped, atomic outputs, resume after a kill."""
from __future__ import annotations

import json
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
from weclip_infer.segment import list_inputs, main, shard


@pytest.fixture(scope="module")
def ckpt(shared_tiny_model, tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    save_checkpoint(shared_tiny_model, d, include_backbone=True)
    return d


def _write_good(folder: Path, n: int, size=(60, 80)):
    rng = np.random.default_rng(0)
    for i in range(n):
        sub = folder / ("a" if i % 2 else "b")
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(sub / f"img{i:03d}.jpg", quality=90)


@pytest.mark.parametrize("model", ["tiny", "embedded demo"])
def test_bad_files_are_reported_and_skipped(model, ckpt, tmp_path, capsys):
    """Both with a test checkpoint and with the embedded demo model (no ``--model``: the default)."""
    src = tmp_path / "in"
    _write_good(src, 3)
    good = (src / "a" / "img001.jpg").read_bytes()
    (src / "corrupt.jpg").write_bytes(good[: len(good) // 3])
    (src / "empty.jpg").write_bytes(b"")
    (src / "text.jpg").write_text("this is not an image")
    Image.fromarray(np.full((40, 50, 3), 120, np.uint8)).convert("CMYK").save(src / "cmyk.jpg")
    out = tmp_path / "out"
    model_args = ["--model", str(ckpt)] if model == "tiny" else []
    rc = main([str(src), "--out", str(out), *model_args, "--workers", "0", "--quiet", "--overlay"])
    assert rc == 1  # something failed
    recs = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    bad = {Path(r["image"]).name: r["error"] for r in recs if not r["ok"]}
    assert set(bad) == {"corrupt.jpg", "empty.jpg", "text.jpg"}
    assert "0 bytes" in bad["empty.jpg"] and "not a recognised image" in bad["text.jpg"]
    masks = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert masks == ["a/img001.png", "b/img000.png", "b/img002.png", "cmyk.png"]
    for m in masks:
        arr = np.asarray(Image.open(out / m))
        assert Image.open(out / m).mode == "P" and arr.max() < (4 if model == "tiny" else 9)
    assert (out / "a" / "img001_overlay.jpg").is_file()
    assert not list(out.rglob("*.tmp"))  # no partial outputs
    assert Image.open(out / "cmyk.png").size == (50, 40)


def test_shard_and_list_file(tmp_path):
    src = tmp_path / "in"
    _write_good(src, 5)
    items = list_inputs(src)
    assert len(items) == 5
    parts = [shard(items, f"{i}/2") for i in range(2)]
    assert sorted(parts[0] + parts[1]) == sorted(items)
    lst = tmp_path / "list.txt"
    lst.write_text("in/a/img001.jpg\n# comment\nin/b/img000.jpg\n")
    assert [r for _, r in list_inputs(lst)] == ["in/a/img001", "in/b/img000"]
    with pytest.raises(ValueError, match="shard"):
        shard(items, "3/2")


@pytest.mark.slow
def test_kill_then_resume_matches_uninterrupted_run(ckpt, tmp_path):
    src = tmp_path / "in"
    _write_good(src, 24, size=(200, 260))
    ref = tmp_path / "ref"
    assert main([str(src), "--out", str(ref), "--model", str(ckpt), "--workers", "0", "--quiet"]) == 0
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "weclip_infer.segment", str(src), "--out", str(out),
                             "--model", str(ckpt), "--workers", "1", "--quiet"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and len(list(out.rglob("*.png"))) < 3:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole group: the CLI and its decoding worker
    proc.wait(timeout=30)
    assert not [p for p in out.rglob("*.png") if p.stat().st_size == 0]
    assert main([str(src), "--out", str(out), "--model", str(ckpt), "--workers", "0", "--quiet", "--resume"]) == 0
    ref_masks = sorted(p.relative_to(ref) for p in ref.rglob("*.png"))
    assert ref_masks == sorted(p.relative_to(out) for p in out.rglob("*.png")) and len(ref_masks) == 24
    for rel in ref_masks:
        np.testing.assert_array_equal(np.asarray(Image.open(ref / rel)), np.asarray(Image.open(out / rel)))
    assert not list(out.rglob("*.tmp"))


def test_eval_cli_model_mode(ckpt, tmp_path):
    from weclip_infer.evaluate import main as eval_main
    from weclip_infer.segment import main as seg_main

    src, gt = tmp_path / "img", tmp_path / "gt"
    _write_good(src, 4)
    gt.mkdir()
    for p in src.rglob("*.jpg"):
        rel = p.relative_to(src).with_suffix(".png")
        (gt / rel).parent.mkdir(parents=True, exist_ok=True)
        m = np.zeros((60, 80), np.uint8)
        m[10:30, 20:50] = 2
        Image.fromarray(m, mode="L").save(gt / rel)
    rc = eval_main(["--model", str(ckpt), "--images", str(src), "--pred", str(tmp_path / "pred"), "--gt", str(gt),
                    "--num-classes", "4", "--json", str(tmp_path / "m.json"), "--single-scale"])
    assert rc == 0
    res = json.loads((tmp_path / "m.json").read_text())
    assert 0.0 <= res["miou"] <= 1.0 and res["num_images"] == 4
    assert "green box" in res["iou_per_class"]  # class names come from the model
    # identical to segmenting first and evaluating the folder
    assert seg_main([str(src), "--out", str(tmp_path / "pred2"), "--model", str(ckpt), "--workers", "0", "--quiet",
                     "--scales", "1", "--no-flip"]) == 0
    rc2 = eval_main(["--pred", str(tmp_path / "pred2"), "--gt", str(gt), "--num-classes", "4",
                     "--json", str(tmp_path / "m2.json")])
    assert rc2 == 0 and json.loads((tmp_path / "m2.json").read_text())["miou"] == res["miou"]
    # the network in bf16: it runs and scores close to fp32 on these images
    rc3 = eval_main(["--model", str(ckpt), "--images", str(src), "--pred", str(tmp_path / "pred3"), "--gt", str(gt),
                     "--num-classes", "4", "--json", str(tmp_path / "m3.json"), "--single-scale",
                     "--precision", "bf16"])
    assert rc3 == 0 and abs(json.loads((tmp_path / "m3.json").read_text())["miou"] - res["miou"]) < 0.05
    with pytest.raises(SystemExit):
        eval_main(["--pred", str(tmp_path / "pred2"), "--gt", str(gt), "--precision", "bf16"])


def test_crf_in_worker_process_equals_in_process(ckpt, tmp_path):
    """With workers the CRF runs in a worker process; masks equal predict(crf=True), bad files still counted."""
    pytest.importorskip("pydensecrf")
    from weclip_infer import Segmenter
    from weclip_infer.imageio import load_image
    from weclip_infer.segment import segment_folder

    src = tmp_path / "in"
    _write_good(src, 5, size=(48, 64))
    (src / "bad.jpg").write_bytes(b"not an image")
    seg = Segmenter.from_pretrained(ckpt, device="cpu")
    res = {}
    for workers in (0, 1):
        out = tmp_path / f"out{workers}"
        res[workers] = segment_folder(seg, src, out, workers=workers, crf=True, progress=False)
        assert res[workers]["segmented"] == 5 and res[workers]["failed"] == 1
        lines = [json.loads(s) for s in (out / "results.jsonl").read_text().splitlines()]
        assert [r["image"] for r in lines] == [str(p) for p, _ in list_inputs(src)]  # input order kept
        assert all("crf" in r["timings"] for r in lines if r["ok"])
    for p, rel in list_inputs(src):
        if p.name == "bad.jpg":
            continue
        ref = seg.predict(load_image(p), crf=True).labels
        for workers in (0, 1):
            got = np.array(Image.open(tmp_path / f"out{workers}" / f"{rel}.png"))
            assert np.array_equal(got, ref)


def test_crf_above_the_pixel_budget_runs_in_process_at_reduced_size(ckpt, tmp_path):
    from weclip_infer import Segmenter
    """An image above the CRF budget never gets full-resolution probabilities shipped to the CRF
    worker: it is refined in-process at the Segmenter's reduced size, like predict(crf=True)."""
    from weclip_infer.batch.segmentation import segment_folder

    src = tmp_path / "in"
    src.mkdir()
    rng = np.random.RandomState(3)
    Image.fromarray((rng.rand(60, 80, 3) * 255).astype(np.uint8)).save(src / "big.png")
    seg = Segmenter.from_pretrained(ckpt, device="cpu", long_side=64, crf_max_pixels=1200, crf_backend="torch")
    r = segment_folder(seg, src, tmp_path / "out", workers=1, crf=True, progress=False)
    assert r["failed"] == 0
    got = np.asarray(Image.open(tmp_path / "out" / "big.png"))
    ref = seg.predict(str(src / "big.png"), crf=True)
    assert ref.crf_size is not None and ref.crf_size[0] * ref.crf_size[1] <= 1200
    assert np.array_equal(got, ref.labels)

"""Ray Data engine: byte-identical to the local engine, driver kill + --resume, the Dataset API.

A private 2-CPU Ray cluster (127.0.0.1, no dashboard) is started and stopped by the module
fixture. The folder mixes good images in sub-folders, undecodable files and an ignored file.
"""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("ray", reason="ray not installed (pip install -e '.[ray]')")
pytest.importorskip("ray.data", reason="ray[data] not installed (pip install -e '.[ray]')")

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]


def _write_img(path: Path, h: int, w: int, seed: int) -> None:
    rng = np.random.RandomState(seed)
    arr = (rng.rand(h, w, 3) * 255).astype(np.uint8)
    arr[: h // 2, : w // 3] = (200, 30, 30)
    arr[h // 2:, w // 2:] = (30, 30, 200)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def _good_and_bad(root: Path, n_good: int, size=(48, 64)) -> Path:
    src = root / "in"
    for i in range(n_good):
        sub = ("", "a/", "a/b/")[i % 3]
        _write_img(src / f"{sub}img{i:02d}.{'png' if i % 2 else 'jpg'}", size[0] + 8 * (i % 3), size[1], seed=i)
    (src / "a").mkdir(parents=True, exist_ok=True)
    (src / "a" / "random.jpg").write_bytes(np.random.RandomState(0).bytes(2000))
    (src / "empty.png").write_bytes(b"")
    buf = io.BytesIO()
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(buf, format="PNG")
    (src / "truncated.png").write_bytes(buf.getvalue()[:60])
    (src / "notes.txt").write_text("not an image")  # ignored by extension
    return src


def _tree(out: Path) -> dict:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and p.name != "results.jsonl"}


def _records(out: Path, latest: bool = False) -> list:
    from weclip_infer.batch.results import read_results

    recs = read_results(out / "results.jsonl", latest=latest)
    return [{k: v for k, v in r.items() if k not in ("timings", "recovered")} for r in recs]


@pytest.fixture(scope="module")
def model_dir(shared_tiny_model, tmp_path_factory):
    from weclip_infer.checkpoint import save_checkpoint

    d = tmp_path_factory.mktemp("ray_data_model") / "model"
    save_checkpoint(shared_tiny_model, d, include_backbone=True)
    return d


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
             object_store_memory=200 * 1024 * 1024, logging_level="WARNING", log_to_driver=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


def _segment(argv) -> int:
    from weclip_infer.batch.cli import main

    return main([str(a) for a in argv])


COMMON = ["--backend", "eager", "--device", "cpu", "--threads", "1", "--quiet"]


def test_ray_engine_equals_local_engine(ray_cluster, model_dir, tmp_path, capsys):
    src = _good_and_bad(tmp_path, 7)
    rc_local = _segment([src, "--out", tmp_path / "local", "--model", model_dir, "--overlay", "--workers", "0",
                         *COMMON])
    out_local = capsys.readouterr()
    rc_ray = _segment([src, "--out", tmp_path / "ray", "--model", model_dir, "--overlay", "--engine", "ray",
                       "--batch-size", "2", "--address", ray_cluster, *COMMON])
    out_ray = capsys.readouterr()
    assert rc_local == rc_ray == 1  # some inputs failed
    local, ray_ = _tree(tmp_path / "local"), _tree(tmp_path / "ray")
    assert len(local) == 14 and sorted(local) == sorted(ray_)  # 7 masks + 7 overlays, same names
    for name in local:
        assert local[name] == ray_[name], f"{name} differs"
    assert _records(tmp_path / "local") == _records(tmp_path / "ray")  # same lines, same order, same errors
    assert sum(not r["ok"] for r in _records(tmp_path / "ray")) == 3
    # the same bad-file report and counts
    assert out_local.out.split(" in ")[0] == out_ray.out.split(" in ")[0]
    failed = lambda err: sorted(line for line in err.splitlines() if "FAILED" in line or "note:" in line)  # noqa: E731
    assert failed(out_local.err) == failed(out_ray.err) and len(failed(out_ray.err)) == 4


def test_crf_stage_equals_local_engine(ray_cluster, model_dir, tmp_path, capsys):
    from weclip_infer.crf import crf_available

    if not crf_available():
        pytest.skip("DenseCRF not installed (pip install -e '.[crf]')")
    src = _good_and_bad(tmp_path, 3)
    rc_local = _segment([src, "--out", tmp_path / "local", "--model", model_dir, "--crf", "--workers", "1", *COMMON])
    rc_ray = _segment([src, "--out", tmp_path / "ray", "--model", model_dir, "--crf", "--engine", "ray",
                       "--address", ray_cluster, *COMMON])
    assert rc_local == rc_ray == 1
    assert _tree(tmp_path / "local") == _tree(tmp_path / "ray")
    assert _records(tmp_path / "local") == _records(tmp_path / "ray")
    assert all("crf" in r["timings"] for r in read_results_ok(tmp_path / "ray"))


def read_results_ok(out: Path) -> list:
    from weclip_infer.batch.results import read_results

    return [r for r in read_results(out / "results.jsonl") if r["ok"]]


def test_resume_after_driver_kill(ray_cluster, model_dir, tmp_path):
    """SIGKILL the driver mid-run, then --resume: the same files as an uninterrupted local run."""
    src = _good_and_bad(tmp_path, 18, size=(400, 400))
    ref = tmp_path / "local"
    assert _segment([src, "--out", ref, "--model", model_dir, "--workers", "0", *COMMON]) == 1
    out = tmp_path / "ray"
    cmd = [sys.executable, "-m", "weclip_infer.segment", str(src), "--out", str(out), "--model", str(model_dir),
           "--engine", "ray", "--address", ray_cluster, "--batch-size", "1", *COMMON]
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None and len(list(out.rglob("*.png"))) < 2:
            time.sleep(0.02)
        assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read()[-2000:]!r}"
        proc.kill()  # the driver dies without any cleanup
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=60)
    done_before = len(list(out.rglob("*.png")))
    assert 2 <= done_before < 18, done_before
    rc = _segment([src, "--out", out, "--model", model_dir, "--engine", "ray", "--address", ray_cluster, "--resume",
                   *COMMON])
    assert rc == 1
    assert _tree(out) == _tree(ref)  # every mask, byte for byte, none written twice or torn
    assert not list(out.rglob(".*.tmp"))
    from weclip_infer.batch.results import read_results

    expected = {r["image"]: r for r in _records(ref, latest=True)}
    for rec in read_results(out / "results.jsonl", latest=True):
        want = expected.pop(rec["image"])
        if rec.get("recovered"):  # killed between its mask and its log line: the loop's recovery record
            assert rec["ok"] and rec["mask"] == want["mask"] and want["ok"]
        else:
            assert {k: v for k, v in rec.items() if k != "timings"} == want
    assert not expected  # every input has its line


def test_segment_dataset_paths_and_images(ray_cluster, model_dir, tmp_path):
    import ray.data

    from weclip_infer.predictor import Segmenter
    from weclip_infer.ray.data import segment_dataset

    src = _good_and_bad(tmp_path, 3)
    paths = sorted(str(p) for p in src.rglob("*.*") if p.suffix in (".jpg", ".png"))
    seg = Segmenter.from_pretrained(model_dir, device="cpu", backend="eager")
    ds = ray.data.from_items([{"path": p, "id": i} for i, p in enumerate(paths)])
    rows = {r["path"]: r for r in segment_dataset(ds, model_dir, backend="eager", device="cpu", batch_size=2,
                                                  scales=(1.0,), flip=False).take_all()}
    assert sorted(rows) == paths
    good = 0
    for p, r in rows.items():
        if Path(p).name in ("random.jpg", "empty.png", "truncated.png"):
            assert r["error"] and r["mask"].size == 0
            continue
        good += 1
        ref = seg.predict(p, scales=(1.0,), flip=False)
        assert r["error"] == "" and np.array_equal(r["mask"], ref.labels.astype(np.uint8))
        assert list(r["classes"]) == sorted(ref.areas()) and "total" in json.loads(r["timings"])
        assert r["id"] == paths.index(p)  # other columns are kept
    assert good == 3
    # rows that already hold decoded images (e.g. from ray.data.read_images)
    img = np.asarray(Image.open(paths[0]).convert("RGB"))
    out = segment_dataset(ray.data.from_items([{"image": img}]), model_dir, backend="eager", device="cpu",
                          keep_image=True).take_all()
    assert np.array_equal(out[0]["mask"], seg.predict(img).labels.astype(np.uint8))
    assert np.array_equal(out[0]["image"], img)
    with pytest.raises(ValueError, match="num_actors"):
        segment_dataset(ds, model_dir, num_actors=0)
    with pytest.raises(ValueError, match="all 2 CPUs"):  # nothing left for decoding: refused, not stalled
        segment_dataset(ds, model_dir, num_actors=1, cpus_per_actor=2)
    with pytest.raises(ValueError, match="GPU"):
        segment_dataset(ds, model_dir, gpus_per_actor=1)
    with pytest.raises(ValueError, match="'path' or an 'image'"):
        segment_dataset(ray.data.from_items([{"x": 1}]), model_dir)


def test_unusable_model_is_one_line_error(ray_cluster, tmp_path, capsys):
    src = _good_and_bad(tmp_path, 2)
    rc = _segment([src, "--out", tmp_path / "o1", "--model", tmp_path / "missing", "--engine", "ray",
                   "--address", ray_cluster, *COMMON])
    assert rc == 2 and "model folder not found" in capsys.readouterr().err
    (tmp_path / "not_a_model").mkdir()
    rc = _segment([src, "--out", tmp_path / "o2", "--model", tmp_path / "not_a_model", "--engine", "ray",
                   "--address", ray_cluster, *COMMON])
    err = capsys.readouterr().err
    assert rc == 2 and "the Ray pipeline failed" in err and "Traceback" not in err, err[-2000:]
    assert not list((tmp_path / "o2").rglob("*.png"))

"""Damaged, interrupted and tampered checkpoints: resume falls back, leftovers are cleaned,
writes are durable, and loading refuses what it cannot trust with an error naming the file/key.

Every case uses real files on disk (truncated, deleted, byte-flipped, rewritten).
"""
from __future__ import annotations

import csv
import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from safetensors.torch import load_file, save_file  # noqa: E402
from training_world import tiny_train_config, write_world  # noqa: E402

from weclip_infer.checkpoint import CheckpointError, file_sha256, load_checkpoint, save_checkpoint  # noqa: E402
from weclip_infer.config import ConfigError, load_config  # noqa: E402
from weclip_infer.training import state as state_mod  # noqa: E402
from weclip_infer.training import train  # noqa: E402


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return write_world(tmp_path_factory.mktemp("world"))


@pytest.fixture(scope="module")
def run4(world, tmp_path_factory) -> Path:
    """A finished 4-iteration run with checkpoints at 2 and 4."""
    out = tmp_path_factory.mktemp("run") / "run"
    train(tiny_train_config(world, out, max_iters=4, checkpoint_every=2))
    return out


def _losses(out: Path) -> dict[int, float]:
    with open(out / "log.csv", newline="") as f:
        return {int(r["iter"]): float(r["loss"]) for r in csv.DictReader(f)}


def _copy(run: Path, tmp_path: Path, name: str) -> Path:
    dst = tmp_path / name
    shutil.copytree(run, dst)
    cfg = json.loads((dst / "checkpoints" / "iter_4" / "train_config.json").read_text())
    assert cfg["train"]["out_dir"] == str(run)
    return dst


def _flip_byte(path: Path, offset: int = -10) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


# ------------------------------------------------------------------------------------------------
# resume falls back to the newest checkpoint that loads
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("damage", ["truncated_state", "deleted_folder", "bad_pointer", "flipped_weights"])
def test_resume_falls_back_to_newest_loadable_checkpoint(run4, tmp_path, caplog, damage):
    run = _copy(run4, tmp_path, damage)
    ck = run / "checkpoints"
    expected_start = 2
    if damage == "truncated_state":
        p = ck / "iter_4" / "train_state.pt"
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    elif damage == "deleted_folder":
        shutil.rmtree(ck / "iter_4")
    elif damage == "bad_pointer":
        (ck / "latest").write_text("../../etc\n")  # names no checkpoint: the newest valid one is iter_4
        expected_start = 4
    elif damage == "flipped_weights":
        _flip_byte(ck / "iter_4" / "model.safetensors")
    with caplog.at_level(logging.INFO, logger="weclip_infer"):
        s = train(None, resume=run, overrides=["train.max_iters=5"], out_dir=run)
    assert s["start_iteration"] == expected_start and s["iterations"] == 5
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("resuming from")]
    assert len(said) == 1 and f"iter_{expected_start}" in said[0]  # says which one it used, and why
    assert ("iter_4:" if damage in ("truncated_state", "flipped_weights") else "'latest' pointer") in said[0]
    # the fallback resume is exact: iterations 3 and 4 repeat the original run's losses
    orig, now = _losses(run4), _losses(run)
    assert all(now[i] == orig[i] for i in range(1, 5))


def test_resume_of_a_named_broken_checkpoint_is_an_error(run4, tmp_path):
    run = _copy(run4, tmp_path, "named")
    p = run / "checkpoints" / "iter_4" / "train_state.pt"
    p.write_bytes(p.read_bytes()[:100])
    with pytest.raises(ConfigError, match="train_state.pt"):
        train(None, resume=run / "checkpoints" / "iter_4", out_dir=tmp_path / "elsewhere")
    for d in ("iter_2", "iter_4"):
        shutil.rmtree(run / "checkpoints" / d)
    (run / "checkpoints" / "iter_7").mkdir()  # an empty folder is no checkpoint either
    with pytest.raises(ConfigError, match="no checkpoint there loads"):
        train(None, resume=run, overrides=["train.max_iters=5"])


# ------------------------------------------------------------------------------------------------
# interrupted writes: leftovers cleaned, writes durable and complete
# ------------------------------------------------------------------------------------------------

def test_stale_temporaries_are_removed_at_start(run4, tmp_path):
    run = _copy(run4, tmp_path, "stale")
    ck = run / "checkpoints"
    stale = [ck / ".iter_6.k2j3h.tmp", ck / ".iter_4.old-4242", ck / ".iter_10.x_y.tmp"]
    for d in stale:
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"partial")
    (ck / ".latest.abc123.tmp").write_text("iter_6\n")
    keep = [ck / "notes.txt", ck / ".my_hidden_file", run / ".iter_1.z.tmp"]  # not ours / not in checkpoints/
    for k in keep:
        k.write_text("user data")
    s = train(None, resume=run, overrides=["train.max_iters=5"])
    assert s["start_iteration"] == 4
    assert not any(p.exists() for p in stale) and not (ck / ".latest.abc123.tmp").exists()
    assert all(k.read_text() == "user data" for k in keep)


def test_checkpoint_write_is_fsynced_before_it_is_published(world, tmp_path, monkeypatch):
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = state_mod._fsync_path, os.replace

    def fsync(p):
        events.append(("fsync", str(p)))
        real_fsync(p)

    def replace(src, dst):
        events.append(("replace", f"{Path(src).name}->{Path(dst).name}"))
        real_replace(src, dst)

    monkeypatch.setattr(state_mod, "_fsync_path", fsync)
    monkeypatch.setattr(os, "replace", replace)
    out = tmp_path / "run"
    train(tiny_train_config(world, out, max_iters=1))
    ck = out / "checkpoints" / "iter_1"
    publish = next(i for i, (k, v) in enumerate(events) if k == "replace" and v.endswith("->iter_1"))
    tmp_name = events[publish][1].split("->")[0]
    synced_before = {Path(v).name for k, v in events[:publish] if k == "fsync" and tmp_name in v}
    assert {p.name for p in ck.iterdir()} <= synced_before  # every file of the folder, before the rename
    assert tmp_name in synced_before  # and the folder itself
    latest = next(i for i, (k, v) in enumerate(events) if k == "replace" and v.endswith("->latest"))
    assert ("fsync", str(out / "checkpoints")) in events[publish:latest]  # the rename is durable first
    # what was written is complete: the checkpoint loads, and its folder has the umask's mode
    assert state_mod.checkpoint_problem(ck)[0] is None
    umask = os.umask(0)
    os.umask(umask)
    assert (ck.stat().st_mode & 0o777) == (0o777 & ~umask)
    meta = json.loads((ck / "config.json").read_text())
    assert meta["sha256"]["model.safetensors"] == file_sha256(ck / "model.safetensors")


# ------------------------------------------------------------------------------------------------
# tampered checkpoints
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_ckpt(world, tmp_path_factory) -> Path:
    from weclip_infer.model import build_model

    cfg = tiny_train_config(world, tmp_path_factory.mktemp("unused"))["model"]
    torch.manual_seed(0)
    model = build_model(cfg, device="cpu")
    return save_checkpoint(model, tmp_path_factory.mktemp("ck") / "ck")


def _tampered(tiny_ckpt: Path, tmp_path: Path) -> Path:
    d = tmp_path / "ck"
    shutil.copytree(tiny_ckpt, d)
    return d


def _rewrite_meta(d: Path, fn) -> None:
    meta = json.loads((d / "config.json").read_text())
    fn(meta)
    (d / "config.json").write_text(json.dumps(meta))


def _rewrite_tensors(d: Path, fn) -> None:
    t = load_file(str(d / "model.safetensors"))
    fn(t)
    save_file(t, str(d / "model.safetensors"))
    _rewrite_meta(d, lambda m: m["sha256"].update({"model.safetensors": file_sha256(d / "model.safetensors")}))


def test_untampered_and_legacy_checkpoints_load(tiny_ckpt, tmp_path):
    a = load_checkpoint(tiny_ckpt, device="cpu")
    d = _tampered(tiny_ckpt, tmp_path)
    _rewrite_meta(d, lambda m: m.pop("sha256"))  # written before hashes were recorded
    b = load_checkpoint(d, device="cpu")
    assert all(torch.equal(x, y) for x, y in zip(a.decoder.state_dict().values(), b.decoder.state_dict().values()))


def test_shipped_demo_model_records_its_weights_hash():
    from importlib import resources

    d = Path(str(resources.files("weclip_infer") / "assets" / "demo_model"))
    meta = json.loads((d / "config.json").read_text())
    assert meta["sha256"]["model.safetensors"] == file_sha256(d / "model.safetensors")


def test_flipped_weight_bytes_are_refused(tiny_ckpt, tmp_path):
    d = _tampered(tiny_ckpt, tmp_path)
    _flip_byte(d / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.safetensors: sha256 .* does not match"):
        load_checkpoint(d)


def test_flipped_backbone_bytes_are_refused(world, tmp_path):
    from weclip_infer.model import build_model

    cfg = tiny_train_config(world, tmp_path / "unused")["model"]
    d = save_checkpoint(build_model(cfg, device="cpu"), tmp_path / "with_clip", include_backbone=True)
    meta = json.loads((d / "config.json").read_text())
    assert set(meta["sha256"]) == {"model.safetensors", "backbone.safetensors"}
    load_checkpoint(d, device="cpu")  # self-contained and intact
    _flip_byte(d / "backbone.safetensors", offset=-3)
    with pytest.raises(CheckpointError, match=r"backbone\.safetensors: sha256 .* does not match"):
        load_checkpoint(d)


def test_non_finite_weights_are_refused(tiny_ckpt, tmp_path):
    d = _tampered(tiny_ckpt, tmp_path)
    _rewrite_tensors(d, lambda t: t["decoder.classifier.weight"].view(-1)[3].fill_(float("nan")))
    with pytest.raises(CheckpointError, match="decoder.classifier.weight.*NaN"):
        load_checkpoint(d)


def test_missing_text_embedding_is_a_clear_error(tiny_ckpt, tmp_path):
    d = _tampered(tiny_ckpt, tmp_path)
    _rewrite_tensors(d, lambda t: t.pop("text_fg"))
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\) \['text_fg'\]"):
        load_checkpoint(d)


@pytest.mark.parametrize("edit, match", [
    (lambda m: m["config"]["inference"].update(long_side=-5), r"config\.inference\.long_side"),
    (lambda m: m["config"]["decoder"].update(dropout="lots"), r"config\.decoder\.dropout"),
    (lambda m: m["config"]["par"].update(dilations=["x"]), r"config\.par\.dilations"),
    (lambda m: m["config"]["text"].update(class_names=[1, 2, 3]), r"config\.text\.class_names"),
    (lambda m: m["config"]["refine"].update(candidate_blocks=40), r"config\.refine\.candidate_blocks=40 exceeds"),
    (lambda m: m["config"].update(bogus=1), r"unknown config key\(s\): bogus"),
    (lambda m: m.update(config=[1, 2]), r"'config' must be a JSON object, got list"),
    (lambda m: m.update(sha256=["abc"]), r"'sha256' must map file names"),
])
def test_bad_config_values_name_the_key(tiny_ckpt, tmp_path, edit, match):
    d = _tampered(tiny_ckpt, tmp_path)
    _rewrite_meta(d, edit)
    with pytest.raises(CheckpointError, match=match) as e:
        load_checkpoint(d)
    assert "config.json" in str(e.value)


def test_deep_or_huge_config_json_is_refused(tiny_ckpt, tmp_path):
    d = _tampered(tiny_ckpt, tmp_path)
    (d / "config.json").write_text('{"format": "weclip_infer/1", "config": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(CheckpointError, match="nested"):
        load_checkpoint(d)
    (d / "config.json").write_text(" " * (2 << 20) + "{}")
    with pytest.raises(CheckpointError, match="larger than"):
        load_checkpoint(d)
    with pytest.raises(ConfigError, match="nested"):
        load_config({"text": {"class_names": [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[["x"]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]}})
    with pytest.raises(ConfigError, match="expected a mapping or a file path"):
        load_config([1, 2])  # type: ignore[arg-type]


def test_clip_weights_outside_the_checkpoint_folder_are_refused(tiny_ckpt, tmp_path):
    d = _tampered(tiny_ckpt, tmp_path)
    (tmp_path / "outside.safetensors").write_bytes(b"x")
    _rewrite_meta(d, lambda m: m["config"]["backbone"].update(clip_weights="../outside.safetensors"))
    with pytest.raises(CheckpointError, match="clip_weights='../outside.safetensors' resolves outside"):
        load_checkpoint(d)
    os.symlink(tmp_path / "outside.safetensors", d / "link.safetensors")
    _rewrite_meta(d, lambda m: m["config"]["backbone"].update(clip_weights="link.safetensors"))
    with pytest.raises(CheckpointError, match="resolves outside"):
        load_checkpoint(d)

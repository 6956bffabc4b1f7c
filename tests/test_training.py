"""Tests of weclip_infer.training: schedule, config errors, runs, checkpoints, exact resume, DDP.

A tiny random CLIP (4 blocks, width 64, 64-px input) and a tiny VOC-layout data set written to
tmp_path keep every run to a few seconds on one CPU thread.
"""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from training_world import tiny_train_config as _config  # noqa: E402
from training_world import write_world as _write_world  # noqa: E402

from weclip_infer.config import ConfigError  # noqa: E402
from weclip_infer.data import DatasetError  # noqa: E402
from weclip_infer.training import TrainConfig, load_train_config, lr_at, train  # noqa: E402
from weclip_infer.training.state import load_train_state  # noqa: E402


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return _write_world(tmp_path_factory.mktemp("world"))


def _losses(out: Path) -> dict[int, float]:
    with open(out / "log.csv", newline="") as f:
        return {int(r["iter"]): float(r["loss"]) for r in csv.DictReader(f)}


# ------------------------------------------------------------------------------------------------
# schedule
# ------------------------------------------------------------------------------------------------

def test_lr_at_matches_spec_formulas():
    cfg = TrainConfig(max_iters=30000)
    lr0 = 2e-4 * 10
    assert cfg.lr == pytest.approx(2e-3)
    warm = lambda s: lr0 * (1 - (1 - s / 50) * (1 - 1e-6))  # noqa: E731
    poly = lambda s: lr0 * (1 - s / 30000) ** 1.0  # noqa: E731
    assert lr_at(0, cfg) == pytest.approx(lr0 * 1e-6, rel=1e-12)
    for s in (0, 25, 49):
        assert lr_at(s, cfg) == pytest.approx(warm(s), rel=1e-12)
    assert lr_at(25, cfg) == pytest.approx(lr0 * (0.5 + 0.5e-6), rel=1e-12)
    for s in (50, 51, 15000, 29999):
        assert lr_at(s, cfg) == pytest.approx(poly(s), rel=1e-12)
    assert lr_at(50, cfg) == pytest.approx(lr0 * (1 - 50 / 30000))  # s/max_iter, not (s-50)/(max-50)
    assert lr_at(29999, cfg) == pytest.approx(lr0 / 30000)
    assert lr_at(30000, cfg) == lr_at(29999, cfg)
    # monotone warm-up, then monotone decay
    seq = [lr_at(s, cfg) for s in range(0, 200)]
    assert all(a < b for a, b in zip(seq[:50], seq[1:51])) and all(a > b for a, b in zip(seq[50:], seq[51:]))



def test_optimizer_is_adamw_with_the_recipe_and_fused_where_supported():
    from weclip_infer.training.schedule import build_optimizer, set_lr

    cfg = TrainConfig(max_iters=100)
    w = torch.nn.Parameter(torch.randn(4, 3))
    frozen = torch.nn.Parameter(torch.randn(2), requires_grad=False)
    opt = build_optimizer([w, frozen], cfg)
    assert isinstance(opt, torch.optim.AdamW) and opt.param_groups[0]["params"] == [w]
    g = opt.param_groups[0]
    assert (g["betas"], g["eps"], g["weight_decay"], g["lr"]) == (tuple(cfg.betas), cfg.eps, cfg.weight_decay,
                                                                  lr_at(0, cfg))
    assert g["fused"] is True
    # the fused update is AdamW's: equal to the per-tensor form up to rounding
    ref = torch.nn.Parameter(w.detach().clone())
    ref_opt = torch.optim.AdamW([ref], lr=1e-2, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay,
                                foreach=False)
    start = w.detach().clone()
    set_lr(opt, 1e-2)
    for k in range(3):
        grad = torch.randn(4, 3, generator=torch.Generator().manual_seed(k))
        w.grad, ref.grad = grad.clone(), grad.clone()
        opt.step()
        ref_opt.step()
    torch.testing.assert_close(w.detach(), ref.detach(), rtol=1e-6, atol=1e-7)
    assert (w.detach() - start).abs().min() > 1e-3  # every weight moved
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer([frozen], cfg)
    # a device the fused kernel is not used on falls back to the default update
    meta = torch.nn.Parameter(torch.empty(3, device="meta"))
    assert not build_optimizer([meta], cfg).param_groups[0]["fused"]

# ------------------------------------------------------------------------------------------------
# config and data errors
# ------------------------------------------------------------------------------------------------

def test_config_errors_name_the_key(world, tmp_path):
    base = _config(world, tmp_path / "run")
    cases = {
        "train.bogus=1": "train.bogus",
        "model.decoder.bogus=1": "model.decoder.bogus",
        "data.bogus=1": "data.bogus",
        "train.max_iters=abc": "train.max_iters",
        "train.max_iters=0": "train.max_iters",
        "train.amp_dtype=float8": "train.amp_dtype",
        "data.kind=pascal": "data.kind",
        "data.scale_range=[2.0]": "data.scale_range",
        "model.refine.refine_map=xyz": "model.refine.refine_map",
        "model.decoder.num_heads=5": "model.decoder",
        "bogus.key=1": "bogus",
    }
    for ov, key in cases.items():
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_train_config(base, [ov])
    # a YAML file with an unknown top-level section
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(dict(base, extra={"a": 1})))
    with pytest.raises(ConfigError, match="extra"):
        load_train_config(p)
    # ablation switches and the spec defaults come through
    cfg = load_train_config(base, ["model.refine.use_rfm=false", "model.refine.refine_map=af",
                                   "model.refine.use_refinement=false", "model.decoder.num_layers=2",
                                   "train.max_iters=10", "model.refine.rfm_switch_iter=5"])
    r = cfg.model.refine
    assert (r.use_rfm, r.refine_map, r.use_refinement) == (False, "af", False)
    assert cfg.model.decoder.num_layers == 2 and cfg.train.max_iters == 10 and cfg.model.refine.rfm_switch_iter == 5
    d = TrainConfig()
    assert (d.base_lr * d.lr_mult, d.weight_decay, d.betas, d.eps, d.warmup_iters, d.seed, d.batch_size,
            d.max_iters) == (pytest.approx(2e-3), 0.01, [0.9, 0.999], 1e-8, 50, 1, 4, 30000)


def test_shipped_configs_load(tmp_path):
    from weclip_infer.training.cli import shipped_config

    voc = load_train_config(shipped_config("voc"))
    assert voc.train.max_iters == 30000 and voc.train.batch_size == 4 and voc.model.refine.rfm_switch_iter == 15000
    assert voc.model.refine.box_threshold == 0.4 and voc.model.refine.candidate_blocks == 6
    coco = load_train_config(shipped_config("coco"))
    assert coco.train.max_iters == 80000 and coco.model.refine.box_threshold == 0.7
    assert coco.model.refine.candidate_blocks == 10 and coco.model.refine.rfm_switch_iter == 40000
    demo = load_train_config(shipped_config("demo"))
    assert demo.data.kind == "demo" and len(demo.model.text.class_names) == 8
    assert (demo.model.refine.candidate_blocks, demo.model.refine.static_blocks) == (3, 4)  # follow the 6 blocks
    assert (demo.model.decoder.dim, demo.model.decoder.num_heads) == (128, 4)  # follow the width-128 demo CLIP
    (tmp_path / "classes.txt").write_text("zebra\nyak\n")
    custom = load_train_config(shipped_config("custom"), [f"data.root={tmp_path}", "data.class_names_file=classes.txt"])
    assert custom.data.kind == "custom" and custom.model.text.class_names == ["zebra", "yak"]
    assert custom.data.class_names_file == str(tmp_path / "classes.txt")  # looked up in data.root
    with pytest.raises(ConfigError, match="class_names"):
        load_train_config(shipped_config("custom"))  # a custom config needs its classes


def test_bad_dataset_fails_before_training(world, tmp_path):
    import shutil

    root = tmp_path / "broken"
    shutil.copytree(world, root)
    (root / "train.txt").write_text((root / "train.txt").read_text() + "does_not_exist\n")
    out = tmp_path / "run_missing"
    with pytest.raises(DatasetError, match="does_not_exist"):
        train(_config(root, out))
    assert not (out / "log.csv").exists()

    root2 = tmp_path / "unknown_class"
    shutil.copytree(world, root2)
    names = (root2 / "train.txt").read_text().split()
    (root2 / "cls_labels.json").write_text(json.dumps({n: ["red"] for n in names[1:]} | {names[0]: ["zebra"]}))
    out2 = tmp_path / "run_unknown"
    with pytest.raises(DatasetError, match="zebra"):
        train(_config(root2, out2))
    assert not (out2 / "log.csv").exists()

    # class list of the data set differs from the model's
    (root2 / "cls_labels.json").unlink()
    (root2 / "classes.txt").write_text("red\ngreen\nyellow\n")
    with pytest.raises(ConfigError, match="class"):
        train(_config(root2, tmp_path / "run_cls"), ["data.class_names_file=" + str(root2 / "classes.txt")])


# ------------------------------------------------------------------------------------------------
# runs
# ------------------------------------------------------------------------------------------------

def test_short_run_writes_loadable_checkpoint(world, tmp_path):
    from weclip_infer.checkpoint import load_checkpoint

    out = tmp_path / "run"
    cfg = _config(world, out, max_iters=4, eval_every=2, eval_at_end=True, checkpoint_every=2, plots=True,
                  keep_checkpoints=1)
    s = train(cfg)
    assert s["iterations"] == 4 and np.isfinite(s["final_loss"])
    ck = out / "checkpoints" / "iter_4"
    assert Path(s["checkpoint"]) == ck
    assert (out / "checkpoints" / "latest").read_text().strip() == "iter_4"
    assert not (out / "checkpoints" / "iter_2").exists()  # pruned (keep_checkpoints=1)
    assert {p.name for p in ck.iterdir()} >= {"config.json", "model.safetensors", "train_state.pt", "train_config.json"}
    st = load_train_state(ck)  # weights_only=True
    assert st["iteration"] == 4 and st["iter_num"] == 4
    assert set(_losses(out)) == {1, 2, 3, 4}
    assert s["eval"]["multiscale"] is True and s["eval"]["num_images"] == 3 and 0.0 <= s["eval"]["miou"] <= 1.0
    evals = [json.loads(x) for x in (out / "eval.jsonl").read_text().splitlines()]
    assert [e["iter"] for e in evals] == [2, 4] and evals[0]["pseudo_miou"] is not None
    assert (out / "eval" / "iter_4.md").is_file() and (out / "panels" / "iter_2.png").is_file()
    assert (out / "plots" / "loss.png").is_file() and (out / "plots" / "miou.png").is_file()
    assert (out / "config.yaml").is_file() and (out / "summary.json").is_file()
    log = (out / "train.log").read_text()
    assert "arithmetic: frozen CLIP fp32; GradCAM, PAR and the decoder fp32 (" in log  # the chosen path is logged

    model = load_checkpoint(ck, device="cpu")
    from weclip_infer.predictor import Segmenter

    img = np.asarray(Image.open(world / "JPEGImages" / "val_000.jpg").convert("RGB"))
    res = Segmenter(model, scales=(1.0,), flip=False, long_side=64).predict(img)
    assert res.labels.shape == img.shape[:2] and res.labels.max() < 4

    # starting again into the same folder without --resume is refused
    with pytest.raises(ConfigError, match="resume"):
        train(cfg)


def test_resume_is_exact(world, tmp_path):
    # 8 images, batch 2: 4 batches per epoch -> the checkpoint at 3 is mid-epoch, 5..6 run in epoch 1;
    # the RFM switch (forward 4) happens after the checkpoint; dropout is active; eval at 3 must not
    # perturb the training randomness.
    a = tmp_path / "a"
    cfg = _config(world, a, max_iters=6, checkpoint_every=3, eval_every=3, num_panels=1)
    full = train(cfg)
    la = _losses(a)
    assert sorted(la) == [1, 2, 3, 4, 5, 6] and full["epoch"] == 1
    st = load_train_state(a / "checkpoints" / "iter_3")
    assert (st["iteration"], st["epoch"], st["epoch_pos"], st["iter_num"]) == (3, 0, 3, 3)

    b = tmp_path / "b"
    s = train(None, resume=a / "checkpoints" / "iter_3", out_dir=b)
    lb = _losses(b)
    assert sorted(lb) == [4, 5, 6] and s["start_iteration"] == 3 and s["rfm_forward_counter"] == 6
    for i in (4, 5, 6):
        assert lb[i] == pytest.approx(la[i], rel=0, abs=1e-6), (i, la, lb)
    assert max(abs(lb[i] - la[i]) for i in (4, 5, 6)) == 0.0  # bit-exact on CPU
    # the final decoders are identical too
    from safetensors.torch import load_file

    wa = load_file(str(a / "checkpoints" / "iter_6" / "model.safetensors"))
    wb = load_file(str(b / "checkpoints" / "iter_6" / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)

    # same seed, fresh run: same losses (determinism)
    c = tmp_path / "c"
    train(_config(world, c, max_iters=2))
    lc = _losses(c)
    assert lc[1] == la[1] and lc[2] == la[2]

    # resuming the run folder itself (auto) continues it and keeps the earlier log rows
    s2 = train(None, resume=a, overrides=["train.max_iters=7"])
    assert s2["start_iteration"] == 6 and sorted(_losses(a)) == [1, 2, 3, 4, 5, 6, 7]


def _rows(out: Path) -> list[dict]:
    with open(out / "log.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_fully_supervised_trains_without_affinity_loss(world, tmp_path):
    out = tmp_path / "fs"
    s = train(_config(world, out, max_iters=2), ["model.decoder.fully_supervised=true"])
    assert s["iterations"] == 2 and np.isfinite(s["final_loss"]) and s["pseudo_miou"] is None
    assert all(float(r["loss_aff"]) == 0.0 for r in _rows(out))
    normal = train(_config(world, tmp_path / "ws", max_iters=2))
    assert normal["pseudo_miou"] is not None and any(float(r["loss_aff"]) != 0.0 for r in _rows(tmp_path / "ws"))


def test_ablation_switches_change_what_they_should(world, tmp_path):
    """Same seed and data, two iterations each: every switch changes the refinement it names."""
    def run(name: str, *ov: str) -> tuple[list[float], list[int]]:
        train(_config(world, tmp_path / name, max_iters=2), list(ov))
        rows = _rows(tmp_path / name)
        return [float(r["loss"]) for r in rows], [int(r["rfm"]) for r in rows]

    rfm = run("rfm", "model.refine.rfm_switch_iter=0")  # RFM from the first forward
    static = run("static", "model.refine.rfm_switch_iter=100")  # the switch never comes
    no_rfm = run("no_rfm", "model.refine.use_rfm=false", "model.refine.rfm_switch_iter=0")
    af = run("af", "model.refine.refine_map=af", "model.refine.rfm_switch_iter=0")
    none = run("none", "model.refine.use_refinement=false", "model.refine.rfm_switch_iter=0")
    assert rfm[1] == [1, 1] and static[1] == no_rfm[1] == none[1] == [0, 0] and af[1] == [1, 1]
    assert no_rfm[0] == static[0]  # use_rfm=false is the static refinement for the whole run
    assert rfm[0] != static[0]  # RFM gives other pseudo labels than the static refinement
    assert af[0] != rfm[0]  # the refining map A_f alone differs from the full map
    assert none[0] != static[0] and none[0] != rfm[0]  # no refinement at all differs from both


def test_cli_print_config_and_errors(world, tmp_path, capsys):
    from weclip_infer.training.cli import main

    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(_config(world, tmp_path / "cli")))
    assert main(["--config", str(p), "--print-config", "train.max_iters=7", "--device", "cpu"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["train"]["max_iters"] == 7 and printed["train"]["device"] == "cpu"
    assert main(["--config", str(p), "train.nope=1"]) == 2
    assert "train.nope" in capsys.readouterr().err


@pytest.mark.slow
def test_ddp_two_processes_gloo(world, tmp_path):
    out = tmp_path / "ddp"
    p = tmp_path / "ddp.yaml"
    p.write_text(yaml.safe_dump(_config(world, out, max_iters=2, eval_at_end=True, checkpoint_every=2)))
    # a crash at shutdown prints each process's Python stack (faulthandler) into the failure message
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONFAULTHANDLER="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "weclip_infer.train", "--config", str(p), "--device", "cpu"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ck = out / "checkpoints" / "iter_2"
    assert (ck / "model.safetensors").is_file()
    st = load_train_state(ck)
    assert st["world_size"] == 2 and len(st["rng"]) == 2
    assert sorted(_losses(out)) == [1, 2]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["eval"]["num_images"] == 3


def test_train_seed_controls_decoder_init_and_dropout(world, tmp_path):
    a = train(_config(world, tmp_path / "s1", max_iters=1))
    b = train(_config(world, tmp_path / "s2", max_iters=1, seed=2))
    from safetensors.torch import load_file

    wa = load_file(str(tmp_path / "s1" / "checkpoints" / "iter_1" / "model.safetensors"))
    wb = load_file(str(tmp_path / "s2" / "checkpoints" / "iter_1" / "model.safetensors"))
    assert not torch.equal(wa["decoder.classifier.weight"], wb["decoder.classifier.weight"])
    assert torch.equal(wa["text_fg"], wb["text_fg"])  # the frozen CLIP does not depend on train.seed
    assert a["final_loss"] != b["final_loss"]

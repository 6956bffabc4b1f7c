"""Training on your own classes exactly as the README writes it, the schedule of a short run,
and the ``weclip-train`` / ``weclip-import`` command lines a user meets first."""
from __future__ import annotations

import csv
import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from training_world import tiny_train_config, write_world  # noqa: E402

from weclip_infer.config import ConfigError  # noqa: E402
from weclip_infer.training import load_train_config, lr_at  # noqa: E402
from weclip_infer.training.cli import main as train_main  # noqa: E402

COLORS = {"tomato": (220, 40, 30), "lime": (40, 210, 60), "sky": (50, 90, 230)}


def _custom_folder(root: Path, n: int = 6) -> Path:
    """Images in two sub-folders, ``labels.csv`` (image,labels with ';') and ``classes.txt``."""
    rng = np.random.default_rng(0)
    names = list(COLORS)
    rows = ["image,labels"]
    for k in range(n):
        sub = root / ("indoor" if k % 2 else "outdoor")
        sub.mkdir(parents=True, exist_ok=True)
        img = rng.integers(100, 150, (72, 88, 3), dtype=np.uint8)
        present = sorted({int(c) for c in rng.choice(len(names), size=int(rng.integers(1, 3)))})
        for c in present:
            y, x = int(rng.integers(0, 40)), int(rng.integers(0, 50))
            img[y:y + 28, x:x + 32] = COLORS[names[c]]
        Image.fromarray(img).save(sub / f"img_{k}.jpg", quality=92)
        rows.append(f"{sub.name}/img_{k}.jpg," + ";".join(names[c] for c in present))
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    (root / "classes.txt").write_text("\n".join(names) + "\n")
    return root


@pytest.mark.slow
def test_train_custom_classes_as_the_readme_says(tmp_path, monkeypatch, capsys):
    root = _custom_folder(tmp_path / "mine")
    out = tmp_path / "run"
    monkeypatch.chdir(tmp_path)  # labels.csv / classes.txt are found in data.root, not the cwd
    # the README line, with the built-in small CLIP and a small, CPU-sized run
    rc = train_main(["--config", "custom", f"data.root={root}", "data.labels_file=labels.csv",
                     "data.class_names_file=classes.txt", "model.backbone.clip_weights=demo",
                     "train.max_iters=10", "--device", "cpu", "--out", str(out),
                     "train.batch_size=2", "data.crop_size=96", "data.workers=0", "train.progress=false",
                     "train.tensorboard=false", "train.plots=false"])
    assert rc == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["iterations"] == 10 and np.isfinite(summary["final_loss"])
    resolved = yaml.safe_load((out / "config.yaml").read_text())["model"]
    assert resolved["text"]["class_names"] == list(COLORS)  # classes.txt defines the classes
    assert (resolved["refine"]["candidate_blocks"], resolved["refine"]["static_blocks"]) == (3, 4)  # of 6 blocks
    assert (resolved["decoder"]["dim"], resolved["decoder"]["num_heads"]) == (128, 4)  # width-128 demo CLIP

    from weclip_infer.checkpoint import load_checkpoint
    from weclip_infer.predictor import Segmenter

    model = load_checkpoint(summary["checkpoint"], device="cpu")
    assert list(model.classes.names) == list(COLORS) and model.num_classes == 4
    img = np.asarray(Image.open(root / "indoor" / "img_1.jpg").convert("RGB"))
    res = Segmenter(model, scales=(1.0,), flip=False, long_side=96).predict(img)
    assert res.labels.shape == img.shape[:2] and int(res.labels.max()) <= 3


def test_class_list_file_defines_the_classes_and_conflicts_name_keys(tmp_path):
    root = _custom_folder(tmp_path / "mine")
    base = ["model.backbone.clip_weights=demo", f"data.root={root}", "data.class_names_file=classes.txt"]
    cfg = load_train_config("weclip_infer/configs/custom.yaml", base)
    assert cfg.model.text.class_names == list(COLORS) and cfg.model.text.class_prompts is None
    with pytest.raises(ConfigError, match=r"model\.text\.class_names is set to \['cat', 'dog'\]"):
        load_train_config("weclip_infer/configs/custom.yaml", base + ["model.text.class_names=[cat, dog]"])
    with pytest.raises(ConfigError, match=r"model\.text\.class_prompts"):
        load_train_config("weclip_infer/configs/custom.yaml", base + ["model.text.class_prompts=[a red thing]"])
    with pytest.raises(ConfigError, match=r"data\.class_names_file"):
        load_train_config("weclip_infer/configs/custom.yaml", base[:2] + ["data.class_names_file=nope.txt"])
    # set explicitly and too deep for the 6-block demo CLIP: one line naming the key
    for key in ("candidate_blocks", "static_blocks"):
        with pytest.raises(ConfigError, match=rf"^model\.refine\.{key}=8 exceeds the backbone depth \(6 blocks\)"):
            load_train_config("weclip_infer/configs/custom.yaml", base + [f"model.refine.{key}=8"])
    cfg = load_train_config("weclip_infer/configs/custom.yaml", base + ["model.refine.static_blocks=null",
                                                                       "model.decoder.num_heads=0"])
    assert (cfg.model.refine.static_blocks, cfg.model.decoder.num_heads) == (4, 4)  # null and 0: follow it
    cfg = load_train_config("weclip_infer/configs/custom.yaml", base + ["model.decoder.dim=96"])
    assert (cfg.model.decoder.dim, cfg.model.decoder.num_heads) == (96, 3)  # heads follow an explicit width
    voc = load_train_config("weclip_infer/configs/voc.yaml")  # ViT-B/16 keeps the published numbers
    assert (voc.model.refine.candidate_blocks, voc.model.refine.static_blocks, voc.model.decoder.dim,
            voc.model.decoder.num_heads) == (6, 8, 256, 8)


# ------------------------------------------------------------------------------------------------
# schedule of a run shorter than the config's
# ------------------------------------------------------------------------------------------------

def test_short_run_scales_the_schedule_or_warns(caplog):
    demo = "weclip_infer/configs/demo.yaml"
    full = load_train_config(demo)
    assert (full.train.max_iters, full.train.warmup_iters, full.model.refine.rfm_switch_iter) == (1200, 50, 600)
    with caplog.at_level(logging.INFO, logger="weclip_infer"):
        short = load_train_config(demo, ["train.max_iters=60"])
    assert (short.train.warmup_iters, short.model.refine.rfm_switch_iter) == (2, 30)
    assert "train.warmup_iters 50 -> 2" in caplog.text and "model.refine.rfm_switch_iter 600 -> 30" in caplog.text
    lrs = [lr_at(s, short.train) for s in range(60)]
    peak = int(np.argmax(lrs))
    assert peak == short.train.warmup_iters and all(a < b for a, b in zip(lrs[:peak], lrs[1:peak + 1]))
    assert all(a >= b for a, b in zip(lrs[peak:], lrs[peak + 1:]))  # no cliff: one rise, then decay
    # values given on the command line are kept, and a schedule that cannot fit is a warning
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="weclip_infer"):
        kept = load_train_config(demo, ["train.max_iters=60", "train.warmup_iters=50",
                                        "model.refine.rfm_switch_iter=600"])
    assert (kept.train.warmup_iters, kept.model.refine.rfm_switch_iter) == (50, 600)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("RFM never switches on" in w for w in warnings)
    assert any("train.warmup_iters=50 is more than a tenth" in w for w in warnings)
    # a longer run than the config's is not stretched
    longer = load_train_config(demo, ["train.max_iters=2400"])
    assert (longer.train.warmup_iters, longer.model.refine.rfm_switch_iter) == (50, 600)


def test_sixty_iteration_run_warms_up_monotonically_and_switches_to_rfm(tmp_path):
    world = write_world(tmp_path / "world")
    cfg = tiny_train_config(world, tmp_path / "run", max_iters=1200, batch_size=1, warmup_iters=50)
    cfg["model"]["refine"]["rfm_switch_iter"] = 600
    cfg["model"]["par"]["num_iter"] = 1
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(cfg))
    assert train_main(["--config", str(p), "train.max_iters=60"]) == 0
    with open(tmp_path / "run" / "log.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    lrs = [float(r["lr"]) for r in rows]
    rfm = [int(r["rfm"]) for r in rows]
    assert len(rows) == 60
    peak = int(np.argmax(lrs))
    assert 0 < peak < 10 and all(a < b for a, b in zip(lrs[:peak], lrs[1:peak + 1]))
    assert all(a >= b for a, b in zip(lrs[peak:], lrs[peak + 1:]))
    assert rfm[0] == 0 and rfm[-1] == 1 and rfm.index(1) == 30  # forward 31 is the first with RFM


# ------------------------------------------------------------------------------------------------
# command lines
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["demo", "demo.yaml", "voc", "voc.yaml", "coco.yaml",
                                  "weclip_infer/configs/demo.yaml"])
def test_train_config_by_name_or_path(name, capsys):
    assert train_main(["--config", name, "--print-config", "--device", "cpu"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["train"]["device"] == "cpu" and printed["data"]["kind"] == name.split("/")[-1].split(".")[0]


def test_train_help_examples_run_and_errors_are_one_line(tmp_path, capsys):
    import shlex

    from weclip_infer.training.cli import EPILOG, build_parser

    help_text = build_parser().format_help()
    assert "spec" not in help_text.lower() and "``" not in help_text
    root = _custom_folder(tmp_path / "mine")
    examples = [shlex.split(line.split("#")[0]) for line in EPILOG.replace("\\\n", " ").splitlines()
                if "weclip_infer.train --config" in line]
    assert len(examples) >= 4
    for ex in examples:  # every example with --config resolves (data.root pointed at a real folder)
        args = ex[ex.index("weclip_infer.train") + 1:]
        args = [f"data.root={root}" if a.startswith("data.root=") else a for a in args]
        assert train_main(args + ["--print-config"]) == 0, (ex, capsys.readouterr().err)
    capsys.readouterr()
    assert train_main(["--config", "nope.yaml"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("weclip-train: error: config file not found")
    bad = tmp_path / "bad.yaml"
    bad.write_text("[" * 5000 + "]" * 5000)
    assert train_main(["--config", str(bad), "--print-config"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nested" in err and "Traceback" not in err


def test_import_help_is_for_a_user(capsys):
    from weclip_infer.checkpoint import main as import_main

    with pytest.raises(SystemExit) as e:
        import_main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for opt in ("--clip", "--dataset", "--out", "--include-backbone", "--debug", "examples:"):
        assert opt in out
    assert "``" not in out and "Pass ``model``" not in out  # not a Python docstring
    assert import_main([str(Path("missing.pth")), "--clip", "openai", "--out", "x"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "reference checkpoint not found" in err


def test_weclip_import_refuses_to_overwrite(tmp_path, capsys):
    from weclip_infer.checkpoint import main as import_main

    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert import_main([str(tmp_path / "missing.pth"), "--clip", "openai", "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"

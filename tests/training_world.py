"""A tiny VOC-layout world and a tiny training config shared by the training tests.

A tiny random CLIP (4 blocks, width 64, 64-px input) and coloured rectangles on noise keep every
run to a few seconds on one CPU thread.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ["red", "green", "blue"]
COLORS = [(220, 30, 30), (30, 200, 40), (40, 60, 230)]


def write_world(root: Path, n_train: int = 8, n_val: int = 3, size=(64, 64), seed: int = 0) -> Path:
    """VOC layout: coloured rectangles on noise, exact masks, train.txt/val.txt."""
    rng = np.random.default_rng(seed)
    (root / "JPEGImages").mkdir(parents=True, exist_ok=True)
    (root / "SegmentationClassAug").mkdir(parents=True, exist_ok=True)
    lists = {"train": [], "val": []}
    for split, n in (("train", n_train), ("val", n_val)):
        for k in range(n):
            H, W = size if split == "train" or k % 2 == 0 else (size[0] + 16, size[1] - 8)
            img = rng.integers(90, 160, size=(H, W, 3), dtype=np.uint8)
            mask = np.zeros((H, W), np.uint8)
            for _ in range(int(rng.integers(1, 3))):
                c = int(rng.integers(0, len(CLASSES)))
                h, w = int(rng.integers(H // 4, H // 2)), int(rng.integers(W // 4, W // 2))
                y, x = int(rng.integers(0, H - h)), int(rng.integers(0, W - w))
                img[y:y + h, x:x + w] = COLORS[c]
                mask[y:y + h, x:x + w] = c + 1
            name = f"{split}_{k:03d}"
            Image.fromarray(img).save(root / "JPEGImages" / f"{name}.jpg", quality=95)
            Image.fromarray(mask, mode="L").save(root / "SegmentationClassAug" / f"{name}.png")
            lists[split].append(name)
    for split, names in lists.items():
        (root / f"{split}.txt").write_text("".join(n + "\n" for n in names))
    return root


def tiny_train_config(root: Path, out: Path, **train) -> dict:
    t = {"max_iters": 4, "batch_size": 2, "seed": 1, "device": "cpu", "log_every": 2, "eval_every": 0,
         "eval_at_end": False, "checkpoint_every": 0, "progress": False, "tensorboard": False, "plots": False,
         "num_panels": 1, "out_dir": str(out)}
    t.update(train)
    return {
        "model": {
            "backbone": {"clip_weights": "random", "model_cfg": {
                "embed_dim": 64,
                "vision_cfg": {"image_size": 64, "layers": 4, "width": 64, "patch_size": 16, "head_width": 32},
                "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}},
            "text": {"dataset": "custom", "class_names": list(CLASSES), "bg_prompts": ["grey noise", "stone"]},
            "decoder": {"dim": 32, "num_heads": 4, "num_layers": 1},
            "refine": {"candidate_blocks": 2, "static_blocks": 3, "rfm_switch_iter": 4},
            "par": {"num_iter": 3, "dilations": [1, 2]},
            "inference": {"long_side": 64, "scales": [1.0, 0.75], "flip": True},
        },
        "train": t,
        "data": {"kind": "voc", "root": str(root), "train_split": "train", "val_split": "val", "crop_size": 64,
                 "workers": 0},
    }

"""Shared fixtures: a tiny random CLIP-style WeCLIP for fast tests, and the full-size random
OpenAI-format ViT-B/16 that the reference fixture was computed with (generated on demand)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach for the network
torch.set_num_threads(int(os.environ.get("WECLIP_TEST_THREADS", "1")))

REPO = Path(__file__).resolve().parents[1]


def _find_shared() -> Path:
    for cand in (os.environ.get("WECLIP_SHARED"), REPO.parent / "shared", REPO / "shared"):
        if cand and (Path(cand) / "fixtures" / "reference").is_dir():
            return Path(cand)
    return REPO.parent / "shared"


SHARED = _find_shared()
FIXTURE_DIR = SHARED / "fixtures" / "reference"
CACHE = Path(os.environ.get("WECLIP_TEST_CACHE", Path.home() / ".cache" / "weclip_infer" / "tests"))

TINY_CLIP_CFG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": 4, "width": 64, "patch_size": 16, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def tiny_config(**over) -> dict:
    cfg = {
        "backbone": {"clip_weights": "random", "model_cfg": TINY_CLIP_CFG, "seed": 0},
        "text": {"dataset": "custom", "class_names": ["red box", "green box", "blue box"], "bg_prompts": ["noise", "grey"]},
        "decoder": {"dim": 32, "num_heads": 4, "num_layers": 1},
        "refine": {"candidate_blocks": 2, "static_blocks": 3, "cam_logit_scale": 10.0},
        "par": {"num_iter": 3, "dilations": [1, 2]},
    }
    for k, v in over.items():
        cfg.setdefault(k, {}).update(v)
    return cfg


@pytest.fixture(scope="session")
def tiny_model():
    from weclip_infer import build_model

    torch.manual_seed(0)
    return build_model(tiny_config(), device="cpu")


@pytest.fixture(scope="session")
def reference():
    import numpy as np

    f = FIXTURE_DIR / "reference_train320.npz"
    if not f.is_file():
        pytest.skip(f"reference fixture not found at {f} (set WECLIP_SHARED)")
    return dict(np.load(f))


@pytest.fixture(scope="session")
def reference_clip_path() -> Path:
    """The seeded random OpenAI-format ViT-B/16 state dict of the reference fixture (~300 MB)."""
    script = FIXTURE_DIR / "make_random_clip.py"
    if not script.is_file():
        pytest.skip("reference fixture script not found")
    out = CACHE / "reference_random_vitb16.pt"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        subprocess.run([sys.executable, str(script), str(tmp)], check=True, timeout=600)
        tmp.rename(out)
    return out


@pytest.fixture(scope="session")
def reference_model(reference_clip_path):
    from weclip_infer import import_reference_checkpoint

    m = import_reference_checkpoint(FIXTURE_DIR / "weclip_decoder_random.pth",
                                    {"backbone": {"clip_weights": str(reference_clip_path)}, "text": {"dataset": "voc"}},
                                    device="cpu")
    return m.eval()  # the fixture was computed with Dropout2d off

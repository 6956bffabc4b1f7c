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
# Checkpoints run eagerly in tests unless a test asks for the processor-chosen path
# (tests/test_fastpath.py does): exact comparisons against eager models stay meaningful on every CPU.
os.environ.setdefault("WECLIP_BACKEND", "eager")
torch.set_num_threads(int(os.environ.get("WECLIP_TEST_THREADS", "1")))

REPO = Path(__file__).resolve().parents[1]


def _find_shared() -> Path:
    for cand in (os.environ.get("WECLIP_SHARED"), REPO.parent / "shared", REPO / "shared"):
        if cand and (Path(cand) / "fixtures" / "reference").is_dir():
            return Path(cand)
    return REPO.parent / "shared"


SHARED = _find_shared()


def _require_fixture(path: Path) -> None:
    """Skip when a reference-fixture file is missing, saying where it was looked for and how to
    point at it; under CI (``CI=true``) its absence fails the test instead."""
    if path.is_file():
        return
    msg = (f"reference fixture file not found: {path} (set WECLIP_SHARED to the folder that holds "
           f"fixtures/reference/, e.g. WECLIP_SHARED=/path/to/shared)")
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(msg + "; CI requires the reference fixture", pytrace=False)
    pytest.skip(msg)
FIXTURE_DIR = SHARED / "fixtures" / "reference"
CACHE = Path(os.environ.get("WECLIP_TEST_CACHE", Path.home() / ".cache" / "weclip_infer" / "tests"))

from weclip_infer.testing import TINY_CLIP_CFG, tiny_config  # noqa: E402,F401 - re-exported for fixtures


def _build_tiny():
    from weclip_infer import build_model

    torch.manual_seed(0)
    return build_model(tiny_config(), device="cpu")


@pytest.fixture
def tiny_model():
    """A fresh tiny random model per test (tests may switch it between train and eval, or train it)."""
    return _build_tiny()


@pytest.fixture(scope="session")
def shared_tiny_model():
    """One tiny model for session/module fixtures that only save or export it; never mutate it."""
    return _build_tiny()


@pytest.fixture(scope="session")
def reference():
    import numpy as np

    f = FIXTURE_DIR / "reference_train320.npz"
    _require_fixture(f)
    return dict(np.load(f))


@pytest.fixture(scope="session")
def reference_clip_path() -> Path:
    """The seeded random OpenAI-format ViT-B/16 state dict of the reference fixture (~300 MB)."""
    script = FIXTURE_DIR / "make_random_clip.py"
    _require_fixture(script)
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

    cfg = {"backbone": {"clip_weights": str(reference_clip_path)}, "text": {"dataset": "voc"}}
    m = import_reference_checkpoint(FIXTURE_DIR / "weclip_decoder_random.pth", cfg, device="cpu")
    return m.eval()  # the fixture was computed with Dropout2d off


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """The reference fixture folder (required files checked)."""
    _require_fixture(FIXTURE_DIR / "weclip_decoder_random.pth")
    return FIXTURE_DIR


# Markers follow from the fixtures a test uses, so no test can forget them: `make test-fast`
# deselects by marker (see pyproject.toml for the list).
_FIXTURE_MARKERS = {
    "reference": ("reference",),
    "reference_dir": ("reference",),
    "reference_clip_path": ("reference", "fullsize", "slow"),
    "reference_model": ("reference", "fullsize", "slow"),
    "server": ("serve", "slow"),
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        for fx, marks in _FIXTURE_MARKERS.items():
            if fx in names:
                for m in marks:
                    item.add_marker(getattr(pytest.mark, m))

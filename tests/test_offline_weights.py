"""A pretrained CLIP tag without network fails at once, naming the local-file option."""
from __future__ import annotations

import os
import socket
import time

import pytest

from weclip_infer.backbone import WeightsUnavailableError, load_clip
from weclip_infer.config import BackboneConfig

hub_constants = pytest.importorskip("huggingface_hub.constants")


def _no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network disabled by the test")

    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.mark.parametrize("env", [None, "1"])
def test_openai_tag_without_network_fails_fast(monkeypatch, tmp_path, env):
    # The hub reads HF_HUB_OFFLINE once at import; here it was imported "online", and the
    # variable (unset, or set only now at run time) must still lead to an immediate failure.
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    if env is None:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    else:
        monkeypatch.setenv("HF_HUB_OFFLINE", env)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    _no_network(monkeypatch)
    t0 = time.monotonic()
    with pytest.raises(WeightsUnavailableError, match="local file") as ei:
        load_clip(BackboneConfig(clip_weights="openai"))
    elapsed = time.monotonic() - t0
    assert "offline" in str(ei.value)
    # a correctness bound, not a benchmark: the hub's retry loop takes ~45 s, the cache check ~0 s
    assert elapsed < 15, f"offline failure took {elapsed:.1f} s"
    # the hub's switch and the environment are left as they were
    assert hub_constants.HF_HUB_OFFLINE is False
    assert os.environ.get("HF_HUB_OFFLINE") == env

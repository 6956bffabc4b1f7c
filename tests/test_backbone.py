"""Weight sources of the frozen CLIP: every source is tested, and so is the offline behaviour."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from weclip_infer.backbone import FrozenCLIP, WeightsUnavailableError, load_clip, resize_pos_embed, save_clip
from weclip_infer.config import BackboneConfig
from weclip_infer.testing import TINY_CLIP_CFG


def _tiny_openai_clip():
    """A tiny open_clip CLIP with QuickGELU: its state-dict keys are OpenAI's format."""
    # OpenAI's format implies 64-dim attention heads (the loader infers heads = width // 64)
    mcfg = {"embed_dim": 64, "quick_gelu": True,
            "vision_cfg": {"image_size": 64, "layers": 3, "width": 128, "patch_size": 16, "head_width": 64},
            "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 2}}
    cfg = BackboneConfig(clip_weights="random", model_cfg=mcfg, seed=3)
    return load_clip(cfg)


def _script_archive(sd: dict, path):
    """Write ``sd`` as a TorchScript archive whose state_dict() has exactly these keys, like
    OpenAI's released ``ViT-B-16.pt``."""

    class Holder(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    root = Holder()
    for key, value in sd.items():
        *mods, leaf = key.split(".")
        m = root
        for name in mods:
            if not hasattr(m, name):
                m.add_module(name, Holder())
            m = getattr(m, name)
        if value.is_floating_point() and value.dim() > 0:
            m.register_parameter(leaf, nn.Parameter(value.clone(), requires_grad=False))
        else:
            m.register_buffer(leaf, value.clone())
    torch.jit.save(torch.jit.script(root), str(path))


def _embed(clip, x):
    bb = FrozenCLIP(clip)
    with torch.no_grad():
        f, a, _ = bb.forward_features(x, num_blocks=bb.num_blocks)
        return bb.pooled_embedding(f[-1])


def test_openai_torchscript_archive_and_plain_state_dict(tmp_path):
    clip = _tiny_openai_clip()
    sd = {k: v.half() if v.is_floating_point() else v for k, v in clip.state_dict().items()}  # OpenAI ships fp16
    sd.update(input_resolution=torch.tensor(64), context_length=torch.tensor(16), vocab_size=torch.tensor(49408))
    jit_path, plain_path = tmp_path / "ViT-tiny.pt", tmp_path / "plain.pt"
    _script_archive(sd, jit_path)
    torch.save(sd, plain_path)
    x = torch.randn(2, 3, 96, 80)
    ref = _embed(clip.half().float(), x)  # same fp16-rounded values
    for path in (jit_path, plain_path):
        loaded = load_clip(BackboneConfig(clip_weights=str(path)))
        assert all(p.dtype == torch.float32 for p in loaded.parameters())
        torch.testing.assert_close(_embed(loaded, x), ref, atol=1e-5, rtol=1e-4)


def test_open_clip_checkpoint_file(tmp_path):
    clip = load_clip(BackboneConfig(clip_weights="random", model_cfg=TINY_CLIP_CFG, seed=5))
    path = tmp_path / "open_clip_ckpt.pt"
    torch.save({"state_dict": {"module." + k: v for k, v in clip.state_dict().items()}}, path)
    loaded = load_clip(BackboneConfig(clip_weights=str(path), model_cfg=TINY_CLIP_CFG))
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(_embed(loaded, x), _embed(clip, x))


def test_our_safetensors_roundtrip_with_conv_stem(tmp_path):
    cfg = BackboneConfig(clip_weights="random", model_cfg=TINY_CLIP_CFG, patch_stem="conv", seed=1)
    clip = load_clip(cfg)
    path = tmp_path / "clip.safetensors"
    save_clip(clip, path, TINY_CLIP_CFG, patch_stem="conv")
    loaded = load_clip(BackboneConfig(clip_weights=str(path)))
    x = torch.randn(1, 3, 70, 50)
    torch.testing.assert_close(_embed(loaded, x), _embed(clip, x))


def test_missing_file_and_garbage_file(tmp_path):
    with pytest.raises(WeightsUnavailableError, match="not found"):
        load_clip(BackboneConfig(clip_weights=str(tmp_path / "nope.pt")))
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsUnavailableError, match="cannot read"):
        load_clip(BackboneConfig(clip_weights=str(bad)))


def test_openai_tag_offline_fails_fast_with_local_file_hint(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    import socket

    attempts = []

    def no_network(*args, **kwargs):  # the hub's retry loop would land here: record it and refuse
        attempts.append(args)
        raise OSError("network disabled by the test")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    with pytest.raises(WeightsUnavailableError, match="local file"):
        load_clip(BackboneConfig(clip_weights="openai"))
    assert attempts == []  # offline means no connection attempt at all, so the failure is immediate


def test_pos_embed_resize_identity_and_shape():
    pos = torch.randn(1 + 14 * 14, 8)
    torch.testing.assert_close(resize_pos_embed(pos, 14, 14), pos)
    out = resize_pos_embed(pos, 20, 13)
    assert out.shape == (1 + 20 * 13, 8)
    torch.testing.assert_close(out[0], pos[0])


def test_full_size_openai_file_loads(reference_clip_path):
    clip = load_clip(BackboneConfig(clip_weights=str(reference_clip_path)))
    bb = FrozenCLIP(clip)
    assert bb.num_blocks == 12 and bb.width == 768 and bb.patch_size == 16
    assert abs(float(bb.logit_scale_exp) - 100.0) < 0.1  # Appendix B


def test_random_clip_is_seeded_without_touching_the_global_rng():
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    a = load_clip(BackboneConfig(clip_weights="random", model_cfg=TINY_CLIP_CFG, seed=5))
    assert torch.equal(torch.random.get_rng_state(), state)
    torch.manual_seed(999)  # a different global state gives the same weights: only cfg.seed counts
    b = load_clip(BackboneConfig(clip_weights="random", model_cfg=TINY_CLIP_CFG, seed=5))
    c = load_clip(BackboneConfig(clip_weights="random", model_cfg=TINY_CLIP_CFG, seed=6))
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)

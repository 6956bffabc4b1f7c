"""Tests of weclip_infer.packed_linear: ready bf16 weights (packed on CPU, cast on GPUs) give
autocast's exact products, follow changes of the weights, and stay out of copies, pickles and the
fp32 / gradient paths."""
from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F

from weclip_infer import build_model, packed_linear
from weclip_infer.backbone import FrozenCLIP
from weclip_infer.packed_linear import PackedLinears, packed_bf16_available
from weclip_infer.testing import tiny_config

needs_packed = pytest.mark.skipif(not packed_bf16_available(), reason="no native bf16 oneDNN products on this CPU")


def _autocast_linear(x, w, b):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return F.linear(x, w, b)


@needs_packed
@pytest.mark.parametrize("rows", [1, 7, 433, 1538])
@pytest.mark.parametrize("with_bias", [True, False])
def test_packed_product_equals_autocast_linear_bit_for_bit(rows, with_bias):
    g = torch.Generator().manual_seed(rows)
    w, b = torch.randn(96, 64, generator=g), torch.randn(96, generator=g) if with_bias else None
    x = torch.randn(2, rows, 64, generator=g)
    cache = PackedLinears()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = cache.linear(x, w, b)
    ref = _autocast_linear(x, w, b)
    assert y.dtype == torch.bfloat16 and y.shape == (2, rows, 96)
    assert torch.equal(y, ref)
    assert len(cache) == 1 and cache.nbytes == 96 * 64 * 2 + (96 * 2 if with_bias else 0)
    # bf16 input outside autocast takes the same path
    assert torch.equal(cache.linear(x.bfloat16(), w, b), ref)


@needs_packed
def test_packed_weights_follow_in_place_writes_and_new_tensors():
    w, b = torch.randn(32, 16), torch.randn(32)
    x = torch.randn(5, 16)
    cache = PackedLinears()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        first = cache.linear(x, w, b)
        w.mul_(2)  # e.g. load_state_dict copies into the same parameter
        second = cache.linear(x, w, b)
        b.add_(1)
        third = cache.linear(x, w, b)
    assert not torch.equal(first, second) and torch.equal(second, _autocast_linear(x, w, b - 1))
    assert torch.equal(third, _autocast_linear(x, w, b))
    assert len(cache) == 1  # rebuilt in place, not accumulated


def test_fp32_and_gradient_paths_stay_plain_linear():
    w = torch.randn(8, 4)
    x = torch.randn(3, 4)
    cache = PackedLinears()
    assert torch.equal(cache.linear(x, w), F.linear(x, w)) and len(cache) == 0  # fp32: untouched
    xg = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = cache.linear(xg, w)
    y.float().sum().backward()  # the packed op has no backward: gradients take F.linear
    assert xg.grad is not None and len(cache) == 0


@needs_packed
def test_model_bf16_segment_is_unchanged_and_copies_start_empty(monkeypatch):
    torch.manual_seed(0)
    model = build_model(tiny_config(), device="cpu").eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        fast = model.segment(x, precision="bf16")
        bb: FrozenCLIP = model.backbone
        packed = bb.packed_linears("bf16", "cpu")
        n_run = max(model.feature_blocks, bb.num_blocks - 1)  # the blocks the inference forward runs
        assert packed is not None and len(packed) == 4 * n_run  # qkv, out, fc, proj of each
        assert bb.packed_linears("fp32", "cpu") is None and bb.packed_linears("fp32", "cuda") is None
        assert bb.packed_linears("bf16", "cuda") is packed  # GPUs keep bf16 copies (cast, not packed)
        monkeypatch.setattr(FrozenCLIP, "packed_linears", lambda self, precision, device_type: None)
        plain = model.segment(x, precision="bf16")
    assert torch.equal(fast, plain)
    twin = copy.deepcopy(model)
    assert len(twin.backbone._packed) == 0 and len(model.backbone._packed) == 4 * n_run
    assert len(pickle.loads(pickle.dumps(model.backbone._packed))) == 0
    model.to(torch.float64)  # moving or casting the model drops its packed copies
    assert len(model.backbone._packed) == 0


@needs_packed
def test_cast_weights_path_of_gpus_equals_autocast_linear(monkeypatch):
    """The GPU form (bf16 copies multiplied by ``F.linear``, no packing) run on this CPU: the same
    products as autocast, from plain bf16 copies of the weights."""
    monkeypatch.setattr(packed_linear, "_uses_packed_ops", lambda device: False)
    g = torch.Generator().manual_seed(3)
    w, b = torch.randn(48, 32, generator=g), torch.randn(48, generator=g)
    x = torch.randn(3, 17, 32, generator=g)
    cache = PackedLinears()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = cache.linear(x, w, b)
    assert torch.equal(y, _autocast_linear(x, w, b))
    (_, w16, b16, _), = cache._entries.values()
    assert not w16.is_mkldnn and torch.equal(w16, w.bfloat16()) and torch.equal(b16, b.bfloat16())


@needs_packed
def test_entries_go_with_their_weights():
    cache = PackedLinears()
    x = torch.randn(2, 8)
    w = torch.randn(4, 8)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        cache.linear(x, w)
        assert len(cache) == 1
        del w  # e.g. load_state_dict(assign=True) replaced the parameter
        assert len(cache) == 0

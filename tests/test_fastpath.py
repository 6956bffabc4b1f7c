"""The processor-aware inference path: ISA detection, the choice it makes, and the cached ONNX
Runtime export that a checkpoint directory runs on where ONNX Runtime is faster."""
from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

from weclip_infer.hardware import CpuFeatures, _parse_cpuinfo, cpu_features, inference_path, matmul_peaks


def test_cpuinfo_parsing_and_isa_levels():
    model, flags = _parse_cpuinfo("processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu avx2 fma avx512f "
                                  "avx512_bf16 avx512_vnni sse4_2\n\nprocessor\t: 1\nflags\t: fpu\n")
    assert model == "Some CPU"
    assert flags == {"avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni"}
    assert CpuFeatures("x", "x86_64", flags).isa == "avx512_bf16"
    assert CpuFeatures("x", "x86_64", frozenset({"avx2", "fma"})).isa == "avx2"
    assert CpuFeatures("x", "x86_64", frozenset({"avx512f"})).isa == "avx512"
    assert CpuFeatures("x", "x86_64", frozenset({"avx512f", "amx_tile", "amx_bf16"})).isa == "amx"
    assert CpuFeatures("x", "aarch64", frozenset()).isa == "baseline"
    assert cpu_features().arch  # this machine parses


def test_inference_path_choice():
    avx512 = CpuFeatures("x", "x86_64", frozenset({"avx2", "avx512f"}))
    avx2 = CpuFeatures("x", "x86_64", frozenset({"avx2"}))
    assert inference_path("cpu", avx512, ort_available=True)[0] == "onnx"
    assert inference_path("cpu", avx512, ort_available=False)[0] == "eager"
    assert inference_path("cpu", avx2, ort_available=True)[0] == "eager"
    assert inference_path("cuda:0", avx512, ort_available=True)[0] == "eager"
    assert "AVX2" in inference_path("cpu", avx2, ort_available=True)[1]
    # bf16 inference runs eager everywhere: the exported graphs are fp32
    assert inference_path("cpu", avx512, ort_available=True, precision="bf16")[0] == "eager"


def test_matmul_peaks_small():
    peaks = matmul_peaks(64, 64, 64, min_time=0.01)
    assert {"torch_fp32", "torch_bf16"} <= set(peaks)
    assert all(v > 0 for v in peaks.values())


@pytest.mark.slow
def test_checkpoint_on_cached_onnx_equals_eager(tiny_model, tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    from weclip_infer import Segmenter, onnx_cache, save_checkpoint

    ck = save_checkpoint(tiny_model, tmp_path / "ck", include_backbone=True)
    monkeypatch.setenv("WECLIP_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("WECLIP_BACKEND", raising=False)
    img = (np.random.RandomState(0).rand(70, 90, 3) * 255).astype(np.uint8)
    eager = Segmenter.from_pretrained(ck, backend="eager", long_side=64)
    fast = Segmenter.from_pretrained(ck, backend="onnx", long_side=64)
    assert fast.model is None  # runs on ONNX Runtime, not on an eager model
    a, b = eager.predict(img), fast.predict(img)
    torch.testing.assert_close(b.logits, a.logits, rtol=1e-4, atol=1e-4)
    assert (a.labels == b.labels).mean() > 0.999
    entries = list((tmp_path / "cache" / "onnx").iterdir())
    assert len(entries) == 1 and (entries[0] / "model.onnx").is_file()
    # a second load re-uses the entry (no export: the file is not rewritten)
    mtime = (entries[0] / "model.onnx").stat().st_mtime_ns
    Segmenter.from_pretrained(ck, backend="onnx", long_side=64)
    assert (entries[0] / "model.onnx").stat().st_mtime_ns == mtime
    # a different checkpoint gets its own entry
    with torch.no_grad():
        tiny_model.decoder.fuse.weight.add_(0.1)
    ck2 = save_checkpoint(tiny_model, tmp_path / "ck2", include_backbone=True)
    assert onnx_cache.checkpoint_digest(ck2) != onnx_cache.checkpoint_digest(ck)
    # auto follows the processor (and WECLIP_BACKEND overrides it)
    monkeypatch.setenv("WECLIP_BACKEND", "eager")
    assert Segmenter.from_pretrained(ck, long_side=64).model is not None
    monkeypatch.setenv("WECLIP_BACKEND", "bogus")
    with pytest.raises(ValueError, match="WECLIP_BACKEND"):
        Segmenter.from_pretrained(ck)
    with pytest.raises(ValueError, match="export bundle"):
        Segmenter.from_pretrained(ck, backend="torchscript")


def test_bf16_precision_keys_are_close_and_leave_no_global_state():
    """``backbone.precision`` is the frozen CLIP of the training step (and the label path);
    ``inference.precision`` is the inference forward (CLIP + decoder). Each changes only its own
    path, stays close to fp32, returns fp32 tensors and leaves no global state behind."""
    from weclip_infer import build_model
    from weclip_infer.testing import tiny_config

    torch.manual_seed(0)
    m32 = build_model(tiny_config(), device="cpu").eval()
    m16 = build_model(tiny_config(backbone={"precision": "bf16"}), device="cpu").eval()
    m16.decoder.load_state_dict(m32.decoder.state_dict())
    x = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(1))
    flag = torch.backends.mkldnn.matmul.fp32_precision
    with torch.no_grad():
        a = m32.segment(x)
        assert torch.equal(m16.segment(x), a)  # backbone.precision leaves inference alone
        b = m32.segment(x, precision="bf16")
        m32.cfg.inference.precision = "bf16"
        assert torch.equal(m32.segment(x), b)  # the config key is the default of the argument
        m32.cfg.inference.precision = "fp32"
        with pytest.raises(ValueError, match="precision"):
            m32.segment(x, precision="fp16")
    assert b.dtype == torch.float32
    assert 0 < float((a - b).abs().max() / a.abs().max()) < 5e-2  # bf16 differs, but only slightly
    # the training step's frozen features follow backbone.precision; its attention maps stay fp32
    f32, at32, _ = m32._features(x, attn_blocks=2, pooled=True)
    f16, at16, _ = m16._features(x, attn_blocks=2, pooled=True)
    assert f16[0].dtype == at16[0].dtype == torch.float32
    assert not torch.equal(f16[-1], f32[-1])
    assert float((f16[-1] - f32[-1]).abs().max() / f32[-1].abs().max()) < 5e-2
    assert float((at16[-1] - at32[-1]).abs().max()) < 2e-2  # softmax maps, entries in [0, 1]
    torch.testing.assert_close(at16[-1].sum(-1), torch.ones_like(at16[-1][..., 0]), atol=2e-2, rtol=0)
    out = m16.train()(x, torch.tensor([[1.0, 0, 1], [0, 1, 0]]))
    assert torch.isfinite(out["loss"])
    assert torch.backends.mkldnn.matmul.fp32_precision == flag
    assert not torch.is_autocast_enabled("cpu")


def test_segmenter_precision_option(tiny_model, tmp_path, monkeypatch):
    """``Segmenter(precision=...)`` runs the network in bf16 without touching the caller's model;
    checkpoints with bf16 run eager on ``auto``; exported graphs refuse bf16."""
    from weclip_infer import Segmenter, save_checkpoint

    img = (np.random.RandomState(0).rand(70, 90, 3) * 255).astype(np.uint8)
    a = Segmenter(tiny_model, long_side=64).predict(img)
    seg16 = Segmenter(tiny_model, long_side=64, precision="bf16")
    b = seg16.predict(img)
    assert seg16.precision == "bf16" and tiny_model.cfg.inference.precision == "fp32"
    assert not torch.equal(a.logits, b.logits) and (a.labels == b.labels).mean() > 0.9
    with pytest.raises(ValueError, match="precision"):
        Segmenter(tiny_model, precision="half")
    with pytest.raises(ValueError, match="eager model"):
        Segmenter(backend=lambda x: x, precision="bf16")
    ck = save_checkpoint(tiny_model, tmp_path / "ck", include_backbone=True)
    monkeypatch.delenv("WECLIP_BACKEND", raising=False)
    monkeypatch.setenv("WECLIP_CACHE_DIR", str(tmp_path / "cache"))
    loaded = Segmenter.from_pretrained(ck, precision="bf16", long_side=64)
    assert loaded.model is not None and loaded.precision == "bf16"  # eager, whatever the processor
    torch.testing.assert_close(loaded.predict(img).logits, b.logits)
    with pytest.raises(ValueError, match="ONNX Runtime path is fp32"):
        Segmenter.from_pretrained(ck, backend="onnx", precision="bf16")
    assert not (tmp_path / "cache").exists()  # refused before any export


def test_fp32_fast_matmul_keeps_fp32_accuracy_and_restores_the_flag():
    from weclip_infer.hardware import fast_fp32_matmul_available, frozen_clip_arithmetic

    ok, reason = fast_fp32_matmul_available()
    assert reason
    g = torch.Generator().manual_seed(0)
    a = torch.randn(300, 768, generator=g, dtype=torch.float64)
    b = torch.randn(768, 200, generator=g, dtype=torch.float64)
    ref = a @ b
    before = torch.backends.mkldnn.matmul.fp32_precision
    with frozen_clip_arithmetic("fp32", "cpu") as path:
        got = torch.mm(a.float(), b.float()).double()
        assert ("oneDNN" in path) == ok
    assert float((got - ref).abs().max() / ref.abs().max()) < 1e-5  # fp32-level, never bf16-level
    assert torch.backends.mkldnn.matmul.fp32_precision == before
    with pytest.raises(RuntimeError):
        with frozen_clip_arithmetic("fp32", "cpu"):
            raise RuntimeError("boom")
    assert torch.backends.mkldnn.matmul.fp32_precision == before


def test_attention_paths_agree():
    """The one attention helper: SDPA (fp32, no map), explicit products (fp32 with a map) and
    the explicit bf16 path give the same result to their precision; maps are fp32 and sum to 1."""
    from weclip_infer.tensor_ops import attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 37, 16, generator=g) for _ in range(3))
    ref = torch.softmax(q @ k.transpose(-2, -1) / 4.0, dim=-1)
    out, none = attention(q, k, v)
    assert none is None
    torch.testing.assert_close(out, ref @ v, rtol=1e-5, atol=1e-5)
    out_m, amap = attention(q, k, v, need_map=True)
    torch.testing.assert_close(out_m, ref @ v, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(amap, ref.mean(1))
    out16, map16 = attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), need_map=True)
    assert out16.dtype == torch.bfloat16 and map16 is not None and map16.dtype == torch.float32
    assert float((out16.float() - ref @ v).abs().max()) < 3e-2
    assert float((map16 - ref.mean(1)).abs().max()) < 1e-2
    torch.testing.assert_close(map16.sum(-1), torch.ones(2, 37), atol=1e-2, rtol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as inside a bf16 region: the map stays bf16-computed
        out_ac, _ = attention(q.bfloat16(), k.bfloat16(), v.bfloat16())
    assert out_ac.dtype == torch.bfloat16


def test_bf16_attention_softmax_in_place_is_exact_and_differentiable():
    """On CPU in bf16 the softmax overwrites its scores: the same bits as the out-of-place
    softmax, and where a gradient is needed it stays out of place (gradients flow)."""
    from weclip_infer.tensor_ops import attention

    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 3, 29, 16, generator=g).bfloat16() for _ in range(3))
    with torch.no_grad():
        out, _ = attention(q, k, v)
        out_m, amap = attention(q, k, v, need_map=True)
        a = torch.softmax((q * 0.25) @ k.transpose(-2, -1), dim=-1)
    assert torch.equal(out, a @ v) and torch.equal(out_m, a @ v)
    assert torch.equal(amap, a.mean(dim=1, dtype=torch.float32))
    qg = q.clone().requires_grad_(True)
    out_g, _ = attention(qg, k, v)
    out_g.float().sum().backward()
    assert torch.equal(out_g.detach(), out) and qg.grad is not None and bool(qg.grad.abs().sum() > 0)


def test_bf16_attention_scores_are_bounded(monkeypatch):
    """Beyond ATTENTION_SCORE_BYTES the bf16 path takes query rows a block at a time: the peak
    score block stays under the budget and the result equals the unblocked one."""
    from weclip_infer import tensor_ops

    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 3, 50, 16, generator=g).bfloat16() for _ in range(3))
    whole, _ = tensor_ops.attention(q, k, v)
    sizes = []
    real_softmax = tensor_ops._softmax_in_place

    def spy(x):
        sizes.append(x.numel() * x.element_size())
        return real_softmax(x)

    budget = 2 * 3 * 50 * 2 * 7  # seven query rows of scores
    monkeypatch.setattr(tensor_ops, "ATTENTION_SCORE_BYTES", budget)
    monkeypatch.setattr(tensor_ops, "_softmax_in_place", spy)
    blocked, _ = tensor_ops.attention(q, k, v)
    assert len(sizes) == 8 and max(sizes) <= budget  # ceil(50 / 7) blocks
    torch.testing.assert_close(blocked, whole, rtol=0, atol=1e-2)


def test_training_step_under_fp32_matmul_matches_plain_fp32():
    """The training loop runs each step in ``fp32_matmul``: gradients stay at fp32 accuracy
    (equal where the CPU has no split-bf16 kernels) and the global flag is restored."""
    from weclip_infer import build_model
    from weclip_infer.hardware import fp32_matmul
    from weclip_infer.testing import tiny_config

    torch.manual_seed(0)
    model = build_model(tiny_config(), device="cpu").train()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    cls = torch.tensor([[1.0, 0, 1], [0, 1, 0]])
    grads = []
    before = torch.backends.mkldnn.matmul.fp32_precision
    for fast in (False, True):
        model.decoder.zero_grad(set_to_none=True)
        torch.manual_seed(1)  # the same dropout mask
        with fp32_matmul("cpu") if fast else contextlib.nullcontext():
            model(x, cls, use_rfm=False)["loss"].backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.decoder.parameters() if p.grad is not None]))
    assert torch.backends.mkldnn.matmul.fp32_precision == before
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("key", ["backbone", "inference"])
def test_precision_keys_are_validated(key):
    from weclip_infer.config import ConfigError, load_config

    assert load_config({key: {"precision": "bf16"}}).__getattribute__(key).precision == "bf16"
    with pytest.raises(ConfigError, match=f"{key}.precision"):
        load_config({key: {"precision": "fp16"}})


def test_fp32_matmul_from_overlapping_threads_restores_the_flag():
    """The oneDNN setting is process-wide: threads that enter and leave the context out of order
    (a server answering requests in parallel) must leave it as they found it, and it stays set
    while any of them is inside."""
    import threading

    from weclip_infer.hardware import fast_fp32_matmul_available, fp32_matmul

    before = torch.backends.mkldnn.matmul.fp32_precision
    inside = threading.Barrier(2)
    first_left = threading.Event()
    seen: list = []

    def first():
        with fp32_matmul("cpu"):
            inside.wait()
        first_left.set()

    def second():
        with fp32_matmul("cpu"):
            inside.wait()
            first_left.wait(10)  # the first thread has left, this one is still inside
            seen.append(torch.backends.mkldnn.matmul.fp32_precision)

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert seen == ["bf16" if fast_fp32_matmul_available()[0] else before]
    assert torch.backends.mkldnn.matmul.fp32_precision == before
    torch.get_float32_matmul_precision()  # no mixed-API state left behind

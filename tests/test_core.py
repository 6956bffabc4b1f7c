"""Unit tests of the core model against properties the spec states."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from weclip_infer import build_model
from weclip_infer.backbone import run_block
from weclip_infer.cam import box_mask, class_keys, initial_cam, initial_cam_per_class
from weclip_infer.config import ConfigError, RefineConfig, load_config
from weclip_infer.decoder import WeCLIPDecoder, count_parameters
from weclip_infer.par import par_kernel, pixel_adaptive_refine
from weclip_infer.refine import refine_affinity, sinkhorn_transition
from weclip_infer.testing import tiny_config


def _images(model, b=2, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = torch.randint(0, 256, (b, 3, size, size), generator=g).float()
    return model.normalize(img)


def test_decoder_parameter_count_matches_spec():
    # spec §3.7 / Appendix B: 5,985,045 (VOC, C=21) and 6,000,465 (COCO, C=81)
    assert count_parameters(WeCLIPDecoder(11, 768, 21)) == 5_985_045
    assert count_parameters(WeCLIPDecoder(11, 768, 81)) == 6_000_465


def test_config_rejects_unknown_and_bad_values():
    with pytest.raises(ConfigError, match="refine.nonsense"):
        load_config({"refine": {"nonsense": 1}})
    with pytest.raises(ConfigError, match="refine.box_threshold"):
        load_config({"refine": {"box_threshold": 2.0}})
    with pytest.raises(ConfigError, match="decoder.num_layers"):
        load_config({"decoder": {"num_layers": "three"}})
    with pytest.raises(ConfigError, match="text.class_names"):
        load_config({"text": {"dataset": "custom"}})
    coco = load_config({"text": {"dataset": "coco"}})
    assert coco.refine.box_threshold == 0.7 and coco.refine.candidate_blocks == 10
    assert coco.refine.rfm_switch_iter == 40000
    voc = load_config(None, overrides=["refine.rfm_switch_iter=9145"])
    assert voc.refine.rfm_switch_iter == 9145 and voc.refine.box_threshold == 0.4


def test_clip_is_frozen_and_gradient_reaches_only_decoder(tiny_model):
    model = tiny_model
    model.train()
    assert not model.backbone.training  # stays in eval mode (§1.1)
    assert all(not p.requires_grad for p in model.backbone.parameters())
    x = _images(model)
    labels = torch.tensor([[1, 0, 1], [0, 1, 0]], dtype=torch.float32)
    model.zero_grad()
    out = model(x, labels)
    out["loss"].backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    assert all(p.grad is not None for p in model.decoder.parameters())
    model.eval()


@pytest.mark.parametrize("batching", ["image", "pairs"])
def test_batched_gradcam_equals_per_class_loop(tiny_model, batching):
    model = tiny_model
    x = _images(model, b=4, seed=1)
    feats, _, hw = model._features(x, attn_blocks=0)
    keys = [[0, 2], [1], [], [0, 1, 2]]
    out = initial_cam(model.backbone, feats[-1], hw, keys, model.text_fg, model.text_bg, 10.0, batching=batching)
    ref = initial_cam_per_class(model.backbone, feats[-1], hw, keys, model.text_fg, model.text_bg, 10.0)
    for a, b in zip(out.cams, ref):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    # the class scores of each GradCAM forward: the same whichever way the pairs are batched
    other = initial_cam(model.backbone, feats[-1], hw, keys, model.text_fg, model.text_bg, 10.0,
                        batching="pairs" if batching == "image" else "image")
    for a, b in zip(out.probs, other.probs):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    # block N's head-averaged attention for every image, with or without classes
    with torch.no_grad():
        _, att = run_block(model.backbone.blocks[-1], feats[-1], need_attn=True)
    torch.testing.assert_close(out.attn_last, att, atol=1e-6, rtol=1e-5)
    for c in (c for c in out.cams if c.numel()):  # min-max normalised: in [0,1], max ≈ 1 (Appendix B)
        assert float(c.min()) >= 0 and float(c.max()) <= 1
        assert torch.all((c.flatten(1).max(1).values > 0.999) | (c.flatten(1).max(1).values == 0))


def test_box_mask_exclusive_ends():
    cam = np.zeros((6, 6), np.float32)
    cam[1:3, 1:4] = 1.0  # rows 1-2, cols 1-3
    cam[5, 5] = 1.0  # touches the last row/column: clipped away (§11.2 item 6)
    m = box_mask(cam, 0.4)
    expect = np.zeros((6, 6), np.float32)
    expect[1:3, 1:4] = 1.0
    np.testing.assert_array_equal(m, expect)
    assert box_mask(np.zeros((4, 4)), 0.4).sum() == 0


def test_sinkhorn_properties():
    torch.manual_seed(0)
    m = torch.rand(2, 30, 30) + 0.01
    t = sinkhorn_transition(m, iters=3, power=1)
    assert torch.allclose(t, t.transpose(1, 2))  # exactly symmetric after step 3
    t2 = sinkhorn_transition(m, iters=3, power=2)
    rows = t2.sum(-1)
    assert torch.allclose(rows, torch.ones_like(rows), atol=0.05)  # ≈1, not exactly (Appendix B)
    # one column+row pass: rows sum to exactly 1 before symmetrising
    c = m / m.sum(-2, keepdim=True)
    r = c / c.sum(-1, keepdim=True)
    assert torch.allclose(r.sum(-1), torch.ones(2, 30))


def test_rfm_layer_selection_signed_vs_abs():
    torch.manual_seed(0)
    cfg = RefineConfig(candidate_blocks=6)
    maps = torch.rand(1, 12, 16, 16)
    aff = torch.rand(1, 16, 16)
    r, scores, keep = refine_affinity(maps, aff, cfg)
    mass = maps[0, -6:].sum((-2, -1))
    # signed score: selection = blocks with patch-attention mass >= mean (spec §4.2 consequence)
    assert torch.equal(keep[0].bool(), mass >= mass.mean() - 1e-6)
    assert 1 <= int(keep.sum()) <= 6
    expected = (maps[0, -6:][keep[0].bool()].mean(0)) * aff[0]
    torch.testing.assert_close(r[0], expected, rtol=1e-4, atol=1e-6)
    _, s_abs, _ = refine_affinity(maps, aff, RefineConfig(candidate_blocks=6, layer_score="abs"))
    assert torch.all(s_abs >= 0)


def test_par_constant_map_and_kernel_rows():
    img = torch.randn(1, 3, 24, 24)
    k = par_kernel(img, [1, 2, 4, 8, 12, 24])
    assert k.shape == (1, 48, 24, 24)
    torch.testing.assert_close(k.sum(1), torch.full((1, 24, 24), 1.01))
    cams = torch.full((1, 2, 24, 24), 0.5)
    out = pixel_adaptive_refine(img, cams)
    torch.testing.assert_close(out, cams * 1.01 ** 20)  # Appendix B: ≈ 1.2202 × input


def test_pseudo_labels_only_contain_present_classes(tiny_model):
    model = tiny_model
    x = _images(model, b=3, seed=2)
    labels = torch.tensor([[1, 0, 0], [0, 1, 1], [0, 0, 1]], dtype=torch.float32)
    with torch.no_grad():
        pl = model.pseudo_labels(x, labels, use_rfm=True)
    assert pl.shape == (3, 64, 64)
    for b, keys in enumerate(class_keys(labels)):
        allowed = {0} | {k + 1 for k in keys}
        assert set(pl[b].unique().tolist()) <= allowed


def test_intermediates_contents(tiny_model):
    model = tiny_model
    x = _images(model, b=2, seed=3)
    labels = torch.tensor([[1, 0, 1], [0, 1, 0]], dtype=torch.float32)
    n_before = model.iter_num
    with torch.no_grad():
        tr = model.intermediates(x, labels, use_rfm=True)
    assert model.iter_num == n_before
    n_blocks = model.backbone.num_blocks
    assert len(tr["features"]) == n_blocks - 1 and tr["features"][0].shape == (2, 64, 4, 4)
    assert len(tr["attn"]) == n_blocks - 1 and tr["attn"][0].shape == (2, 17, 17)
    assert tr["text_fg"].shape == (3, 64) and tr["text_bg"].shape == (2, 64)
    assert [c.shape[0] for c in tr["cam_init"]] == [2, 1]
    assert tr["refine_map"].shape == (2, 16, 16) and tr["layer_keep"].shape == (2, 2)
    assert tr["seg_logits"].shape == (2, 4, 4, 4) and tr["affinity"].shape == (2, 16, 16)
    assert tr["affinity_target"].dtype == torch.uint8
    assert tr["pseudo_label"].shape == (2, 64, 64)
    assert math.isfinite(float(tr["loss_seg"])) and math.isfinite(float(tr["loss_aff"]))
    assert len(tr["cam_static"]) == 2


def test_rfm_switch_follows_forward_counter():
    model = build_model(tiny_config(refine={"rfm_switch_iter": 2}), device="cpu")
    model.train()
    x = _images(model, b=1)
    lab = torch.tensor([[1, 0, 0]], dtype=torch.float32)
    used = []
    for _ in range(3):
        model(x, lab)
        used.append(model._use_rfm(None))  # regime of the forward just run (counter incremented first)
    assert model.iter_num == 3 and used == [False, False, True]


def test_tiny_overfit_loss_decreases():
    torch.manual_seed(0)
    model = build_model(tiny_config(decoder={"dropout": 0.0}), device="cpu")
    model.train()
    x = _images(model, b=2, seed=4)
    lab = torch.tensor([[1, 0, 0], [0, 0, 1]], dtype=torch.float32)
    opt = torch.optim.AdamW(model.decoder.parameters(), lr=2e-3)
    losses = []
    for _ in range(25):
        out = model(x, lab, use_rfm=False)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(float(out["loss"].detach()))
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.5 * losses[0]


def test_segment_any_size(tiny_model):
    x = torch.randn(1, 3, 70, 45)  # not multiples of 16: grid floors (§1.4)
    with torch.no_grad():
        out = tiny_model.segment(x)
    assert out.shape == (1, 4, 4, 2)


def test_fully_supervised_mode():
    model = build_model(tiny_config(decoder={"fully_supervised": True}), device="cpu")
    model.train()
    x = _images(model, b=2)
    masks = torch.randint(0, 4, (2, 64, 64))
    out = model(x, masks=masks)
    out["loss"].backward()
    assert float(out["loss_aff"]) == 0.0 and out["loss"].requires_grad


def test_pseudo_label_path_stays_fp32_under_autocast(tiny_model):
    """``train.amp``: the CLIP and decoder may run in reduced precision, GradCAM/RFM/PAR do not."""
    m = tiny_model
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 64, 64, generator=g)
    cls = torch.zeros(2, m.num_classes - 1)
    cls[0, [0, 2]] = 1
    cls[1, 1] = 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rec = m.intermediates(x, cls, use_rfm=True)
        out = m(x, cls, use_rfm=True)
    assert all(c.dtype == torch.float32 for c in rec["cam_init"] + rec["cam_refined"])
    assert rec["cam_par"].dtype == torch.float32 and rec["transition"].dtype == torch.float32
    assert rec["pseudo_label"].shape == (2, 64, 64)
    out["loss"].backward()
    assert any(p.grad is not None for p in m.decoder.parameters())
    m.decoder.zero_grad(set_to_none=True)


def _reference_seg_loss(logits, labels, kind):
    """The plain formulation: F.interpolate + log-softmax + NLL per term (spec §6.1)."""
    import torch.nn.functional as F

    up = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    if kind == "ce":
        return F.cross_entropy(up, labels, ignore_index=255)
    bg, fg = labels == 0, (labels != 0) & (labels != 255)
    logp = F.log_softmax(up, dim=1)
    terms = [F.nll_loss(logp, labels.masked_fill(~sel, 255), ignore_index=255) if sel.any() else up.sum() * 0
             for sel in (bg, fg)]
    return 0.5 * (terms[0] + terms[1])


@pytest.mark.parametrize("kind", ["balanced", "ce"])
@pytest.mark.parametrize("case", ["mixed", "no_fg", "odd_sizes"])
def test_segmentation_loss_equals_interpolate_plus_cross_entropy(kind, case):
    from weclip_infer.losses import segmentation_loss

    g = torch.Generator().manual_seed(3)
    small, big = ((5, 7), (37, 50)) if case == "odd_sizes" else ((4, 4), (64, 64))
    logits = torch.randn(2, 5, *small, generator=g) * 3
    labels = torch.randint(0, 5, (2, *big), generator=g)
    labels[:, :3] = 255
    if case == "no_fg":
        labels[labels != 255] = 0
    a, b = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    ref = _reference_seg_loss(a, labels, kind)
    got = segmentation_loss(b, labels, kind)
    ref.backward()
    got.backward()
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b.grad, a.grad, atol=1e-7, rtol=1e-4)
    assert b.grad.abs().sum() > 0
    with pytest.raises(ValueError):
        segmentation_loss(logits, labels, "dice")


def test_reuse_freed_memory_policy():
    import sys

    from weclip_infer.memory import reuse_freed_memory, trim_heap

    assert reuse_freed_memory(device="cuda:0") is False  # only CPU work changes the heap policy
    ok = reuse_freed_memory(device="cpu")
    assert ok == sys.platform.startswith("linux")  # glibc here; a no-op returning False elsewhere
    x = torch.ones(3 * 2 ** 23)  # 96 MB: from the heap now, not a fresh mmap
    assert float(x.sum()) == 3 * 2 ** 23
    del x
    trim_heap()
    reuse_freed_memory(128 * 1024, 128 * 1024)  # glibc's defaults back for the rest of the session

"""Stage-by-stage comparison with the authors' code on seeded random full-size weights.

The fixture (shared/fixtures/reference) holds every intermediate of one reference training
forward for a batch of two 320×320 images, in the static-refinement case (``train320``) and the
RFM case (``train320_late``). The reference ran CLIP and the decoder with fp16 casts in a few
places (spec §1.3, §3.4); we run fp32. Continuous tensors are compared with a relative
tolerance (max |ours − ref| / max |ref|), discrete outputs exactly by feeding the reference's
own input of that stage (fixture README, item 3).

Deliberate difference: GradCAM of a class whose softmax target is tiny (img0's second class has
p ≈ 1e-4) is ill-conditioned in the reference's fp16 gradients, so that one CAM is not compared
end to end; its downstream stages are still checked from the reference's own CAM.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from weclip_infer.cam import box_masks, minmax_normalize
from weclip_infer.losses import affinity_labels, affinity_loss, segmentation_loss
from weclip_infer.par import pixel_adaptive_refine, pseudo_labels_from_cams
from weclip_infer.refine import apply_transition, refine_affinity, sinkhorn_transition

CASES = [("train320", False), ("train320_late", True)]


def rel(ours, ref) -> float:
    a = ours.detach().float().cpu().numpy() if torch.is_tensor(ours) else np.asarray(ours, np.float32)
    b = np.asarray(ref, np.float32)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).max() / (np.abs(b).max() + 1e-12))


@pytest.fixture(scope="module")
def traces(reference_model, reference):
    x = torch.from_numpy(reference["inputs/train320/x"])
    cls = torch.from_numpy(reference["inputs/train320/cls_label"]).float()
    return {case: reference_model.intermediates(x, cls, use_rfm=rfm) for case, rfm in CASES}


def test_text_embeddings(reference_model, reference):
    assert rel(reference_model.text_fg, reference["text/fg_text_features"]) < 2e-3
    assert rel(reference_model.text_bg, reference["text/bg_text_features"]) < 2e-3
    norms = reference_model.text_fg.norm(dim=-1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)


def test_backbone_tokens_and_attention(reference_model, reference, traces):
    tr = traces["train320"]
    # input to block 1 (after pos-embed resize and ln_pre): LND in the fixture
    x = torch.from_numpy(reference["inputs/train320/x"])
    with torch.no_grad():
        tokens_in = reference_model.backbone.embed(x)
    assert rel(tokens_in.transpose(0, 1), reference["train320/clip/tokens_in"]) < 2e-3
    ref_attn = reference["train320/clip/block_attn"]
    assert len(tr["attn"]) == 11
    for i in range(11):
        assert rel(tr["attn"][i], ref_attn[i]) < 2e-3, f"block {i + 1}"
    for b in range(2):
        assert rel(tr["attn_last"][b], reference[f"train320/img{b}/cam/attn_last"][0]) < 2e-3


@pytest.mark.parametrize("case,rfm", CASES)
def test_decoder(traces, reference, case, rfm):
    tr = traces[case]
    assert rel(tr["fu"], reference[f"{case}/decoder/fts"]) < 2e-3
    assert rel(tr["seg_logits"], reference[f"{case}/decoder/seg_logits"]) < 3e-3
    assert rel(tr["affinity"], reference[f"{case}/decoder/aff_pred"]) < 1e-3
    ref_dec_attn = reference[f"{case}/decoder/attn"]
    for i, a in enumerate(tr["decoder_attn"]):
        assert rel(a, ref_dec_attn[i]) < 3e-3


@pytest.mark.parametrize("case,rfm", CASES)
def test_initial_cam(traces, reference, case, rfm):
    tr = traces[case]
    for b in range(2):
        p = f"{case}/img{b}/cam"
        assert tr["cam_keys"][b] == reference[p + "/keys"].tolist()
        probs_ref = reference[p + "/clip_logits"][:, 0]
        assert rel(tr["clip_probs"][b], probs_ref) < 5e-3
        ours, ref = tr["cam_init"][b].numpy(), reference[p + "/gradcam_cam"]
        assert ours.min() >= 0 and ours.max() <= 1
        for j in range(ours.shape[0]):
            if probs_ref[j, j] < 1e-3:  # ill-conditioned in the reference's fp16 (module docstring)
                continue
            assert np.abs(ours[j] - ref[j]).max() < 0.15, (b, j)
            assert np.corrcoef(ours[j].ravel(), ref[j].ravel())[0, 1] > 0.99, (b, j)


@pytest.mark.parametrize("case,rfm", CASES)
def test_refinement_stages_from_reference_inputs(reference_model, traces, reference, case, rfm):
    cfg = reference_model.cfg.refine
    tr = traces[case]
    for b in range(2):
        p = f"{case}/img{b}"
        cam_ref = torch.from_numpy(reference[p + "/cam/gradcam_cam"])
        # box mask: exact (§2.4)
        boxes = box_masks(cam_ref, cfg.box_threshold)
        np.testing.assert_array_equal(boxes.reshape(boxes.shape[0], -1).numpy(), reference[p + "/rfm/box_mask"])
        # refining map from our attention maps (and, for RFM, the reference affinity)
        maps = torch.stack([a[b, 1:, 1:] for a in tr["attn"]] + [tr["attn_last"][b, 1:, 1:]])[None]
        if rfm:
            aff_ref = torch.from_numpy(reference[f"{case}/decoder/aff_pred"][b])[None]
            rmap, scores, keep = refine_affinity(maps, aff_ref, cfg)
            np.testing.assert_array_equal(keep[0].numpy(), reference[p + "/rfm/layer_keep"])
            assert rel(scores[0], reference[p + "/rfm/layer_diff"]) < 1e-3
        else:
            rmap = maps[:, -cfg.static_blocks:].mean(1)
        assert rel(rmap[0], reference[p + "/rfm/affinity_in"]) < 2e-3
        # transition matrix from the reference's own input
        trans = sinkhorn_transition(torch.from_numpy(reference[p + "/rfm/affinity_in"])[None])[0]
        assert rel(trans, reference[p + "/rfm/trans_mat"]) < 1e-4
        assert torch.allclose(trans, trans.t(), atol=1e-9)
        refined = apply_transition(torch.from_numpy(reference[p + "/rfm/trans_mat"]), cam_ref,
                                   torch.from_numpy(reference[p + "/rfm/box_mask"]).reshape(cam_ref.shape))
        assert rel(refined, reference[p + "/rfm/cam_refined"]) < 1e-4
        hr = F.interpolate(minmax_normalize(torch.from_numpy(reference[p + "/rfm/cam_refined"]))[None], size=(320, 320),
                           mode="bilinear", align_corners=False)[0]
        assert rel(hr, reference[p + "/rfm/cam_refined_hr"]) < 1e-4


@pytest.mark.parametrize("case,rfm", CASES)
def test_par_and_pseudo_labels_from_reference_inputs(reference, case, rfm):
    for b in range(2):
        p = f"{case}/img{b}"
        cams_in = torch.from_numpy(reference[p + "/par/cams_in"])
        img = torch.from_numpy(reference[p + "/par/img_in"])
        out = pixel_adaptive_refine(img, cams_in)
        assert rel(out, reference[p + "/par/cams_out"]) < 1e-4
        keys = (reference[p + "/par/valid_key"][1:] - 1).tolist()
        valid = torch.ones(1, cams_in.shape[1], dtype=torch.bool)
        labels = pseudo_labels_from_cams(torch.from_numpy(reference[p + "/par/cams_out"]), valid, [keys])
        np.testing.assert_array_equal(labels[0].numpy(), reference[p + "/pseudo_label"])
        ours_from_ours = pseudo_labels_from_cams(out, valid, [keys])
        assert (ours_from_ours[0].numpy() == reference[p + "/pseudo_label"]).mean() > 0.999


@pytest.mark.parametrize("case,rfm", CASES)
def test_end_to_end_pseudo_labels_where_cams_are_well_conditioned(traces, reference, case, rfm):
    # img1: both classes have well-conditioned GradCAM targets → the whole chain agrees
    agree = (traces[case]["pseudo_label"][1].numpy() == reference[f"{case}/img1/pseudo_label"]).mean()
    assert agree > 0.995


@pytest.mark.parametrize("case,rfm", CASES)
def test_losses_and_affinity_labels_from_reference_inputs(reference, case, rfm):
    pl = torch.from_numpy(reference[f"{case}/pseudo_label"])
    lab = affinity_labels(pl, (20, 20), radius=8)
    np.testing.assert_array_equal(lab.numpy(), reference[f"{case}/aff_label"])
    logits = torch.from_numpy(reference[f"{case}/decoder/seg_logits"])
    seg = segmentation_loss(logits, pl, "balanced")
    ref_seg = float(reference[f"{case}/loss/seg"])
    assert abs(float(seg) - ref_seg) < 1e-4 * max(1.0, ref_seg)
    aff = affinity_loss(torch.from_numpy(reference[f"{case}/decoder/aff_pred"]),
                        torch.from_numpy(reference[f"{case}/aff_label"]))
    assert abs(float(aff) - float(reference[f"{case}/loss/aff"])) < 1e-5
    assert int((lab == 1).sum()) + 1 == int(reference[f"{case}/loss/aff_pos_count"])
    assert int((lab == 0).sum()) + 1 == int(reference[f"{case}/loss/aff_neg_count"])
    total = seg + 0.1 * aff
    ref_total = float(reference[f"{case}/loss/total"])
    assert abs(float(total) - ref_total) < 1e-4 * max(1.0, ref_total)


def test_radius_mask(reference):
    from weclip_infer.losses import radius_mask

    m = radius_mask(20, 20, 8)
    np.testing.assert_array_equal(m.numpy().astype(np.uint8), reference["train320/aff_radius_mask"])
    rows = m.sum(1)
    assert int(rows.min()) == 81 and int(rows.max()) == 289  # spec Appendix B

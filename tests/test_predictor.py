"""Segmenter (inference path shared by CLIs, training eval, export and serving) and checkpoints."""
from __future__ import annotations

import copy
import io

import numpy as np
import pytest
import torch
from PIL import Image

from weclip_infer import Segmenter, load_checkpoint, save_checkpoint
from weclip_infer.checkpoint import CheckpointError
from weclip_infer.imageio import ImageDecodeError, load_image
from weclip_infer.predictor import fuse_multiscale, resize_long_side


def _rgb(h=75, w=100, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_predict_original_resolution_and_modes(tiny_model):
    seg = Segmenter(tiny_model, long_side=128)
    img = _rgb()
    res = seg.predict(img)
    assert res.labels.shape == (75, 100) and res.labels.dtype == np.int64
    assert res.scores.shape == (4,) and res.class_names[0] == "background"
    assert set(np.unique(res.labels)) <= set(range(4))
    pil = Image.fromarray(img)
    for mode in ("RGBA", "L", "P", "CMYK", "I;16"):
        conv = pil.convert("L").convert(mode) if mode == "I;16" else pil.convert(mode)
        buf = io.BytesIO()
        conv.save(buf, format="TIFF" if mode in ("CMYK", "I;16") else "PNG")
        out = seg.predict(buf.getvalue())
        assert out.labels.shape == (75, 100), mode


def test_exif_rotation_is_applied(tiny_model):
    seg = Segmenter(tiny_model, long_side=64, scales=(1.0,), flip=False)
    img = Image.fromarray(_rgb(40, 60))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° CW on display
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif)
    assert seg.predict(buf.getvalue()).labels.shape == (60, 40)


def test_flip_scales_and_hint(tiny_model):
    seg = Segmenter(tiny_model, long_side=96)
    img = _rgb(seed=1)
    a = seg.predict(img, scales=[1.0], flip=False)
    mirrored = seg.predict(np.ascontiguousarray(img[:, ::-1]), scales=[1.0], flip=False)
    flipped = seg.predict(img, scales=[1.0], flip=True)
    # flip: the mean of the image's logits and the mirrored image's logits mirrored back
    torch.testing.assert_close(flipped.logits, (a.logits + mirrored.logits.flip(-1)) / 2, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(flipped.logits, a.logits)
    # scales: the mean over the scales of each scale's (flip-fused) logits on the scale-1 grid
    small = seg.predict_logits(img, scales=[0.75], flip=True)
    both = seg.predict(img, scales=[1.0, 0.75], flip=True)
    small_up = torch.nn.functional.interpolate(small[None], size=flipped.logits.shape[-2:], mode="bilinear",
                                               align_corners=False)[0]
    torch.testing.assert_close(both.logits, (flipped.logits + small_up) / 2, rtol=1e-4, atol=1e-5)
    assert both.labels.shape == (75, 100)
    hinted = seg.predict(img, labels_hint=["green box"])
    assert set(np.unique(hinted.labels)) <= {0, 2}
    with pytest.raises(ValueError, match="unknown class"):
        seg.predict(img, labels_hint=["zebra"])
    with pytest.raises(ValueError, match="scales"):
        seg.predict(img, scales=[0])


def test_fusion_matches_manual_computation(tiny_model):
    x = torch.randn(1, 3, 64, 96)
    fn = copy.deepcopy(tiny_model).eval().segment  # eval: the decoder has dropout
    with torch.no_grad():
        fused = fuse_multiscale(fn, x, (1.0, 0.75), flip=True)
        l1 = fn(torch.cat([x, x.flip(-1)]))
        s1 = (l1[:1] + l1[1:].flip(-1)) / 2
        x2 = torch.nn.functional.interpolate(x, scale_factor=0.75, mode="bilinear", align_corners=False)
        l2 = fn(torch.cat([x2, x2.flip(-1)]))
        s2 = torch.nn.functional.interpolate((l2[:1] + l2[1:].flip(-1)) / 2, size=s1.shape[-2:], mode="bilinear",
                                             align_corners=False)
    torch.testing.assert_close(fused, (s1 + s2) / 2)
    assert resize_long_side(torch.zeros(1, 3, 375, 500), 512).shape[-2:] == (384, 512)


def test_bad_inputs_raise_clear_errors(tiny_model, tmp_path):
    seg = Segmenter(tiny_model, long_side=64)
    with pytest.raises(ImageDecodeError, match="0 bytes"):
        seg.predict(b"")
    with pytest.raises(ImageDecodeError, match="not a recognised image"):
        seg.predict(b"hello world, not an image")
    buf = io.BytesIO()
    Image.fromarray(_rgb()).save(buf, format="JPEG")
    with pytest.raises(ImageDecodeError):
        seg.predict(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ImageDecodeError, match="file not found"):
        seg.predict(tmp_path / "missing.jpg")
    small = Segmenter(tiny_model, long_side=64, max_pixels=100)
    with pytest.raises(ImageDecodeError, match="limit"):
        small.predict(_rgb())


def test_checkpoint_roundtrip_self_contained(tiny_model, tmp_path):
    save_checkpoint(tiny_model, tmp_path / "ckpt", include_backbone=True)
    assert (tmp_path / "ckpt" / "backbone.safetensors").is_file()
    loaded = load_checkpoint(tmp_path / "ckpt", device="cpu")
    assert not loaded.backbone.has_text_tower()  # serving never needs the text tower
    torch.testing.assert_close(loaded.text_fg, tiny_model.text_fg)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded.segment(x), tiny_model.eval().segment(x))
    seg = Segmenter.from_pretrained(tmp_path / "ckpt", device="cpu")
    assert seg.class_names == ["background", "red box", "green box", "blue box"]


def test_checkpoint_errors(tmp_path, tiny_model):
    with pytest.raises(CheckpointError, match="not a weclip_infer checkpoint"):
        load_checkpoint(tmp_path)
    save_checkpoint(tiny_model, tmp_path / "c", include_backbone=True)
    (tmp_path / "c" / "config.json").write_text("{broken")
    with pytest.raises(CheckpointError, match="invalid JSON"):
        load_checkpoint(tmp_path / "c")


def test_import_reference_checkpoint_cli(tmp_path, reference_clip_path, reference, reference_dir):
    from weclip_infer.checkpoint import main

    out = tmp_path / "imported"
    assert main([str(reference_dir / "weclip_decoder_random.pth"), "--clip", str(reference_clip_path),
                 "--out", str(out)]) == 0
    model = load_checkpoint(out, clip_weights=str(reference_clip_path), device="cpu")
    x = torch.from_numpy(reference["inputs/train320/x"])
    with torch.no_grad():
        logits = model.segment(x)
    ref = reference["train320/decoder/seg_logits"]
    assert np.abs(logits.numpy() - ref).max() / np.abs(ref).max() < 3e-3


def test_crf_option_on_decoded_image(tiny_model):
    from weclip_infer.crf import crf_available

    if not crf_available():
        pytest.skip("pydensecrf not installed")
    seg = Segmenter(tiny_model, long_side=64)
    buf = io.BytesIO()
    Image.fromarray(_rgb()).save(buf, format="JPEG")
    res = seg.predict(buf.getvalue(), crf=True)  # decoded arrays can be read-only: must still work
    assert res.labels.shape == (75, 100) and "crf" in res.timings


# ---- bounded cost per request ----------------------------------------------------------------------

def test_banded_label_map_equals_the_one_piece_map(monkeypatch):
    from weclip_infer import predictor

    g = torch.Generator().manual_seed(0)
    for C, h, w, H, W in [(4, 5, 7, 75, 100), (9, 24, 32, 375, 500), (21, 32, 21, 1000, 657), (3, 1, 40, 3, 631)]:
        logits = torch.randn(C, h, w, generator=g) * 4
        allowed = torch.ones(C, dtype=torch.bool)
        allowed[1] = False
        ref = predictor.labels_from_logits(logits, (H, W), allowed, keep_probs=True)
        monkeypatch.setattr(predictor, "_DENSE_MAP_ELEMENTS", 0)
        monkeypatch.setattr(predictor, "_BAND_ELEMENTS", C * W * 7)  # 7 rows per band
        got = predictor.labels_from_logits(logits, (H, W), allowed, keep_probs=True)
        cells = predictor.labels_from_logits(logits, (H, W), allowed)  # only boundary cells interpolated
        monkeypatch.setattr(predictor, "_SCORE_PIXELS", H * W // 9)  # scores on every 3rd row and column
        sub = predictor.labels_from_logits(logits, (H, W), allowed)
        monkeypatch.undo()
        for labels in (got[0], cells[0], sub[0]):
            np.testing.assert_array_equal(labels, ref[0])
        assert not (got[0] == 1).any() and cells[2] is None
        np.testing.assert_allclose(got[1], ref[1], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(cells[1], ref[1], rtol=1e-5, atol=1e-6)
        assert (sub[1] <= ref[1] + 1e-6).all() and np.abs(sub[1] - ref[1]).max() < 0.05
        np.testing.assert_allclose(got[2], ref[2], rtol=1e-4, atol=1e-5)


def test_large_image_never_builds_a_full_resolution_class_map(tiny_model, monkeypatch):
    from weclip_infer import predictor

    seg = Segmenter(tiny_model, long_side=64, scales=(1.0,), flip=False)
    img = _rgb(1500, 1200, seed=3)  # 4 classes × 1.8 MP
    ref = seg.predict(img)
    biggest = []
    real_softmax = torch.softmax

    def spy(x, *args, **kwargs):
        biggest.append(x.numel())
        return real_softmax(x, *args, **kwargs)

    monkeypatch.setattr(predictor, "_DENSE_MAP_ELEMENTS", 1 << 20)
    monkeypatch.setattr(predictor, "_BAND_ELEMENTS", 1 << 18)
    monkeypatch.setattr(predictor.torch, "softmax", spy)
    res = seg.predict(img)
    monkeypatch.undo()
    assert max(biggest) <= 1 << 18  # bands of whole rows under the element budget, not 4 × 1.8 M
    np.testing.assert_array_equal(res.labels, ref.labels)
    # scores: the maximum over a regular subsample of the pixels at this size
    assert (res.scores <= ref.scores + 1e-6).all() and np.abs(res.scores - ref.scores).max() < 0.02


@pytest.mark.parametrize("backend", ["torch", "densecrf"])
def test_crf_pixel_budget_refines_large_images_at_reduced_size(tiny_model, backend):
    from weclip_infer.crf import crf_available

    if backend == "densecrf" and not crf_available():
        pytest.skip("pydensecrf not installed")
    seg = Segmenter(tiny_model, long_side=64, crf=True, crf_backend=backend, crf_max_pixels=5000)
    res = seg.predict(_rgb(150, 200, seed=4))
    h, w = res.crf_size
    assert h * w <= 5000 and abs(w / h - 200 / 150) < 0.05
    assert res.labels.shape == (150, 200) and "crf" in res.timings
    flat = np.zeros((50, 60, 3), np.uint8)
    flat[:, 30:] = (200, 40, 40)
    small = seg.predict(flat)  # under the budget: refined at full size
    assert small.crf_size == (50, 60)
    assert seg.predict(flat, crf=False).crf_size is None
    if backend == "torch":
        # noise: every pixel its own colour, ~5 lattice vertices per pixel, over the content cap
        from weclip_infer.predictor import CRF_VERTICES_PER_PIXEL

        noisy = seg.predict(_rgb(50, 60, seed=4))
        h, w = noisy.crf_size
        assert h * w < 50 * 60 and noisy.labels.shape == (50, 60)
        from weclip_infer.crf.permutohedral import PermutohedralLattice, pixel_features

        small_img = np.asarray(Image.fromarray(_rgb(50, 60, seed=4)).resize((w, h), Image.BILINEAR))
        lat = PermutohedralLattice(pixel_features(h, w, 64, torch.from_numpy(small_img.copy()), 5))
        assert lat.M <= CRF_VERTICES_PER_PIXEL * 5000


def test_crf_options_are_validated(tiny_model):
    with pytest.raises(ValueError, match="crf_backend"):
        Segmenter(tiny_model, crf_backend="fast")
    with pytest.raises(ValueError, match="crf_max_pixels"):
        Segmenter(tiny_model, crf_max_pixels=0)
    with pytest.raises(ValueError, match="max_pixels"):
        Segmenter(tiny_model, max_pixels=-1)


@pytest.mark.parametrize("shape", [(64, 4096), (8, 4000), (4000, 8), (3, 1000), (1, 600), (700, 2), (1, 1)])
def test_extreme_aspect_ratios_get_a_mask(tiny_model, shape):
    seg = Segmenter(tiny_model, long_side=128)  # scales 1 and 0.75 + flip
    res = seg.predict(_rgb(*shape, seed=5))
    assert res.labels.shape == shape
    assert res.labels.min() >= 0 and res.labels.max() < 4


def test_padding_only_where_needed(tiny_model):
    from weclip_infer.predictor import pad_to_patch

    x = torch.randn(1, 3, 48, 64)
    same, size = pad_to_patch(x, (1.0, 0.75), 16)
    assert same is x and size == (48, 64)
    thin = torch.randn(1, 3, 8, 512)
    padded, size = pad_to_patch(thin, (1.0, 0.75), 16)
    assert size == (8, 512) and padded.shape[-1] == 512 and int(padded.shape[-2] * 0.75) >= 16
    torch.testing.assert_close(padded[..., :8, :], thin)
    torch.testing.assert_close(padded[..., 8:, :], thin[..., 7:8, :].expand(-1, -1, padded.shape[-2] - 8, -1))


def test_patched_jpeg_header_is_rejected_as_corrupt(tiny_model):
    buf = io.BytesIO()
    Image.fromarray(_rgb(256, 256, seed=6)).save(buf, format="JPEG", quality=90)
    data = bytearray(buf.getvalue())
    sof = data.find(b"\xff\xc0")
    assert sof > 0 and int.from_bytes(data[sof + 5 : sof + 7], "big") == 256
    data[sof + 5 : sof + 7] = (6000).to_bytes(2, "big")  # height
    data[sof + 7 : sof + 9] = (6000).to_bytes(2, "big")  # width
    assert Image.open(io.BytesIO(bytes(data))).size == (6000, 6000)
    seg = Segmenter(tiny_model, long_side=64)
    with pytest.raises(ImageDecodeError, match="corrupt or truncated JPEG"):
        seg.predict(bytes(data))
    # files that are legitimately tiny for their size still decode (flat, optimised tables)
    for mode, sub in (("RGB", 0), ("RGB", 2), ("L", 0)):
        flat = io.BytesIO()
        Image.new(mode, (3000, 2000), 0 if mode == "L" else (128, 128, 128)).save(
            flat, format="JPEG", optimize=True, subsampling=sub)
        assert load_image(flat.getvalue()).shape == (2000, 3000, 3)


def test_truncated_jpeg_rejected_even_when_pil_tolerance_is_on(monkeypatch):
    from PIL import ImageFile

    buf = io.BytesIO()
    Image.fromarray(_rgb(200, 300, seed=7)).save(buf, format="JPEG", quality=95)
    cut = buf.getvalue()[: len(buf.getvalue()) * 2 // 3]
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(ImageDecodeError, match="corrupt or truncated"):
        load_image(cut)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # the caller's setting is left as it was


# ---- the caller's model is not changed -----------------------------------------------------------

def test_segmenter_leaves_the_callers_model_alone(tiny_model):
    model = copy.deepcopy(tiny_model).train()
    model.decoder.eval()  # a mixed state must survive too
    before = {name: m.training for name, m in model.named_modules()}
    seg = Segmenter(model, long_side=64, device="cpu")
    assert seg.model is model  # same device: used in place, no copy
    res = seg.predict(_rgb(seed=8))
    assert {name: m.training for name, m in model.named_modules()} == before
    assert next(model.parameters()).device.type == "cpu"
    # the forward ran in eval mode: deterministic despite dropout, equal to an eval copy's
    again = seg.predict(_rgb(seed=8))
    np.testing.assert_array_equal(res.labels, again.labels)
    ref = Segmenter(copy.deepcopy(tiny_model).eval(), long_side=64).predict(_rgb(seed=8))
    torch.testing.assert_close(res.logits, ref.logits)


def test_conflicting_options_with_a_model_are_rejected(tiny_model):
    assert tiny_model.cfg.backbone.normalize == "imagenet"
    with pytest.raises(ValueError, match="normalize='clip' conflicts"):
        Segmenter(tiny_model, normalize="clip")
    with pytest.raises(ValueError, match="patch_size"):
        Segmenter(tiny_model, patch_size=14)
    with pytest.raises(ValueError, match="class_names"):
        Segmenter(tiny_model, class_names=["background", "a", "b", "c"])
    seg = Segmenter(tiny_model, normalize="imagenet", patch_size=16)  # agreeing values are fine
    assert seg.patch_size == 16


def test_large_image_preprocess_reads_only_the_rows_it_needs(tiny_model, monkeypatch):
    from weclip_infer import predictor

    seg = Segmenter(tiny_model, long_side=96)
    for shape in [(300, 457), (457, 300), (1000, 90)]:
        img = _rgb(*shape, seed=9)
        ref = seg.preprocess(img)
        monkeypatch.setattr(predictor, "_GATHER_PIXELS", 100)
        got = seg.preprocess(img)
        monkeypatch.undo()
        assert got.shape == ref.shape
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)


def test_header_beyond_pillows_own_cap_is_a_size_error():
    """A header far past every limit (Pillow refuses it itself) reads as "more than the limit",
    which the servers answer with 413 like any other oversized image."""
    from http_corpus import bomb_png

    from weclip_infer.imageio import ImageDecodeError, load_image

    with pytest.raises(ImageDecodeError, match="more than the limit"):
        load_image(bomb_png(20000, 20000))


def test_torch_crf_refines_on_the_model_device_with_the_labels_of_the_numpy_route(tiny_model, monkeypatch):
    """With the torch CRF, predict makes the CRF's input where the logits are and brings back only
    the label map: labels, scores and (keep_probs) probabilities equal those of the route through
    numpy (labels_from_logits' probabilities, refine's marginals, their argmax)."""
    from weclip_infer import crf, predictor
    from weclip_infer.predictor import CRF_VERTICES_PER_PIXEL, labels_from_logits

    seg = Segmenter(tiny_model, long_side=64, crf=True, crf_backend="torch")
    img = _rgb(75, 100, seed=7)
    for hint in (None, ["green box"]):
        res = seg.predict(img, labels_hint=hint, keep_probs=True)
        allowed = seg._hint_mask(hint, 4) if hint else None
        _, scores, probs = labels_from_logits(res.logits, (75, 100), allowed, keep_probs=True)
        q = crf.refine(img, probs, backend="torch", max_vertices=int(CRF_VERTICES_PER_PIXEL * seg.crf_max_pixels))
        np.testing.assert_array_equal(res.labels, q.argmax(0))
        np.testing.assert_array_equal(res.scores, scores)
        np.testing.assert_array_equal(res.probs, probs)
        assert res.labels.dtype == np.int64 and res.crf_size == (75, 100)
    expected = seg.predict(img).labels

    def host_route(*a, **k):
        raise AssertionError("the torch CRF's probabilities or marginals went through numpy")

    monkeypatch.setattr(predictor, "labels_from_logits", host_route)
    monkeypatch.setattr(crf, "refine", host_route)
    res = seg.predict(img)
    np.testing.assert_array_equal(res.labels, expected)
    assert res.probs is None and res.scores.shape == (4,)

"""Segmenter (inference path shared by CLIs, training eval, export and serving) and checkpoints."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from weclip_infer import Segmenter, load_checkpoint, save_checkpoint
from weclip_infer.checkpoint import CheckpointError
from weclip_infer.imageio import ImageDecodeError
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
    b = seg.predict(img, scales=[1.0, 0.75], flip=True)
    assert a.labels.shape == b.labels.shape
    hinted = seg.predict(img, labels_hint=["green box"])
    assert set(np.unique(hinted.labels)) <= {0, 2}
    with pytest.raises(ValueError, match="unknown class"):
        seg.predict(img, labels_hint=["zebra"])
    with pytest.raises(ValueError, match="scales"):
        seg.predict(img, scales=[0])


def test_fusion_matches_manual_computation(tiny_model):
    x = torch.randn(1, 3, 64, 96)
    fn = tiny_model.segment
    with torch.no_grad():
        fused = fuse_multiscale(fn, x, (1.0, 0.75), flip=True)
        l1 = fn(torch.cat([x, x.flip(-1)]))
        s1 = (l1[:1] + l1[1:].flip(-1)) / 2
        x2 = torch.nn.functional.interpolate(x, scale_factor=0.75, mode="bilinear", align_corners=False)
        l2 = fn(torch.cat([x2, x2.flip(-1)]))
        s2 = torch.nn.functional.interpolate((l2[:1] + l2[1:].flip(-1)) / 2, size=s1.shape[-2:], mode="bilinear", align_corners=False)
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
    assert main([str(reference_dir / "weclip_decoder_random.pth"), "--clip", str(reference_clip_path), "--out", str(out)]) == 0
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

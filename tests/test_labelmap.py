"""The one label-PNG rule, shared by the evaluator and the datasets."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from weclip_infer.data.datasets import Sample, SegmentationDataset
from weclip_infer.evaluate import EvaluationError
from weclip_infer.evaluate import read_label_png as eval_read
from weclip_infer.imageio import ImageDecodeError, encode_label_png
from weclip_infer.labelmap import read_label_png
from weclip_infer.palette import voc_palette

ARR = np.array([[0, 1, 2], [255, 20, 3]], dtype=np.uint8)


def test_palette_and_grey_values_as_stored(tmp_path):
    p = Image.fromarray(ARR, mode="P")
    p.putpalette(voc_palette().reshape(-1).tolist())
    p.save(tmp_path / "p.png")
    Image.fromarray(ARR, mode="L").save(tmp_path / "l.png")
    for name in ("p.png", "l.png"):
        out = read_label_png(tmp_path / name)
        assert out.dtype == np.uint8
        np.testing.assert_array_equal(out, ARR)


def test_sixteen_bit_labels_round_trip(tmp_path):
    big = np.array([[0, 300], [1000, 7]], dtype=np.int32)
    (tmp_path / "b.png").write_bytes(encode_label_png(big))
    np.testing.assert_array_equal(read_label_png(tmp_path / "b.png"), big)


def test_colour_image_is_refused_by_every_reader(tmp_path):
    from weclip_infer.palette import colorize

    f = tmp_path / "rgb.png"
    Image.fromarray(colorize(ARR)).save(f)
    with pytest.raises(ImageDecodeError, match="RGB image; expected a single-channel label PNG"):
        read_label_png(f)
    with pytest.raises(EvaluationError, match="RGB image"):
        eval_read(f)
    img = tmp_path / "img.png"
    Image.fromarray(np.zeros((2, 3, 3), np.uint8)).save(img)
    ds = SegmentationDataset([Sample("a", img, f, np.array([1.0], np.float32))], ["thing"])
    with pytest.raises(ImageDecodeError, match="RGB image"):
        ds.load_mask(ds.samples[0])


def test_missing_file_named(tmp_path):
    with pytest.raises(ImageDecodeError, match="nope.png: file not found"):
        read_label_png(tmp_path / "nope.png")

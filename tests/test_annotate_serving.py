"""Serving the annotation modes: ``mode`` = ``decoder`` (default) | ``tags`` | ``open`` with free-text
``labels``, through the TorchServe handler in-process (no server)."""
from __future__ import annotations

import base64
import json
import shutil

import numpy as np
import pytest

pytest.importorskip("ts", reason="torchserve not installed (pip install -e '.[serve]'; `make test` does)")
from http_corpus import decode_png, img_bytes  # noqa: E402

from weclip_infer.serving import RequestError, parse_options  # noqa: E402
from weclip_infer.serving.torchserve import WeCLIPHandler  # noqa: E402

MODEL = "weclip"
SERVE_CONFIG = {"num_threads": 1, "max_pixels": 4_000_000, "backend": "eager"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """The tiny model saved with its CLIP (text tower included, so free text can be encoded)."""
    import torch

    from weclip_infer import build_model
    from weclip_infer.checkpoint import save_checkpoint
    from weclip_infer.testing import tiny_config

    torch.manual_seed(0)
    m = build_model(tiny_config(), device="cpu", keep_text_tower=True)
    d = tmp_path_factory.mktemp("annotate_serve") / "model"
    save_checkpoint(m, d, include_backbone=True)
    return d


@pytest.fixture(scope="module")
def handler(model_dir, tmp_path_factory):
    from ts.context import Context

    d = tmp_path_factory.mktemp("annotate_serve_copy") / "m"
    shutil.copytree(model_dir, d)
    (d / "serve_config.json").write_text(json.dumps(SERVE_CONFIG))
    ctx = Context(MODEL, str(d), None, 8, None, "0.12.0")
    h = WeCLIPHandler()
    h.initialize(ctx)
    return h, ctx


def _run(handler, data):
    from ts.context import RequestProcessor

    h, ctx = handler
    ctx.request_processor = [RequestProcessor({}) for _ in data]
    out = h.handle(data, ctx)
    return out, [ctx.get_response_status(i)[0] for i in range(len(data))]


def test_parse_mode_and_free_text_labels():
    o = parse_options({"mode": "open", "labels": ["a red kite", "sky, blue"]})
    assert o["mode"] == "open" and o["labels"] == ["a red kite", "sky, blue"]
    assert parse_options({"mode": b"TAGS"})["mode"] == "tags"
    assert "mode" not in parse_options({})  # decoder, as before
    assert len(parse_options({"labels": [f"n{i}" for i in range(30)]})["labels"]) == 30  # decoder hints: no cap
    for bad in ({"mode": "segment"}, {"labels": ["x" * 81]}, {"mode": "open", "labels": [f"n{i}" for i in range(21)]},
                {"labels": ["bell\x07"]}):
        with pytest.raises(RequestError) as ei:
            parse_options(bad)
        assert ei.value.status == 400


def test_handler_modes_in_process(handler, model_dir):
    from weclip_infer import Annotator

    img = img_bytes(48, 64, 1, "PNG")
    data = [
        {"body": bytearray(img)},                                                      # decoder (default)
        {"body": bytearray(img), "mode": b"tags", "labels": b"red box"},               # tags
        {"body": {"image": base64.b64encode(img).decode(), "mode": "open", "labels": ["a red kite", "grey sky"],
                  "output": "json"}},
        {"body": bytearray(img), "mode": b"tags"},                                     # no labels: auto tags
        {"body": bytearray(img), "mode": b"open"},                                     # open needs names
        {"body": bytearray(img), "mode": b"tags", "labels": b"kite"},                  # not a model class
        {"body": bytearray(img), "mode": b"open", "labels": ("x," * 21).encode()},     # too many names
    ]
    out, codes = _run(handler, data)
    assert codes == [200, 200, 200, 200, 400, 400, 400]
    ann = Annotator.from_pretrained(model_dir, device="cpu")
    tags = decode_png(out[1])
    np.testing.assert_array_equal(tags, ann.annotate(img, ["red box"]).labels)
    assert set(np.unique(tags).tolist()) <= {0, 1}
    js = json.loads(out[2])
    assert set(js["classes"]) <= {"background", "a red kite", "grey sky"}
    assert set(js["scores"]) == {"background", "a red kite", "grey sky"}
    np.testing.assert_array_equal(decode_png(out[3]), ann.annotate(img, "auto").labels)
    assert "names" in json.loads(out[4])["error"]
    assert "kite" in json.loads(out[5])["error"]
    assert "at most" in json.loads(out[6])["error"]

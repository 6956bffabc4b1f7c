"""Triton model repository export: config.pbtxt against Triton's own ModelConfig schema, and the
repository's ONNX file run through ONNX Runtime with the names, types and shapes the config declares."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from weclip_infer import save_checkpoint  # noqa: E402
from weclip_infer.export import example_input  # noqa: E402
from weclip_infer.export.triton import triton_config_text, write_triton_repository  # noqa: E402

torch.set_num_threads(1)


def _model_config_pb2():
    """Triton's ModelConfig protobuf (shipped with tritonclient), or skip."""
    try:
        from tritonclient.grpc import model_config_pb2
    except Exception as e:  # noqa: BLE001 - missing package or incompatible protobuf runtime
        pytest.skip(f"tritonclient's model_config_pb2 not importable ({type(e).__name__}: {e}); "
                    "pip install -e '.[triton]'")
    return model_config_pb2


def _parse(text: str):
    from google.protobuf import text_format

    pb2 = _model_config_pb2()
    return text_format.Parse(text, pb2.ModelConfig()), pb2


@pytest.fixture(scope="module")
def triton_repo(shared_tiny_model, tmp_path_factory):
    from weclip_infer.export.cli import main

    root = tmp_path_factory.mktemp("triton")
    ck = save_checkpoint(shared_tiny_model, root / "ck")
    rc = main([str(ck), "--out", str(root / "bundle"), "--formats", "onnx", "--trace-size", "48x48",
               "--parity-sizes", "2x48x48", "--triton", str(root / "repo"), "--triton-name", "weclip_tiny"])
    assert rc == 0
    return root


def test_repository_layout_and_schema(triton_repo, shared_tiny_model):
    model_dir = triton_repo / "repo" / "weclip_tiny"
    assert sorted(p.relative_to(model_dir).as_posix() for p in model_dir.rglob("*")) == [
        "1", "1/model.onnx", "config.pbtxt", "manifest.json"]
    assert (model_dir / "1" / "model.onnx").read_bytes() == (triton_repo / "bundle" / "model.onnx").read_bytes()
    cfg, pb2 = _parse((model_dir / "config.pbtxt").read_text())
    assert cfg.name == "weclip_tiny"
    assert cfg.backend == "onnxruntime"
    assert cfg.max_batch_size == 8
    assert cfg.HasField("dynamic_batching") and cfg.dynamic_batching.max_queue_delay_microseconds > 0
    assert list(cfg.dynamic_batching.preferred_batch_size) == [4, 8]
    (inp,), (out,) = cfg.input, cfg.output
    assert inp.data_type == pb2.TYPE_FP32 and out.data_type == pb2.TYPE_FP32
    assert list(inp.dims) == [3, -1, -1]  # batch is implicit (max_batch_size > 0); H, W variable
    assert list(out.dims) == [shared_tiny_model.num_classes, -1, -1]
    assert [g.kind for g in cfg.instance_group] == [pb2.ModelInstanceGroup.KIND_CPU]
    man = json.loads((model_dir / "manifest.json").read_text())
    assert man["class_names"][0] == "background" and len(man["class_names"]) == shared_tiny_model.num_classes


def test_onnx_runs_with_config_names_and_shapes(triton_repo, shared_tiny_model):
    model_dir = triton_repo / "repo" / "weclip_tiny"
    cfg, _ = _parse((model_dir / "config.pbtxt").read_text())
    sess = ort.InferenceSession(str(model_dir / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    (inp,), (out,) = cfg.input, cfg.output
    assert [i.name for i in sess.get_inputs()] == [inp.name]
    assert [o.name for o in sess.get_outputs()] == [out.name]
    assert sess.get_inputs()[0].type == "tensor(float)" and sess.get_outputs()[0].type == "tensor(float)"
    p = int(shared_tiny_model.backbone.patch_size)
    eager = copy.deepcopy(shared_tiny_model).eval()  # the exported graph is the eval-mode model (Dropout off)
    for b, h, w in ((1, 48, 48), (3, 40, 72), (cfg.max_batch_size, 33, 50)):  # batches up to the maximum
        x = example_input(shared_tiny_model, b, h, w, seed=b)
        (y,) = sess.run([out.name], {inp.name: x.numpy()})
        expect = [b, *[d if d > 0 else n for d, n in zip(out.dims, (None, h // p, w // p))]]
        assert list(y.shape) == expect
        with torch.no_grad():
            ref = eager.segment(x).numpy()
        np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4 * max(1.0, float(np.abs(ref).max())))


def test_refuses_existing_model_and_bad_settings(triton_repo, tmp_path):
    from weclip_infer.export.cli import main

    with pytest.raises(FileExistsError):
        write_triton_repository(triton_repo / "bundle", triton_repo / "repo", "weclip_tiny")
    before = (triton_repo / "repo" / "weclip_tiny" / "config.pbtxt").read_bytes()
    assert main([str(triton_repo / "ck"), "--out", str(tmp_path / "b"), "--triton", str(triton_repo / "repo"),
                 "--triton-name", "weclip_tiny"]) == 2  # refused before exporting anything
    assert not (tmp_path / "b").exists()
    assert (triton_repo / "repo" / "weclip_tiny" / "config.pbtxt").read_bytes() == before
    assert main([str(triton_repo / "ck"), "--out", str(tmp_path / "b"), "--formats", "torchscript",
                 "--triton", str(tmp_path / "repo")]) == 2
    man = json.loads((triton_repo / "bundle" / "manifest.json").read_text())
    for kw in ({"max_batch_size": 0}, {"instance_kind": "KIND_TPU"}, {"max_queue_delay_us": -1}):
        with pytest.raises(ValueError):
            triton_config_text("m", man, **kw)
    with pytest.raises(ValueError):
        triton_config_text("../escape", man)
    cfg, pb2 = _parse(triton_config_text("m", man, max_batch_size=1, instance_kind="KIND_GPU", instance_count=2))
    assert list(cfg.dynamic_batching.preferred_batch_size) == [1]
    assert cfg.instance_group[0].kind == pb2.ModelInstanceGroup.KIND_GPU and cfg.instance_group[0].count == 2

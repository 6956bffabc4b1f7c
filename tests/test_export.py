"""Export: TorchScript + ONNX of ``WeCLIP.segment``, parity, bundle manifest, bundle loading."""
from __future__ import annotations

import copy
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from weclip_infer import Segmenter, build_model, save_checkpoint  # noqa: E402
from weclip_infer.bundle import BundleError, load_bundle_backend  # noqa: E402
from weclip_infer.checkpoint import file_sha256  # noqa: E402
from weclip_infer.export import (  # noqa: E402
    ParityError,
    SegmentationGraph,
    bundle_writer,
    check_parity,
    example_input,
    write_bundle,
)

torch.set_num_threads(1)

# square, non-square, non-multiple-of-16 (75×101 → 4×6 grid); batch 2 like the predictor's flip
TINY_CASES = ((2, 64, 64), (1, 48, 80), (1, 75, 101))


@pytest.fixture(scope="module")
def tiny_bundle(shared_tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("bundle")
    man = write_bundle(shared_tiny_model, out, trace_size=(64, 64), parity_cases=TINY_CASES)
    return out, man


def test_graph_is_segment(tiny_model):
    x = example_input(tiny_model, 1, 48, 80)
    was_training = tiny_model.training
    graph = SegmentationGraph(tiny_model)  # export is of the eval-mode model (decoder dropout off)
    assert not graph.training and not graph.model.training and tiny_model.training == was_training
    with torch.inference_mode():
        assert torch.equal(graph(x), tiny_model.eval().segment(x))


def test_parity_report_tiny(tiny_bundle):
    _, man = tiny_bundle
    rep = man["parity"]
    assert rep["ok"] and rep["precision"] == "fp32" and rep["rel_tol"] == 1e-4
    assert [c["input"] for c in rep["cases"]] == [[b, 3, h, w] for b, h, w in TINY_CASES]
    for c in rep["cases"]:
        b, _, h, w = c["input"]
        assert c["output"] == [b, 4, h // 16, w // 16]
        for name in ("torchscript", "onnx"):
            r = c["backends"][name]
            assert r["shape"] == c["output"]
            assert r["max_abs"] <= 1e-4 * max(1.0, r["logit_scale"])
            assert r["agreement"] >= 0.999
    assert rep["torchscript"]["max_abs"] <= 1e-5 and rep["onnx"]["max_abs"] <= 1e-4


def test_onnx_model_valid_and_dynamic(tiny_bundle):
    import onnx

    out, _ = tiny_bundle
    m = onnx.load(str(out / "model.onnx"))
    onnx.checker.check_model(m)
    assert any(o.domain in ("", "ai.onnx") and o.version == 17 for o in m.opset_import)
    dims = [d.dim_param for d in m.graph.input[0].type.tensor_type.shape.dim]
    assert dims[0] == "batch" and dims[2] == "height" and dims[3] == "width"
    assert not any(f.name.endswith(".data") for f in out.iterdir())  # weights inside the file


def test_manifest_contents(tiny_bundle, tiny_model):
    out, man = tiny_bundle
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk["parity"]["ok"] and on_disk["files"] == man["files"]
    assert on_disk["class_names"] == ["background", "red box", "green box", "blue box"]
    assert on_disk["num_classes"] == 4 and on_disk["palette"] == "voc" and on_disk["patch_size"] == 16
    norm = on_disk["normalization"]
    assert on_disk["normalize"] == norm["name"] == tiny_model.cfg.backbone.normalize
    np.testing.assert_allclose(norm["mean"], tiny_model.pixel_mean.flatten().tolist(), rtol=1e-6)
    np.testing.assert_allclose(norm["std"], tiny_model.pixel_std.flatten().tolist(), rtol=1e-6)
    inf = tiny_model.cfg.inference
    assert on_disk["inference"] == {"scales": [float(s) for s in inf.scales], "flip": inf.flip, "crf": inf.crf,
                                    "long_side": inf.long_side}
    assert "floor(H/16)" in on_disk["input"]["rule"] and on_disk["input"]["min_size"] == 16
    assert on_disk["opset"] == 17 and on_disk["precision"] == "fp32"
    for fmt, name in (("torchscript", "model.ts.pt"), ("onnx", "model.onnx")):
        assert on_disk["files"][fmt]["path"] == name
        assert on_disk["files"][fmt]["sha256"] == file_sha256(out / name)
    v = on_disk["versions"]
    import onnx
    import onnxruntime

    import weclip_infer

    assert v["weclip_infer"] == weclip_infer.__version__ and v["torch"] == torch.__version__
    assert v["onnx"] == onnx.__version__ and v["onnxruntime"] == onnxruntime.__version__
    assert not any(p.name.startswith(".export-") for p in out.iterdir())  # staging cleaned up


@pytest.mark.parametrize("backend", ["onnx", "torchscript"])
def test_from_pretrained_matches_eager(tiny_bundle, tiny_model, backend):
    out, _ = tiny_bundle
    img = np.random.default_rng(3).integers(0, 256, (75, 100, 3), dtype=np.uint8)
    eager = Segmenter(tiny_model, long_side=96).predict(img)
    seg = Segmenter.from_pretrained(out, backend=backend, device="cpu", long_side=96)
    assert seg.class_names == eager.class_names and seg.scales == Segmenter(tiny_model).scales
    res = seg.predict(img)
    assert res.labels.shape == eager.labels.shape
    assert (res.labels == eager.labels).mean() >= 0.999
    np.testing.assert_allclose(res.logits.numpy(), eager.logits.numpy(), atol=1e-4)


def test_load_bundle_backend_modes(tiny_bundle, tmp_path):
    out, _ = tiny_bundle
    fn, meta, dev = load_bundle_backend(out, backend="auto", device="cpu")
    assert meta["backend"] == "onnx" and dev.type == "cpu" and "CPUExecutionProvider" in fn.session.get_providers()
    y = fn(torch.zeros(2, 3, 40, 70))
    assert isinstance(y, torch.Tensor) and tuple(y.shape) == (2, 4, 2, 4) and y.dtype == torch.float32
    ts_fn, ts_meta, _ = load_bundle_backend(out, backend="torchscript", device="cpu")
    assert ts_meta["backend"] == "torchscript"
    x = torch.randn(1, 3, 16, 17)  # smallest input: one patch
    torch.testing.assert_close(ts_fn(x), fn(x), atol=1e-4, rtol=0)
    assert tuple(fn(x).shape) == (1, 4, 1, 1)
    with pytest.raises(BundleError, match="backend"):
        load_bundle_backend(out, backend="tensorrt", device="cpu")
    with pytest.raises(BundleError, match="manifest.json"):
        load_bundle_backend(tmp_path, device="cpu")
    # a bundle with only the manifest: missing graph files are named
    (tmp_path / "manifest.json").write_text((out / "manifest.json").read_text())
    with pytest.raises(BundleError, match="model.onnx"):
        load_bundle_backend(tmp_path, backend="onnx", device="cpu")
    with pytest.raises(BundleError, match="neither"):
        load_bundle_backend(tmp_path, backend="auto", device="cpu")


def test_graph_and_export_leave_the_callers_model_alone(tiny_model, tmp_path):
    tiny_model.train()
    modes = [m.training for m in tiny_model.modules()]  # the frozen CLIP stays in eval mode by design
    assert any(modes)
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    has_text = tiny_model.backbone.has_text_tower()
    graph = SegmentationGraph(tiny_model)
    assert not graph.training and not graph.model.training
    assert graph.model is not tiny_model
    graph.train()  # the graph stays in eval mode, and so does nothing else
    assert not graph.model.training
    write_bundle(tiny_model, tmp_path / "b", formats=("torchscript", "onnx"), trace_size=(64, 64),
                 parity_cases=((1, 64, 64),))
    assert [m.training for m in tiny_model.modules()] == modes
    assert tiny_model.pixel_mean.device.type == "cpu"
    assert tiny_model.backbone.has_text_tower() == has_text
    after = tiny_model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_ort_session_providers_are_explicit_and_checked(tiny_bundle, monkeypatch):
    import onnxruntime as ort

    from weclip_infer.bundle import ort_session

    out, _ = tiny_bundle
    sess = ort_session(out / "model.onnx", "cpu")
    assert sess.get_providers() == ["CPUExecutionProvider"]
    # CPU sessions do not spin between runs (torch work shares the cores in between)
    assert sess.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") == "0"
    # a CUDA request needs the CUDA provider: never a silent CPU session
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with pytest.raises(BundleError, match="CUDAExecutionProvider"):
        ort_session(out / "model.onnx", "cuda:0")
    # a provider that is listed but not granted by the session is reported, not ignored
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])

    class _Session:
        def __init__(self, *a, **k):
            pass

        def get_providers(self):
            return ["CPUExecutionProvider"]

    monkeypatch.setattr(ort, "InferenceSession", _Session)
    with pytest.raises(BundleError, match="session runs on"):
        ort_session(out / "model.onnx", "cuda:0")


def test_missing_onnxruntime_message(tiny_bundle, monkeypatch):
    out, _ = tiny_bundle
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails
    with pytest.raises(BundleError, match=r"weclip-infer\[onnx\]"):
        load_bundle_backend(out, backend="onnx", device="cpu")
    _, meta, _ = load_bundle_backend(out, backend="auto", device="cpu")  # falls back to TorchScript
    assert meta["backend"] == "torchscript"


def test_parity_failure_raises(tiny_model, tmp_path, monkeypatch):
    graph = SegmentationGraph(tiny_model)
    with pytest.raises(ParityError, match="agreement"):
        check_parity(tiny_model, torchscript=lambda x: -graph(x), cases=((1, 48, 64),))
    with pytest.raises(ParityError, match="max_abs"):
        check_parity(tiny_model, torchscript=lambda x: graph(x) + 1e-2, cases=((1, 48, 64),))
    rep = check_parity(tiny_model, torchscript=lambda x: graph(x) + 1e-2, cases=((1, 48, 64),), rel_tol=0.1)
    assert rep["ok"]
    # a corrupted exported graph: nothing is written, an existing bundle stays intact
    write_bundle(tiny_model, tmp_path, formats="torchscript", trace_size=(48, 48), parity_cases=((1, 48, 64),))
    before = (tmp_path / "manifest.json").read_text()
    bad = copy.deepcopy(tiny_model)
    with torch.no_grad():
        bad.decoder.classifier.weight.mul_(-1)
    orig = bundle_writer.export_torchscript
    monkeypatch.setattr(bundle_writer, "export_torchscript", lambda model, path, *a, **k: orig(bad, path, *a, **k))
    with pytest.raises(ParityError):
        write_bundle(tiny_model, tmp_path, formats="torchscript", trace_size=(48, 48), parity_cases=((1, 48, 64),))
    assert (tmp_path / "manifest.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json", "model.ts.pt"]


def test_cli_exports_checkpoint(tiny_model, tmp_path):
    from weclip_infer.export.cli import main

    ck = save_checkpoint(tiny_model, tmp_path / "ck")
    out = tmp_path / "bundle"
    rc = main([str(ck), "--out", str(out), "--formats", "onnx", "--trace-size", "48x48",
               "--parity-sizes", "2x48x48,40x72"])
    assert rc == 0
    man = json.loads((out / "manifest.json").read_text())
    assert man["source_checkpoint"]["model_sha256"] == file_sha256(ck / "model.safetensors")
    assert set(man["files"]) == {"onnx"} and (out / "model.onnx").is_file() and not (out / "model.ts.pt").exists()
    assert [c["input"] for c in man["parity"]["cases"]] == [[2, 3, 48, 48], [1, 3, 40, 72]]
    assert main([str(ck), "--out", str(out), "--formats", "pdf"]) == 2
    assert main([str(ck), "--out", str(out), "--fp16", "--device", "cpu"]) == 2


def test_module_entry_point_help():
    r = subprocess.run([sys.executable, "-m", "weclip_infer.export", "--help"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and "--formats" in r.stdout and "--opset" in r.stdout


@pytest.mark.slow
def test_full_size_vitb16_export(reference_clip_path, tmp_path):
    """Full-size ViT-B/16 (random OpenAI-format weights): both formats, one non-square size."""
    torch.manual_seed(0)
    model = build_model({"backbone": {"clip_weights": str(reference_clip_path)}, "text": {"dataset": "voc"}},
                        device="cpu").eval()
    man = write_bundle(model, tmp_path, trace_size=(224, 224), parity_cases=((1, 224, 288),))
    rep = man["parity"]
    assert rep["ok"] and man["num_classes"] == 21 and man["class_names"][0] == "background"
    for name in ("torchscript", "onnx"):
        assert rep[name]["min_agreement"] >= 0.999
        assert rep[name]["max_rel"] <= 1e-4
    assert rep["cases"][0]["output"] == [1, 21, 14, 18]
    assert (tmp_path / "model.onnx").stat().st_size > 300e6  # weights inside the single file


def test_mar_cli_refuses_to_replace_an_archive(tmp_path, capsys):
    from weclip_infer.export.mar import main

    store = tmp_path / "store"
    store.mkdir()
    (store / "weclip.mar").write_bytes(b"mine")
    assert main([str(tmp_path), "--out", str(store)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (store / "weclip.mar").read_bytes() == b"mine"
    assert main([str(tmp_path), "--out", str(store), "--name", "other", "--scales", "1,x"]) == 2
    assert "--scales" in capsys.readouterr().err

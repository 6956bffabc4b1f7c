"""TorchServe serving: the handler in-process (mixed batches) and a real TorchServe 0.12 end to end.

The session fixture builds a .mar from the tiny model, starts TorchServe on free loopback ports
for all five listeners (HTTP and gRPC) in a private temp folder (its own TMPDIR / java.io.tmpdir,
so pid file and worker sockets cannot collide with another TorchServe, e.g. a running
``make demo``), waits until the model is READY and always stops it. Skipped only when ``java``
or ``torchserve`` is missing.
"""
from __future__ import annotations

import base64
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("ts", reason="torchserve not installed (pip install -e '.[serve]'; `make test` does)")
from http_corpus import BAD_REQUESTS, bomb_png, decode_png, img_bytes, multipart  # noqa: E402

from weclip_infer.serving import RequestError, parse_options, rle_decode, rle_encode  # noqa: E402
from weclip_infer.serving.torchserve import WeCLIPHandler  # noqa: E402

MODEL = "weclip"
SERVE_CONFIG = {"num_threads": 1, "max_pixels": 4_000_000}
BATCH_SIZE, BATCH_DELAY_MS = 4, 20  # the test server's TorchServe batching


# ---- helpers ---------------------------------------------------------------------------------------
def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture(scope="session")
def model_dir(shared_tiny_model, tmp_path_factory):
    from weclip_infer.checkpoint import save_checkpoint

    d = tmp_path_factory.mktemp("serve_model") / "model"
    save_checkpoint(shared_tiny_model, d, include_backbone=True)
    return d


@pytest.fixture(scope="session")
def segmenter(model_dir):
    from weclip_infer.predictor import Segmenter

    return Segmenter.from_pretrained(model_dir, device="cpu")


# ---- unit level: archive building and the handler without TorchServe ------------------------------
def test_build_mar_contents(model_dir, tmp_path):
    import zipfile

    from weclip_infer.export.mar import build_mar

    mar = build_mar(model_dir, tmp_path / "store", name="weclip_t", serve_config={"backend": "eager"})
    names = set(zipfile.ZipFile(mar).namelist())
    assert {"config.json", "model.safetensors", "backbone.safetensors", "serve_config.json",
            "weclip_handler.py", "MAR-INF/MANIFEST.json"} <= names
    assert not any(n.endswith((".pt", ".pth", ".pkl")) for n in names)  # nothing to unpickle
    with pytest.raises(ValueError):
        build_mar(model_dir, tmp_path / "store", serve_config={"backend": "onnx"})  # needs a bundle
    with pytest.raises(ValueError):
        build_mar(model_dir, tmp_path / "store", serve_config={"max_pixels": -1})
    with pytest.raises(ValueError):
        build_mar(tmp_path, tmp_path / "store")  # not a model directory


def test_build_mar_carries_batching_when_asked(model_dir, tmp_path):
    import zipfile

    import yaml

    from weclip_infer.export.mar import build_mar

    plain = build_mar(model_dir, tmp_path / "a", name="weclip_t")
    assert not any("model-config" in n or n.endswith(".yaml") for n in zipfile.ZipFile(plain).namelist())
    mar = build_mar(model_dir, tmp_path / "b", name="weclip_t",
                    batching={"batch_size": 6, "max_batch_delay_ms": 15, "response_timeout_s": 90})
    z = zipfile.ZipFile(mar)
    manifest = json.loads(z.read("MAR-INF/MANIFEST.json"))
    cfg = yaml.safe_load(z.read(manifest["model"]["configFile"]))
    assert cfg == {"batchSize": 6, "maxBatchDelay": 15, "responseTimeout": 90}
    for bad in ({"batch_size": 0}, {"batch_size": True}, {"batchSize": 4}, {"max_batch_delay_ms": 2.5}):
        with pytest.raises(ValueError, match="batching"):
            build_mar(model_dir, tmp_path / "c", batching=bad)


def test_rle_roundtrip():
    rng = np.random.RandomState(0)
    for shape in [(1, 1), (5, 7), (16, 3)]:
        m = rng.rand(*shape) > 0.5
        assert np.array_equal(rle_decode(rle_encode(m), shape), m)
    assert rle_encode(np.array([[1, 1, 0]]))[0] == 0  # starts with a (empty) run of zeros


def test_parse_options():
    o = parse_options({"output": b"JSON", "scales": "1,0.5", "flip": "false", "rle": "1", "labels": "red box,2"})
    assert o == {"output": "json", "scales": (1.0, 0.5), "flip": False, "rle": True, "labels": ["red box", 2]}
    for bad in ({"output": "gif"}, {"scales": "abc"}, {"scales": "0"}, {"scales": "1,9"}, {"flip": "maybe"},
                {"rle": "true"}):  # rle without json
        with pytest.raises(RequestError) as ei:
            parse_options(bad)
        assert ei.value.status == 400


def test_handler_mixed_batch_in_process(model_dir, segmenter, tmp_path):
    """A batch with different sizes, formats and a bad item: every request gets its own answer."""
    from ts.context import Context, RequestProcessor

    d = tmp_path / "m"
    shutil.copytree(model_dir, d)
    (d / "serve_config.json").write_text(json.dumps(SERVE_CONFIG))
    ctx = Context(MODEL, str(d), None, 4, None, "0.12.0")
    h = WeCLIPHandler()
    h.initialize(ctx)
    imgs = [img_bytes(40, 56, 1), img_bytes(70, 33, 2, "PNG")]
    data = [{"body": bytearray(imgs[0])}, {"body": bytearray(b"not an image")},
            {"data": bytearray(imgs[1]), "output": bytearray(b"json"), "rle": b"true"},
            {"body": {"image": base64.b64encode(imgs[0]).decode(), "scales": [1.0], "flip": False}}]
    ctx.request_processor = [RequestProcessor({}) for _ in data]
    out = h.handle(data, ctx)
    assert len(out) == 4
    codes = [ctx.get_response_status(i)[0] for i in range(4)]
    assert codes == [200, 400, 200, 200]
    assert [ctx.get_response_content_type(i) for i in range(4)] == ["image/png", "application/json",
                                                                  "application/json", "image/png"]
    assert np.array_equal(decode_png(out[0]), segmenter.predict(imgs[0]).labels)
    assert "not a recognised image" in json.loads(out[1])["error"]
    js = json.loads(out[2])
    ref = segmenter.predict(imgs[1]).labels
    assert js["size"] == list(ref.shape)
    for name, counts in js["rle"].items():
        assert np.array_equal(rle_decode(counts, ref.shape), ref == segmenter.class_names.index(name))
    assert np.array_equal(decode_png(out[3]), segmenter.predict(imgs[0], scales=(1.0,), flip=False).labels)


def _handler(model_dir, tmp_path, **serve_config):
    from ts.context import Context

    d = tmp_path / "m"
    shutil.copytree(model_dir, d)
    (d / "serve_config.json").write_text(json.dumps({**SERVE_CONFIG, **serve_config}))
    ctx = Context(MODEL, str(d), None, 8, None, "0.12.0")
    h = WeCLIPHandler()
    h.initialize(ctx)
    return h, ctx


def _run(h, data, headers=None):
    from ts.context import Context, RequestProcessor

    ctx = Context(MODEL, "", None, len(data), None, "0.12.0")
    ctx.request_processor = [RequestProcessor((headers or {}).get(i, {})) for i in range(len(data))]
    out = h.handle(data, ctx)
    return out, [ctx.get_response_status(i)[0] for i in range(len(data))]


class _Spy:
    """Records the input shape of every backend call (and can fail chosen ones)."""

    def __init__(self, backend, fail=lambda x: False):
        self.backend, self.fail, self.shapes = backend, fail, []

    def __call__(self, x):
        self.shapes.append(tuple(x.shape))
        if self.fail(x):
            raise RuntimeError("simulated network failure")
        return self.backend(x)


def test_same_size_images_run_as_one_batch_per_scale(model_dir, segmenter, tmp_path):
    """Same network size → one backend call per scale for the whole batch; masks as one at a time."""
    h, _ = _handler(model_dir, tmp_path)
    net = h.service.network
    spy = net.backend = _Spy(net.backend)
    same = [img_bytes(48, 64, seed=s) for s in range(4)] + [img_bytes(96, 128, seed=7, fmt="PNG")]  # same network size
    other = img_bytes(70, 33, seed=8)
    data = [{"body": bytearray(b)} for b in same[:2]] + [{"body": bytearray(b"not an image")}] + \
        [{"body": bytearray(b)} for b in same[2:]] + [{"body": bytearray(other)}] + \
        [{"body": bytearray(same[0]), "scales": b"1"}]
    out, codes = _run(h, data)
    assert codes == [200, 200, 400, 200, 200, 200, 200, 200]
    good = [0, 1, 3, 4, 5, 6]
    for i, img in zip(good, same[:2] + same[2:] + [other]):
        assert np.array_equal(decode_png(out[i]), segmenter.predict(img).labels), i
    assert np.array_equal(decode_png(out[7]), segmenter.predict(same[0], scales=(1.0,)).labels)
    # scale 1: the six same-size inputs (x2 flip) in one call, the other size in its own;
    # scale 0.75: five same-size inputs in one call, the other size in its own
    assert sorted(s[0] for s in spy.shapes) == [2, 2, 10, 12], spy.shapes
    # one at a time (a batch of one) gives the same bytes
    for i, b in zip(good[:2], same[:2]):
        assert _run(h, [{"body": bytearray(b)}])[0][0] == out[i]


def test_serve_config_reaches_the_segmenter(model_dir, tmp_path):
    from weclip_infer.serving.serve_config import validate_serve_config

    h, _ = _handler(model_dir, tmp_path, crf_backend="torch", crf_max_pixels=12345, network_batch=6)
    seg = h.service.segmenter
    assert (seg.crf_backend, seg.crf_max_pixels, h.service.network.max_rows) == ("torch", 12345, 6)
    h16, _ = _handler(model_dir, tmp_path / "bf16", precision="bf16")
    assert h16.service.segmenter.precision == "bf16" and h16.service.segmenter.model is not None
    for bad in ({"crf_backend": "fast"}, {"crf_max_pixels": 0}, {"network_batch": True}, {"precision": "fp16"}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            validate_serve_config(bad)


def test_batch_failures_stay_with_their_request(model_dir, segmenter, tmp_path):
    h, _ = _handler(model_dir, tmp_path, network_batch=4)
    net = h.service.network
    imgs = [img_bytes(48, 64, seed=s) for s in range(3)]
    poison = img_bytes(40, 120, seed=9)  # its own network size: its calls always fail
    probe = net.backend = _Spy(net.backend)
    _run(h, [{"body": bytearray(poison)}])
    poison_hw = probe.shapes[0][-2:]  # the network input size of the poison image
    # every call holding more than one request fails too (as an out-of-memory error would):
    # those requests are retried one by one
    spy = net.backend = _Spy(probe.backend,
                             fail=lambda x: tuple(x.shape[-2:]) == tuple(poison_hw) or x.shape[0] > 2)
    out, codes = _run(h, [{"body": bytearray(b)} for b in imgs[:2]] + [{"body": bytearray(poison)}] +
                      [{"body": bytearray(imgs[2])}])
    assert codes == [200, 200, 500, 200]
    assert "simulated network failure" in json.loads(out[2])["error"]
    for i, img in zip([0, 1, 3], imgs):
        assert np.array_equal(decode_png(out[i]), segmenter.predict(img).labels)
    assert max(s[0] for s in spy.shapes) == 4  # batches were tried, capped by network_batch


def test_crf_of_a_batch_runs_on_the_coordinating_thread(model_dir, segmenter, tmp_path, monkeypatch):
    """The CRF of every request of a batch runs on the thread that handles the batch (torch's
    intra-op pool stays warm there), and each answer equals the request sent alone."""
    import threading

    import weclip_infer.crf as crf_mod

    h, _ = _handler(model_dir, tmp_path, crf_backend="torch")
    ran_on = []
    real = crf_mod.refine_labels  # the torch backend's label map (on the model's device)

    def recording(*a, **k):
        ran_on.append(threading.get_ident())
        return real(*a, **k)

    monkeypatch.setattr(crf_mod, "refine_labels", recording)
    imgs = [img_bytes(48, 64, seed=s) for s in range(3)]
    out, codes = _run(h, [{"body": bytearray(b), "crf": b"true"} for b in imgs])
    assert codes == [200, 200, 200]
    assert ran_on == [threading.get_ident()] * 3
    monkeypatch.setattr(crf_mod, "refine_labels", real)
    for b, o in zip(imgs, out):
        assert np.array_equal(decode_png(o), segmenter.predict(b, crf=True).labels)


def test_on_coordinator_hands_back_results_and_errors():
    import threading

    from weclip_infer.serving.batching import BatchedNetwork

    net = BatchedNetwork(lambda x: x)
    main = threading.get_ident()

    def task(i):
        def work():
            if i == 1:
                raise ValueError("boom")
            return (i, threading.get_ident())
        return lambda: net.on_coordinator(work)

    res = net.run([task(i) for i in range(3)])
    assert res[0] == (0, main) and res[2] == (2, main)
    assert isinstance(res[1], ValueError) and "boom" in str(res[1])
    assert net.on_coordinator(lambda: 7) == 7  # outside run: called in place


# ---- end to end through TorchServe -----------------------------------------------------------------
class Server:
    def __init__(self, root: Path, ports: dict, keys: dict, env: dict, ts_bin: str):
        self.root, self.ports, self.keys, self.env, self.ts_bin = root, ports, keys, env, ts_bin
        self.base = f"http://127.0.0.1:{ports['inference']}"
        self.mgmt = f"http://127.0.0.1:{ports['management']}"

    def request(self, path, body=None, headers=None, method="POST", token="inference", base=None, timeout=60):
        h = dict(headers or {})
        if token:
            h["Authorization"] = f"Bearer {self.keys[token]['key'] if token in self.keys else token}"
        req = urllib.request.Request((base or self.base) + path, data=body, headers=h, method=method)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, r.headers.get("Content-Type", ""), r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.headers.get("Content-Type", ""), e.read()

    def predict(self, body, headers=None, path=f"/predictions/{MODEL}", **kw):
        h = {"Content-Type": "application/octet-stream", **(headers or {})}
        return self.request(path, body, h, **kw)

    def logs(self, n=80) -> str:
        out = []
        for f in sorted((self.root / "logs").glob("*.log")):
            lines = f.read_text(errors="replace").splitlines()[-n:]
            out.append(f"==== {f.name}\n" + "\n".join(lines))
        return "\n".join(out)


def _ts_binary():
    cand = Path(sys.executable).parent / "torchserve"
    return str(cand) if cand.is_file() else shutil.which("torchserve")


def _hold_ports(ports) -> tuple:
    """Listen on each free port of ``ports`` (as another server would); returns (sockets, ports now busy)."""
    socks, busy = [], []
    for p in ports:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            s.bind(("127.0.0.1", p))
            s.listen(1)
            socks.append(s)
            busy.append(p)
        except OSError:  # already taken (e.g. by a running `make demo`): busy as well
            s.close()
            if _port_open(p):
                busy.append(p)
    return socks, busy


def _start_server(root: Path, store: Path, model: str, models_override: Optional[str]) -> "Server":
    """Start TorchServe in ``root`` on free ports with ``model`` from ``store`` loaded at start;
    ``models_override``: the ``models=`` value of its config.properties (None: the archive's own
    settings apply). Returns a READY server with ``stop()``; the shipped config's ports are held
    while it starts."""
    ts_bin = _ts_binary()
    if shutil.which("java") is None:
        pytest.skip("java not found (TorchServe needs a JRE)")
    if ts_bin is None:
        pytest.skip("torchserve not installed")
    from weclip_infer.serving import torchserve_config_file
    from weclip_infer.serving.ts_config import derive_config, free_ports, listen_ports, read_properties

    tmp = root / "tmp"
    (root / "logs").mkdir()
    tmp.mkdir()
    shipped_ports = listen_ports(read_properties(torchserve_config_file()))
    ports = free_ports()
    assert not set(ports.values()) & set(shipped_ports.values())
    overrides = {"vmargs": f"-Xmx1g -XX:+UseSerialGC -Djava.io.tmpdir={tmp}"}
    if models_override is not None:
        overrides["models"] = models_override
    cfg = derive_config(torchserve_config_file(), root / "config.properties", ports, model_store=store,
                        overrides=overrides)
    if models_override is None:  # drop the shipped demo entry: only the archive's settings remain
        text = cfg.read_text().splitlines()
        cfg.write_text("\n".join(line for line in text if not line.startswith("models=")) + "\n")
    assert "disable_token_authorization" not in read_properties(cfg)
    env = dict(os.environ, TMPDIR=str(tmp), LOG_LOCATION=str(root / "logs"), METRICS_LOCATION=str(root / "logs"),
               OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TS_DISABLE_SYSTEM_METRICS="true")
    srv = Server(root, ports, {}, env, ts_bin)
    srv.config = cfg

    def stop():
        subprocess.run([ts_bin, "--stop"], cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       stdin=subprocess.DEVNULL, timeout=60)
        t_end = time.time() + 30
        while time.time() < t_end and any(_port_open(p) for p in ports.values()):
            time.sleep(0.3)

    srv.stop = stop
    t0 = time.time()
    start_log = root / "logs" / "start.log"
    held, srv.busy_at_start = _hold_ports(shipped_ports.values())
    try:
        with open(start_log, "wb") as log:  # the Java child inherits these: never a pipe
            proc = subprocess.run([ts_bin, "--start", "--ncs", "--model-store", str(store), "--models",
                                   f"{model}={model}.mar", "--ts-config", str(cfg)], cwd=root, env=env,
                                  stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, timeout=60)
        assert proc.returncode == 0, start_log.read_text()
        ready = False
        while time.time() - t0 < 120 and not ready:
            time.sleep(0.5)
            kf = root / "key_file.json"
            if not kf.is_file():
                continue
            try:
                srv.keys = json.loads(kf.read_text())
                code, _, body = srv.request(f"/models/{model}", method="GET", token="management", base=srv.mgmt,
                                            timeout=5)
            except (OSError, ValueError):
                continue
            if code == 200:
                workers = json.loads(body)[0].get("workers", [])
                ready = bool(workers) and all(w.get("status") == "READY" for w in workers)
        if not ready:
            raise RuntimeError(f"TorchServe not READY after 120 s\n{srv.logs()}")
        srv.startup_s = time.time() - t0
    except BaseException:
        stop()
        print(srv.logs(), file=sys.stderr)
        raise
    finally:
        for s in held:
            s.close()
    return srv


@pytest.fixture(scope="session")
def server(request, model_dir, tmp_path_factory):
    """TorchServe with the tiny model, on its own ports for all five listeners and its own temp folder.

    While it starts, the ports of the shipped ``config.properties`` (HTTP 8080-8082, gRPC
    7070/7071) are held by listening sockets, as a running ``make demo`` server would hold them.
    """
    from weclip_infer.export.mar import build_mar
    from weclip_infer.serving.ts_config import models_setting

    root = tmp_path_factory.mktemp("torchserve")
    store = root / "model_store"
    build_mar(model_dir, store, name=MODEL, serve_config=SERVE_CONFIG)
    # batches of up to 4 requests (different image sizes in one batch)
    srv = _start_server(root, store, MODEL, models_setting(MODEL, f"{MODEL}.mar", batch_size=BATCH_SIZE,
                                                           max_batch_delay_ms=BATCH_DELAY_MS)[7:])

    def stop():
        srv.stop()
        if request.session.testsfailed:
            print(srv.logs(), file=sys.stderr)

    request.addfinalizer(stop)
    return srv


def test_own_ports_while_the_shipped_ports_are_taken(server):
    """The test server started (READY) while every port of the shipped config was in use."""
    from weclip_infer.serving import torchserve_config_file
    from weclip_infer.serving.ts_config import PORT_KEYS, listen_ports, read_properties

    shipped = listen_ports(read_properties(torchserve_config_file()))
    assert set(shipped) == set(PORT_KEYS)  # the shipped config names all five listeners, gRPC included
    assert (shipped["grpc_inference"], shipped["grpc_management"]) == (7070, 7071)
    assert sorted(server.busy_at_start) == sorted(shipped.values())
    ours = listen_ports(read_properties(server.config))
    assert ours == server.ports and not set(ours.values()) & set(shipped.values())
    assert all(_port_open(p) for p in ours.values())  # gRPC listeners included


def test_ping_and_metrics(server):
    code, _, body = server.request("/ping", method="GET")
    assert code == 200 and json.loads(body)["status"] == "Healthy"
    print(f"TorchServe READY after {server.startup_s:.1f} s")


@pytest.mark.parametrize("shape,fmt", [((70, 90), "JPEG"), ((33, 50), "PNG"), ((128, 40), "JPEG")])
def test_png_equals_in_process(server, segmenter, shape, fmt):
    img = img_bytes(*shape, seed=shape[0], fmt=fmt)
    code, ctype, body = server.predict(img)
    assert code == 200, body
    assert ctype.startswith("image/png")
    got = decode_png(body)
    assert got.shape == shape
    assert np.array_equal(got, segmenter.predict(img).labels)
    # options as headers (the /predictions endpoint drops query strings in TorchServe 0.12)
    code, _, body = server.predict(img, {"X-WeCLIP-Scales": "1", "X-WeCLIP-Flip": "false"})
    assert code == 200, body
    assert np.array_equal(decode_png(body), segmenter.predict(img, scales=(1.0,), flip=False).labels)


def test_multipart_and_json_with_rle(server, segmenter):
    img = img_bytes(60, 45, seed=3)
    ref = segmenter.predict(img)
    body, ctype = multipart({"data": img, "output": "json", "rle": "true"})
    code, rtype, out = server.request(f"/predictions/{MODEL}", body, {"Content-Type": ctype})
    assert code == 200, out
    assert rtype.startswith("application/json")
    js = json.loads(out)
    assert js["size"] == [60, 45]
    present = [ref.class_names[i] for i in np.unique(ref.labels)]
    assert js["classes"] == present
    assert js["pixel_counts"] == ref.areas()
    assert set(js["scores"]) == set(ref.class_names)
    assert {"decode", "total"} <= set(js["timings"])
    for name in present:
        m = ref.labels == ref.class_names.index(name)
        assert np.array_equal(rle_decode(js["rle"][name], ref.labels.shape), m)
        if name != "background":
            ys, xs = np.nonzero(m)
            assert js["boxes"][name] == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
    # the same through a JSON body, and multipart with the part named "file"
    jb = json.dumps({"image": base64.b64encode(img).decode(), "output": "json"}).encode()
    code, _, out = server.request(f"/predictions/{MODEL}", jb, {"Content-Type": "application/json"})
    assert code == 200 and json.loads(out)["pixel_counts"] == ref.areas()
    body, ctype = multipart({"file": img})
    code, _, out = server.request(f"/predictions/{MODEL}", body, {"Content-Type": ctype})
    assert code == 200 and np.array_equal(decode_png(out), ref.labels)


def test_query_string_options(server, segmenter):
    """Query parameters reach the handler on the legacy /<model>/predict and /invocations routes."""
    img = img_bytes(50, 50, seed=4)
    code, ctype, out = server.predict(img, path=f"/{MODEL}/predict?output=json&scales=1&flip=false")
    assert code == 200, out
    assert json.loads(out)["pixel_counts"] == segmenter.predict(img, scales=(1.0,), flip=False).areas()
    code, _, out = server.predict(img, path=f"/invocations?model_name={MODEL}&output=gif")
    assert code == 400 and "output" in json.loads(out)["error"]


def test_overlay_is_jpeg(server):
    code, ctype, out = server.predict(img_bytes(64, 48, seed=5), {"X-WeCLIP-Output": "overlay"})
    assert code == 200, out
    assert ctype.startswith("image/jpeg") and out[:2] == b"\xff\xd8"
    assert Image.open(io.BytesIO(out)).size == (48, 64)


BAD = BAD_REQUESTS


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_inputs_are_4xx_and_worker_survives(server, case):
    body, headers, needle = BAD[case]
    code, ctype, out = server.predict(body, headers)
    assert 400 <= code < 500, (code, out[:300])
    if body:  # TorchServe's frontend answers a 0-byte body itself (its own JSON error)
        assert ctype.startswith("application/json")
        err = json.loads(out)["error"]
        assert needle in err, err
    else:
        assert json.loads(out)
    code, _, out = server.predict(img_bytes(40, 40, seed=9))
    assert code == 200, out


def test_bad_json_bodies(server):
    for body in (b'{"image": "%%%not base64"}', b'{"nope": 1}', b"[1, 2]"):
        code, _, out = server.request(f"/predictions/{MODEL}", body, {"Content-Type": "application/json"})
        assert 400 <= code < 500, (body, code, out)
        assert json.loads(out)


def _invalid_key(code, body) -> bool:
    """TorchServe's documented answer to a missing, wrong or expired key."""
    return code == 400 and json.loads(body)["type"] == "InvalidKeyException"


def test_token_failures_are_400_invalid_key(server):
    """docs/serving.md, "Authentication": what TorchServe answers without the right key."""
    img = img_bytes(32, 32)
    assert _invalid_key(*server.predict(img, token=None)[::2])  # no token
    assert _invalid_key(*server.predict(img, token="wrong-token")[::2])  # wrong token
    assert _invalid_key(*server.predict(img, token="management")[::2])  # management key on the inference API
    code, _, body = server.request(f"/models/{MODEL}", method="GET", token="inference", base=server.mgmt)
    assert _invalid_key(code, body)  # the inference key does not open the management API
    assert server.predict(img)[0] == 200


def test_health_checks(server):
    """/ping needs the inference key; describing the model needs the management key; /metrics none."""
    code, _, body = server.request("/ping", method="GET", token=None)
    assert _invalid_key(code, body)
    code, _, body = server.request("/ping", method="GET")
    assert code == 200 and json.loads(body)["status"] == "Healthy"
    code, _, body = server.request(f"/models/{MODEL}", method="GET", token="management", base=server.mgmt)
    assert code == 200 and all(w["status"] == "READY" for w in json.loads(body)[0]["workers"])
    code, _, _ = server.request("/metrics", method="GET", token=None,
                                base=f"http://127.0.0.1:{server.ports['metrics']}")
    assert code == 200


def test_token_api_refreshes_the_inference_key(server):
    """``GET /token?type=inference`` (management port, API key) replaces the inference key in key_file.json."""
    img = img_bytes(32, 32)
    old = server.keys["inference"]["key"]
    code, _, body = server.request("/token?type=inference", method="GET", token="management", base=server.mgmt)
    assert _invalid_key(code, body)  # the token API takes the API key only
    code, _, _ = server.request("/token?type=inference", method="GET", token="API", base=server.mgmt)
    assert code == 200
    server.keys = json.loads((server.root / "key_file.json").read_text())
    assert server.keys["inference"]["key"] != old
    assert _invalid_key(*server.predict(img, token=old)[::2])
    assert server.predict(img)[0] == 200


def _curl(*args: str) -> tuple:
    r = subprocess.run(["curl", "-sS", "-o", "-", "-w", "\n%{http_code}", *args], capture_output=True, timeout=120)
    body, _, code = r.stdout.rpartition(b"\n")
    return int(code), body


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
def test_content_types_as_documented(server, segmenter, tmp_path):
    """The curl lines of docs/serving.md, "Sending an image": each works; the form-encoded raw body is a 500."""
    img = img_bytes(48, 64, seed=11)
    ref = segmenter.predict(img).labels
    f = tmp_path / "img.jpg"
    f.write_bytes(img)
    (tmp_path / "img.b64").write_text(base64.b64encode(img).decode())
    url = f"{server.base}/predictions/{MODEL}"
    auth = ["-H", f"Authorization: Bearer {server.keys['inference']['key']}"]
    ok = {
        "raw, image/jpeg": ["-H", "Content-Type: image/jpeg", "--data-binary", f"@{f}"],
        "raw, octet-stream": ["-H", "Content-Type: application/octet-stream", "--data-binary", f"@{f}"],
        "upload (-T)": ["-T", str(f)],
        "multipart": ["-F", f"data=@{f}"],
        "form, base64": ["--data-urlencode", f"image@{tmp_path / 'img.b64'}"],
    }
    for name, args in ok.items():
        code, body = _curl(*auth, *args, url)
        assert code == 200, (name, body[:300])
        assert np.array_equal(decode_png(body), ref), name
    js = tmp_path / "body.json"
    js.write_text(json.dumps({"image": base64.b64encode(img).decode()}))
    code, body = _curl(*auth, "-H", "Content-Type: application/json", "--data-binary", f"@{js}", url)
    assert code == 200 and np.array_equal(decode_png(body), ref)
    # curl's default type for --data-binary is application/x-www-form-urlencoded: TorchServe's own
    # form decoder fails on binary data before the handler runs
    code, body = _curl(*auth, "--data-binary", f"@{f}", url)
    assert code == 500 and json.loads(body)["type"] == "ErrorDataDecoderException"


def test_batching_settings_read_back(server):
    """The test config's ``models=`` batching reaches TorchServe (and the shipped config sets the demo's)."""
    from weclip_infer.quickstart import MAR_NAME, MODEL_NAME
    from weclip_infer.serving import torchserve_config_file
    from weclip_infer.serving.ts_config import read_properties

    code, _, body = server.request(f"/models/{MODEL}", method="GET", token="management", base=server.mgmt)
    assert code == 200
    info = json.loads(body)[0]
    assert (info["batchSize"], info["maxBatchDelay"]) == (BATCH_SIZE, BATCH_DELAY_MS)
    shipped = json.loads(read_properties(torchserve_config_file())["models"])
    demo = shipped[MODEL_NAME]["1.0"]
    assert demo["marName"] == f"{MAR_NAME}.mar" and demo["batchSize"] > 1 and demo["maxBatchDelay"] > 0


def test_archive_batching_reaches_torchserve(model_dir, tmp_path):
    """An archive built with batching keeps it when the server's config.properties has no models=
    entry for it (without it TorchServe would run the model with batch size 1). The management
    API's registration is off in our config (TorchServe's default), so models load at start."""
    from weclip_infer.export.mar import build_mar

    store = tmp_path / "model_store"
    build_mar(model_dir, store, name=MODEL, serve_config=SERVE_CONFIG,
              batching={"batch_size": 5, "max_batch_delay_ms": 33, "response_timeout_s": 77})
    srv = _start_server(tmp_path, store, MODEL, None)
    try:
        assert not any(line.startswith("models=") for line in srv.config.read_text().splitlines())
        code, _, body = srv.request(f"/models/{MODEL}", method="GET", token="management", base=srv.mgmt)
        assert code == 200
        info = json.loads(body)[0]
        assert (info["batchSize"], info["maxBatchDelay"], info["responseTimeout"]) == (5, 33, 77)
    finally:
        srv.stop()


def test_concurrent_load(server, segmenter):
    """200 requests, 8 in flight (batches of up to 4 mixing sizes and one bad input per 25)."""
    sizes = [(40, 40), (64, 32), (30, 70), (50, 50)]
    imgs = {s: img_bytes(*s, seed=s[0] + s[1]) for s in sizes}
    refs = {s: segmenter.predict(imgs[s]).labels for s in sizes}

    def one(i):
        if i % 25 == 7:
            code, _, out = server.predict(b"garbage")
            return "bad-ok" if code == 400 else f"bad input got {code}"
        s = sizes[i % len(sizes)]
        code, _, out = server.predict(imgs[s])
        if code != 200:
            return f"{i}: HTTP {code} {out[:200]!r}"
        return "ok" if np.array_equal(decode_png(out), refs[s]) else f"{i}: mask differs"

    t0 = time.time()
    with ThreadPoolExecutor(8) as ex:
        results = list(ex.map(one, range(200)))
    dt = time.time() - t0
    errors = [r for r in results if r not in ("ok", "bad-ok")]
    assert not errors, errors[:5]
    print(f"200 requests, concurrency 8: {dt:.1f} s, {200 / dt:.1f} req/s")
    code, _, out = server.request("/metrics", method="GET", token=None,
                                  base=f"http://127.0.0.1:{server.ports['metrics']}")
    assert code == 200
    assert b"WeCLIPNetworkTime" in out and b"WeCLIPDecodeTime" in out


def test_oversized_headers_are_413_in_process(segmenter):
    """Both a header over our pixel limit and one past Pillow's own cap answer 413."""
    from weclip_infer.serving import SegmentationService

    svc = SegmentationService(segmenter, max_pixels=1_000_000)
    out = svc.handle([({"body": bomb_png(2000, 2000)}, {}), ({"body": bomb_png()}, {})])
    assert [r.status for r in out] == [413, 413], [r.body for r in out]


def test_request_cost_is_bounded_and_the_error_names_the_limit(model_dir, segmenter, tmp_path):
    """A request's own scales may ask for at most max_request_cost × the default request's network
    work (attention grows with the square of the tokens: a few scale-4 passes would take minutes);
    above it the request alone gets a 400 and its neighbours are answered."""
    h, _ = _handler(model_dir, tmp_path, max_request_cost=3)
    img = img_bytes(48, 64, seed=1)
    spy = h.service.network.backend = _Spy(h.service.network.backend)
    data = [{"body": bytearray(img), "scales": b"4,4"}, {"body": bytearray(img), "scales": b"1.5,1", "flip": b"true"},
            {"body": bytearray(img)}]
    out, codes = _run(h, data)
    assert codes == [400, 200, 200]
    msg = json.loads(out[0])["error"]
    assert "max_request_cost" in msg and "3×" in msg
    assert not any(s[-1] >= 4 * 512 // 2 for s in spy.shapes)  # the refused request never reached the network
    assert np.array_equal(decode_png(out[2]), segmenter.predict(img).labels)
    seg = h.service.segmenter
    assert seg.request_cost((48, 64)) == 1.0
    assert seg.request_cost((48, 64), scales=(4.0, 4.0)) > 3 > seg.request_cost((48, 64), scales=(1.5, 1.0), flip=True)


@pytest.mark.parametrize("bad", [0.5, True, "8", -1, 1e9])
def test_max_request_cost_is_validated(bad):
    from weclip_infer.serving import validate_serve_config

    with pytest.raises(ValueError, match="max_request_cost"):
        validate_serve_config({"max_request_cost": bad})
    assert validate_serve_config({})["max_request_cost"] == 8.0

"""Ray Serve deployment: the TorchServe endpoint's requests against a real Ray Serve on a private
2-CPU Ray cluster (127.0.0.1 only, started and stopped here), plus config/token checks without Ray.

The cluster fixture deploys the tiny model through the same code path as ``weclip-serve-ray``
(packaged config → overrides → ``deploy``), with a token file and a 1 MiB body limit.
"""
from __future__ import annotations

import base64
import http.client
import io
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("ray", reason="ray not installed (pip install -e '.[ray]')")
pytest.importorskip("ray.serve", reason="ray[serve] not installed (pip install -e '.[ray]')")
pytest.importorskip("python_multipart", reason="python-multipart not installed (pip install -e '.[ray]')")

from http_corpus import BAD_REQUESTS, decode_png, img_bytes, multipart  # noqa: E402

from weclip_infer.ray.cli import apply_overrides, load_config, main, write_new_token  # noqa: E402
from weclip_infer.ray.serve import resolve_token, validate_app_args  # noqa: E402
from weclip_infer.serving import rle_decode  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.slow]

MODEL = "weclip"
LIMIT = 1024 * 1024


# ---- helpers (the same request corpus as the TorchServe tests) --------------------------------------
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Server:
    def __init__(self, port: int, token: str):
        self.base = f"http://127.0.0.1:{port}"
        self.port = port
        self.token = token

    def request(self, path, body=None, headers=None, method="POST", token="default"):
        hdrs = dict(headers or {})
        tok = self.token if token == "default" else token
        if tok:
            hdrs["Authorization"] = f"Bearer {tok}"
        req = urllib.request.Request(self.base + path, data=body, headers=hdrs, method=method)
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                return r.status, r.headers.get("Content-Type", ""), r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.headers.get("Content-Type", ""), e.read()

    def predict(self, img: bytes, headers=None, path=f"/predictions/{MODEL}", token="default"):
        return self.request(path, img, headers, token=token)


# ---- no cluster needed: config, token and refusal paths --------------------------------------------
def test_packaged_config_and_overrides(tmp_path):
    cfg = load_config()
    assert cfg["http_options"]["host"] == "127.0.0.1"
    app = cfg["applications"][0]
    assert app["args"]["auth"] is True and app["args"]["max_request_bytes"] == 50 * 1024 * 1024
    over = apply_overrides(cfg, port=9123, replicas=3, num_gpus=0.5, max_batch_size=8, auth=False)
    dep = over["applications"][0]["deployments"][0]
    assert over["http_options"]["port"] == 9123 and dep["num_replicas"] == 3
    assert dep["ray_actor_options"]["num_gpus"] == 0.5 and over["applications"][0]["args"]["max_batch_size"] == 8
    assert cfg["applications"][0]["deployments"][0]["num_replicas"] == 1  # the loaded config is not changed
    with pytest.raises(ValueError, match="unknown override"):
        apply_overrides(cfg, colour="red")
    for bad in ({"max_batch_size": 0}, {"auth": "yes"}, {"model_name": "../x"}, {"batch_wait_timeout_s": -1},
                {"max_request_bytes": True}, {"modle": "typo"}):
        with pytest.raises(ValueError):
            validate_app_args(bad)
    bad_cfg = tmp_path / "bad.yaml"
    bad_cfg.write_text("applications:\n  - name: x\n    import_path: weclip_infer.ray.serve:app_builder\n"
                       "    args: {max_batch_size: -2}\n")
    with pytest.raises(ValueError, match="max_batch_size"):
        load_config(str(bad_cfg))


def test_token_sources_and_refusal(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("WECLIP_SERVE_TOKEN", raising=False)
    with pytest.raises(ValueError, match="WECLIP_SERVE_TOKEN"):
        resolve_token(True)
    assert resolve_token(False) is None  # only an explicit auth: false serves without a token
    monkeypatch.setenv("WECLIP_SERVE_TOKEN", "short")
    with pytest.raises(ValueError, match="too short"):
        resolve_token(True)
    monkeypatch.setenv("WECLIP_SERVE_TOKEN", "x" * 20)
    assert resolve_token(True) == "x" * 20
    f = write_new_token(str(tmp_path / "token"))
    assert stat.S_IMODE(os.stat(f).st_mode) == 0o600
    assert resolve_token(True, token_file=f) == open(f).read().strip() != "x" * 20  # the file wins
    with pytest.raises(ValueError, match="exists"):
        write_new_token(f)
    with pytest.raises(ValueError, match="cannot read token file"):
        resolve_token(True, token_file=str(tmp_path / "missing"))
    # the CLI refuses before starting anything
    monkeypatch.delenv("WECLIP_SERVE_TOKEN")
    assert main(["--port", "1"]) == 2
    assert "no token" in capsys.readouterr().err


# ---- a real Ray Serve -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(shared_tiny_model, tmp_path_factory):
    from weclip_infer.checkpoint import save_checkpoint

    d = tmp_path_factory.mktemp("ray_serve_model") / "model"
    save_checkpoint(shared_tiny_model, d, include_backbone=True)
    (d / "serve_config.json").write_text(json.dumps({"num_threads": 1, "max_pixels": 4_000_000}))
    return d


@pytest.fixture(scope="module")
def segmenter(model_dir):
    from weclip_infer.predictor import Segmenter

    return Segmenter.from_pretrained(model_dir, device="cpu")


@pytest.fixture(scope="module")
def ray_server(model_dir, tmp_path_factory):
    import ray
    from ray import serve

    from weclip_infer.ray.cli import deploy

    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    token_file = write_new_token(str(tmp_path_factory.mktemp("ray_token") / "token"))
    port = _free_port()
    cfg = apply_overrides(load_config(), port=port, model=str(model_dir), token_file=token_file,
                          max_request_bytes=LIMIT, num_cpus=1)
    t0 = time.time()
    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
             object_store_memory=200 * 1024 * 1024, logging_level="WARNING")
    try:
        url = deploy(cfg)
        assert url == f"http://127.0.0.1:{port}/predictions/{MODEL}"
        srv = _Server(port, open(token_file).read().strip())
        srv.startup_s = time.time() - t0
        yield srv
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


def test_ping(ray_server):
    code, _, body = ray_server.request("/ping", method="GET", token=None)
    assert code == 200 and json.loads(body)["status"] == "Healthy"
    print(f"Ray Serve ready after {ray_server.startup_s:.1f} s")


@pytest.mark.parametrize("shape,fmt", [((70, 90), "JPEG"), ((33, 50), "PNG"), ((128, 40), "JPEG")])
def test_png_equals_in_process(ray_server, segmenter, shape, fmt):
    img = img_bytes(*shape, seed=shape[0], fmt=fmt)
    code, ctype, body = ray_server.predict(img)
    assert code == 200, body
    assert ctype.startswith("image/png")
    got = decode_png(body)
    assert got.shape == shape
    assert np.array_equal(got, segmenter.predict(img).labels)
    code, _, body = ray_server.predict(img, {"X-WeCLIP-Scales": "1", "X-WeCLIP-Flip": "false"})
    assert code == 200, body
    assert np.array_equal(decode_png(body), segmenter.predict(img, scales=(1.0,), flip=False).labels)


def test_multipart_and_json_with_rle(ray_server, segmenter):
    img = img_bytes(60, 45, seed=3)
    ref = segmenter.predict(img)
    body, ctype = multipart({"data": img, "output": "json", "rle": "true"})
    code, rtype, out = ray_server.request(f"/predictions/{MODEL}", body, {"Content-Type": ctype})
    assert code == 200, out
    assert rtype.startswith("application/json")
    js = json.loads(out)
    assert js["size"] == [60, 45]
    present = [ref.class_names[i] for i in np.unique(ref.labels)]
    assert js["classes"] == present and js["pixel_counts"] == ref.areas()
    for name in present:
        assert np.array_equal(rle_decode(js["rle"][name], ref.labels.shape), ref.labels == ref.class_names.index(name))
    jb = json.dumps({"image": base64.b64encode(img).decode(), "output": "json"}).encode()
    code, _, out = ray_server.request(f"/predictions/{MODEL}", jb, {"Content-Type": "application/json"})
    assert code == 200 and json.loads(out)["pixel_counts"] == ref.areas()
    body, ctype = multipart({"file": img})
    code, _, out = ray_server.request(f"/predictions/{MODEL}", body, {"Content-Type": ctype})
    assert code == 200 and np.array_equal(decode_png(out), ref.labels)


def test_query_string_options(ray_server, segmenter):
    img = img_bytes(50, 50, seed=4)
    code, _, out = ray_server.predict(img, path=f"/predictions/{MODEL}?output=json&scales=1&flip=false")
    assert code == 200, out
    assert json.loads(out)["pixel_counts"] == segmenter.predict(img, scales=(1.0,), flip=False).areas()
    code, _, out = ray_server.predict(img, path=f"/predictions/{MODEL}?output=gif")
    assert code == 400 and "output" in json.loads(out)["error"]


def test_overlay_is_jpeg(ray_server):
    code, ctype, out = ray_server.predict(img_bytes(64, 48, seed=5), {"X-WeCLIP-Output": "overlay"})
    assert code == 200, out
    assert ctype.startswith("image/jpeg") and out[:2] == b"\xff\xd8"
    assert Image.open(io.BytesIO(out)).size == (48, 64)


BAD = {**BAD_REQUESTS, "zero_bytes": (b"", {}, "image")}  # Ray Serve answers an empty body itself


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_inputs_are_4xx_and_replica_survives(ray_server, case):
    body, headers, needle = BAD[case]
    code, ctype, out = ray_server.predict(body, headers)
    assert 400 <= code < 500, (code, out[:300])
    assert ctype.startswith("application/json")
    err = json.loads(out)["error"]
    assert needle in err, err
    code, _, out = ray_server.predict(img_bytes(40, 40, seed=9))
    assert code == 200, out


def test_bad_json_and_multipart_bodies(ray_server):
    for body in (b'{"image": "%%%not base64"}', b'{"nope": 1}', b"[1, 2]", b"{not json"):
        code, _, out = ray_server.request(f"/predictions/{MODEL}", body, {"Content-Type": "application/json"})
        assert 400 <= code < 500, (body, code, out)
        assert json.loads(out)["error"]
    code, _, out = ray_server.request(f"/predictions/{MODEL}", b"--x\r\ngarbage",
                                  {"Content-Type": "multipart/form-data; boundary=x"})
    assert 400 <= code < 500, (code, out)
    body, ctype = multipart({f"f{i}": "1" for i in range(40)})  # more parts than allowed
    code, _, out = ray_server.request(f"/predictions/{MODEL}", body, {"Content-Type": ctype})
    assert code == 400 and json.loads(out)["error"]


def test_token_required(ray_server):
    img = img_bytes(32, 32)
    for token in (None, "wrong-token-wrong-token"):
        code, _, out = ray_server.predict(img, token=token)
        assert code == 401 and "token" in json.loads(out)["error"]
    code, _, _ = ray_server.predict(img, headers={"Authorization": f"Basic {ray_server.token}"}, token=None)
    assert code == 401
    assert ray_server.predict(img)[0] == 200


def test_routes(ray_server):
    assert ray_server.request(f"/predictions/{MODEL}", method="GET")[0] == 405
    assert ray_server.request("/predictions/other", img_bytes(32, 32))[0] == 404
    assert ray_server.request("/ping", b"x")[0] == 405


def test_request_size_limit(ray_server):
    big = b"\xff" * (LIMIT + 1)
    code, _, out = ray_server.predict(big)  # declared Content-Length over the limit
    assert code == 413 and "limit" in json.loads(out)["error"]
    conn = http.client.HTTPConnection("127.0.0.1", ray_server.port, timeout=120)  # chunked: no length declared
    try:
        conn.request("POST", f"/predictions/{MODEL}", body=iter([big[: LIMIT // 2], big[LIMIT // 2:]]),
                     headers={"Authorization": f"Bearer {ray_server.token}"}, encode_chunked=True)
        r = conn.getresponse()
        assert r.status == 413 and "limit" in json.loads(r.read())["error"]
    finally:
        conn.close()
    assert ray_server.predict(img_bytes(40, 40, seed=9))[0] == 200


def test_concurrent_soak(ray_server, segmenter):
    """100 requests from 4 clients (mixed sizes, one bad input in 20): every answer correct."""
    sizes = [(40, 40), (64, 32), (30, 70), (50, 50)]
    imgs = {s: img_bytes(*s, seed=s[0] + s[1]) for s in sizes}
    refs = {s: segmenter.predict(imgs[s]).labels for s in sizes}

    def one(i):
        if i % 20 == 7:
            code, _, out = ray_server.predict(b"garbage")
            return "bad-ok" if code == 400 else f"bad input got {code}"
        s = sizes[i % len(sizes)]
        code, _, out = ray_server.predict(imgs[s])
        if code != 200:
            return f"{i}: HTTP {code} {out[:200]!r}"
        return "ok" if np.array_equal(decode_png(out), refs[s]) else f"{i}: mask differs"

    t0 = time.time()
    with ThreadPoolExecutor(4) as ex:
        results = list(ex.map(one, range(100)))
    dt = time.time() - t0
    errors = [r for r in results if r not in ("ok", "bad-ok")]
    assert not errors, errors[:5]
    assert results.count("bad-ok") == 5
    print(f"100 requests, 4 clients: {dt:.1f} s, {100 / dt:.1f} req/s")


def test_cli_serves_and_stops_on_sigint(model_dir, tmp_path):
    """``weclip-serve-ray`` end to end: its own private Ray, a token file, a prediction, a clean stop."""
    token_file = write_new_token(str(tmp_path / "token"))
    token = open(token_file).read().strip()
    port = _free_port()
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "weclip_infer.ray.cli", "--model", str(model_dir), "--port",
                             str(port), "--token-file", token_file, "--cluster-cpus", "2", "--num-cpus", "1"],
                            stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, RAY_USAGE_STATS_ENABLED="0"))
    srv = _Server(port, token)
    try:
        deadline, ready = time.time() + 300, False
        while time.time() < deadline and proc.poll() is None and not ready:
            try:
                ready = srv.request("/ping", method="GET", token=None)[0] == 200
            except OSError:
                time.sleep(1)
        assert ready, (tmp_path / "serve.log").read_text()[-3000:]
        while time.time() < deadline and "serving http://127.0.0.1" not in (tmp_path / "serve.log").read_text():
            time.sleep(0.5)  # the stop handlers are in place once the CLI says it is serving
        img = img_bytes(40, 56, seed=11)
        code, ctype, body = srv.predict(img)
        assert code == 200 and ctype.startswith("image/png") and decode_png(body).shape == (40, 56)
        assert srv.predict(img, token=None)[0] == 401
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 0, (tmp_path / "serve.log").read_text()[-3000:]
        assert "stopping" in (tmp_path / "serve.log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=60)
        log.close()


def test_ray_serve_run_with_the_shipped_config(model_dir, tmp_path):
    """Ray's own ``serve run`` on (a copy of) the shipped config: app_builder, token from the environment."""
    import yaml

    from weclip_infer.ray import serve_config_file

    cfg = yaml.safe_load(serve_config_file().read_text())
    port = _free_port()
    cfg["http_options"]["port"] = port
    cfg["applications"][0]["args"]["model"] = str(model_dir)
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(cfg))
    token = "t" * 8 + uuid.uuid4().hex
    serve_bin = Path(sys.executable).with_name("serve")
    if not serve_bin.is_file():
        pytest.skip("Ray's serve CLI not found next to the interpreter")
    log = open(tmp_path / "serve.log", "w")
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", WECLIP_SERVE_TOKEN=token)
    proc = subprocess.Popen([str(serve_bin), "run", str(tmp_path / "serve.yaml")], stdout=log,
                            stderr=subprocess.STDOUT, env=env, cwd=tmp_path, start_new_session=True)
    srv = _Server(port, token)
    try:
        deadline, code = time.time() + 300, 0
        while time.time() < deadline and proc.poll() is None and code != 200:
            try:
                code = srv.predict(img_bytes(40, 40, seed=1))[0]
            except OSError:
                time.sleep(1)
        assert code == 200, (tmp_path / "serve.log").read_text()[-3000:]
        assert srv.predict(img_bytes(40, 40, seed=1), token=None)[0] == 401
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # serve run shuts Serve and its Ray down on Ctrl-C
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=60)
        log.close()

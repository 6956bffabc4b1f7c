"""``make demo`` / ``make stop`` against a real TorchServe: own server only, key refresh, legend grid.

The demo runs from a private working folder with a copy of the shipped ``config.properties`` on
free ports and keys that expire after a few seconds, so the launcher must notice its own server's
expired keys and refresh them. ``--stop`` must stop exactly that server and nothing else.
Skipped only when ``java`` or ``torchserve`` is missing.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("ts", reason="torchserve not installed (pip install -e '.[serve]'; `make test` does)")
psutil = pytest.importorskip("psutil")

from weclip_infer import quickstart as q  # noqa: E402
from weclip_infer.serving import torchserve_config_file  # noqa: E402
from weclip_infer.serving.ts_config import derive_config, free_ports, listen_ports, read_properties  # noqa: E402

TOKEN_MIN = 0.1  # keys expire 6 s after they are made


def _port_open(port: int) -> bool:
    import socket

    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _expiry(workdir: Path) -> float:
    kf = json.loads((workdir / "key_file.json").read_text())
    stamp = kf["inference"]["expiration time"][:26].rstrip("Z")  # e.g. 2026-11-30T06:45:58.174651
    return datetime.fromisoformat(stamp + "+00:00").timestamp()


def test_legend_grid_shows_every_class_colour():
    from weclip_infer.palette import voc_palette

    names = ["background", "a", "b", "c", "d", "e"]
    tile = np.full((20, 40, 3), 128, np.uint8)
    grid = q.legend_grid([tile, tile], ["x.jpg: a", "y.jpg: no class found"], names, width=256)
    assert grid.shape[1] == 256 and grid.shape[0] > 2 * 128  # two tiles + captions + legend
    legend = grid[-60:].reshape(-1, 3)
    for i in range(1, len(names)):
        assert (legend == voc_palette()[i]).all(axis=1).any(), names[i]


@pytest.fixture()
def demo_env(tmp_path, monkeypatch):
    if shutil.which("java") is None:
        pytest.skip("java not found (TorchServe needs a JRE)")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    wd = tmp_path / "work"
    wd.mkdir()
    cfg = derive_config(torchserve_config_file(), tmp_path / "demo.properties", free_ports(),
                        overrides={"token_expiration_min": str(TOKEN_MIN)})
    yield wd, cfg
    q.stop(wd)  # never leave a server behind, whatever failed


@pytest.mark.serve
@pytest.mark.slow
def test_demo_reuses_its_server_refreshes_keys_and_stops_only_itself(demo_env, tmp_path, capsys):
    wd, cfg = demo_env
    ports = listen_ports(read_properties(cfg))
    out = tmp_path / "out"
    assert q.main(["--workdir", str(wd), "--config", str(cfg), "--out", str(out)]) == 0
    state = json.loads((wd / q.STATE_FILE).read_text())
    proc = q.own_server(wd)
    assert proc is not None and proc.pid == state["pid"] and state["workdir"] == str(wd)
    samples = q.ensure_samples()
    assert sorted(p.name for p in out.glob("*_mask.png")) == sorted(f"{p.stem}_mask.png" for p in samples)
    grid = np.asarray(Image.open(out / "grid.png"))
    assert grid.shape[1] == 512
    printed = capsys.readouterr().out
    assert "classes found" in printed and "demo_0.jpg" in printed

    # the shipped batching reached the demo server (fresh keys: these expire within seconds)
    key = q.refresh_keys(wd, state["management_address"])["management"]
    code, body, _ = q._call(f"{state['management_address']}/models/{q.MODEL_NAME}", key)
    assert code == 200 and json.loads(body)[0]["batchSize"] == json.loads(
        read_properties(cfg)["models"])[q.MODEL_NAME]["1.0"]["batchSize"]

    # its keys expire; the next run detects its own server and refreshes them
    old_key = q._keys(wd)["inference"]
    time.sleep(max(0.0, _expiry(wd) - time.time()) + 1.0)
    code, body, _ = q._call(f"{state['inference_address']}/ping", old_key)
    assert code == 400 and b"InvalidKeyException" in body  # expired
    assert q.main(["--workdir", str(wd), "--config", str(cfg), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "refreshing" in printed and "re-using it" in printed
    assert q.own_server(wd).pid == state["pid"]  # the same server, not a new one
    assert q._keys(wd)["inference"] != old_key

    # a second demo from another folder on the same ports refuses to start (nothing is clobbered)
    other = tmp_path / "other"
    other.mkdir()
    assert q.main(["--workdir", str(other), "--config", str(cfg), "--out", str(tmp_path / "o2")]) == 1
    assert "in use" in capsys.readouterr().err
    # --stop elsewhere stops nothing: no record there, or a record naming our pid from another folder
    assert q.main(["--workdir", str(other), "--stop"]) == 0
    (other / q.STATE_FILE).write_text(json.dumps({**state, "workdir": str(other)}))
    assert q.main(["--workdir", str(other), "--stop"]) == 0
    assert not (other / q.STATE_FILE).exists()
    # a record whose pid is some other program (pid reused) is not stopped either
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], cwd=wd)
    try:
        fake = {**state, "pid": sleeper.pid, "create_time": psutil.Process(sleeper.pid).create_time()}
        (other / q.STATE_FILE).write_text(json.dumps(fake))
        assert q.own_server(other) is None
        assert q.main(["--workdir", str(other), "--stop"]) == 0
        assert sleeper.poll() is None
    finally:
        sleeper.kill()
        sleeper.wait()
    assert proc.is_running() and _port_open(ports["inference"])

    # make stop from the demo's folder stops it: frontend, workers, all listeners, the record
    workers = proc.children(recursive=True)
    assert q.main(["--workdir", str(wd), "--stop"]) == 0
    assert "stopped the demo TorchServe" in capsys.readouterr().out
    assert not proc.is_running() and not any(w.is_running() for w in workers)
    assert not any(_port_open(p) for p in ports.values())
    assert not (wd / q.STATE_FILE).exists() and not Path(state["tmpdir"]).exists()


def test_stop_with_a_stale_record_stops_nothing(tmp_path, capsys):
    """The recorded server is gone (its pid exited): the record and its temp folder are removed."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    tmpdir = tmp_path / "weclip-demo-x"
    tmpdir.mkdir()
    (tmp_path / q.STATE_FILE).write_text(json.dumps({"pid": p.pid, "create_time": 0.0, "workdir": str(tmp_path),
                                                     "tmpdir": str(tmpdir)}))
    assert q.main(["--workdir", str(tmp_path), "--stop"]) == 0
    assert "no longer running" in capsys.readouterr().out
    assert not (tmp_path / q.STATE_FILE).exists() and not tmpdir.exists()

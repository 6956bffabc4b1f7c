"""``make demo``: the main job on the embedded default model, through TorchServe.

1. builds ``model_store/weclip_demo.mar`` from the shipped demo checkpoint if it is missing;
2. starts TorchServe on 127.0.0.1 with ``config.properties`` (token auth on) unless the server
   this demo started from the same working folder is still running — re-running is safe, and
   expired keys of that server are refreshed through TorchServe's token API;
3. waits until the model is READY, uploads the bundled sample images, writes the returned masks
   and an overlay grid with a colour legend and the classes found per image into ``out/``;
4. prints the curl command (with the token header) for another image and how to stop.

``python -m weclip_infer.quickstart --stop`` (``make stop``) stops the server this demo started
from the working folder — the one recorded in ``<workdir>/.weclip_demo.json`` (process id, start
time, working folder), checked before anything is stopped; never another TorchServe.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

__all__ = ["main", "DEMO_MODEL_DIR", "SAMPLES_DIR", "STATE_FILE", "ensure_samples", "own_server", "stop"]

PKG = Path(__file__).resolve().parent
ASSETS = PKG / "assets"
DEMO_MODEL_DIR = ASSETS / "demo_model"
SAMPLES_DIR = ASSETS / "samples"
MODEL_NAME = "weclip"
MAR_NAME = "weclip_demo"
STATE_FILE = ".weclip_demo.json"  # in the working folder: which server this demo started
_FRONTEND_CLASS = "org.pytorch.serve.ModelServer"


class DemoError(RuntimeError):
    """A failure the demo explains in one line."""


def _config_file() -> Path:
    """The TorchServe ``config.properties`` shipped in the package (works from a wheel too)."""
    from .serving import torchserve_config_file

    return torchserve_config_file()


def _keys(root: Path) -> Dict[str, str]:
    """``{"inference", "management", "API"}`` keys from ``key_file.json`` (empty when unreadable)."""
    try:
        data = json.loads((root / "key_file.json").read_text())
        return {k: data[k]["key"] for k in ("inference", "management", "API") if k in data}
    except (OSError, KeyError, TypeError, ValueError):
        return {}


def _call(url: str, key: Optional[str], data: Optional[bytes] = None, headers: Optional[dict] = None,
          timeout: float = 60) -> Tuple[int, bytes, str]:
    """``(status, body, content type)``; HTTP error statuses are returned, connection errors raised."""
    h = dict(headers or {})
    if key:
        h["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(url, data=data, headers=h, method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read(), r.headers.get("Content-Type", "")
    except urllib.error.HTTPError as e:
        return e.code, e.read(), e.headers.get("Content-Type", "")


def _invalid_key(status: int, body: bytes) -> bool:
    """TorchServe's answer to a missing, wrong or expired key: 400 ``InvalidKeyException``."""
    return status == 400 and b"InvalidKeyException" in body


def _model_state(mgmt: str, key: Optional[str]) -> str:
    """``ready`` | ``loading`` | ``bad-key`` | ``absent`` | ``down`` for the demo model."""
    try:
        status, body, _ = _call(f"{mgmt}/models/{MODEL_NAME}", key, timeout=5)
    except (urllib.error.URLError, OSError):
        return "down"
    if _invalid_key(status, body):
        return "bad-key"
    if status != 200:
        return "absent"
    try:
        info = json.loads(body)
        ready = any(w.get("status") == "READY" for m in info for w in m.get("workers", []))
    except (ValueError, AttributeError, TypeError):
        return "absent"
    return "ready" if ready else "loading"


def _model_state_refreshing(root: Path, mgmt: str) -> str:
    """:func:`_model_state` with the management key of ``root``; expired keys are refreshed once."""
    st = _model_state(mgmt, _keys(root).get("management"))
    if st == "bad-key" and _keys(root).get("API"):
        print("the demo server's keys have expired: refreshing them through TorchServe's token API", flush=True)
        refresh_keys(root, mgmt)
        st = _model_state(mgmt, _keys(root).get("management"))
    return st


def refresh_keys(root: Path, mgmt: str) -> Dict[str, str]:
    """New inference and management keys from TorchServe's token API (authorised by the ``API`` key).

    TorchServe rewrites ``key_file.json`` in its working folder; the new keys are returned.
    """
    api = _keys(root).get("API")
    if not api:
        raise DemoError(f"cannot refresh the TorchServe keys: no API key in {root / 'key_file.json'}; "
                        "restart the server (make stop; make demo)")
    for kind in ("management", "inference"):
        status, body, _ = _call(f"{mgmt}/token?type={kind}", api, timeout=10)
        if status != 200:
            raise DemoError(f"TorchServe refused to refresh the {kind} key (HTTP {status}): {body[:200]!r}")
    return _keys(root)


def _port_in_use(port: int) -> bool:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


# ---- which server is ours ---------------------------------------------------------------------------
def _read_state(root: Path) -> Optional[Dict[str, Any]]:
    try:
        st = json.loads((root / STATE_FILE).read_text())
        return st if isinstance(st, dict) and isinstance(st.get("pid"), int) else None
    except (OSError, ValueError):
        return None


def own_server(root: Path, state: Optional[Dict[str, Any]] = None):
    """The running TorchServe frontend this demo started from ``root`` (a ``psutil.Process``), or None.

    The recorded process must still exist with the recorded start time (a recycled pid does not
    match), run TorchServe's frontend, and have ``root`` as its working folder.
    """
    import psutil

    state = state if state is not None else _read_state(root)
    if not state:
        return None
    try:
        p = psutil.Process(int(state["pid"]))
        same_start = abs(p.create_time() - float(state.get("create_time", -1))) < 1.0
        is_frontend = _FRONTEND_CLASS in p.cmdline()
        same_dir = Path(p.cwd()).resolve() == root.resolve()
    except (psutil.Error, OSError, KeyError, TypeError, ValueError):
        return None
    return p if (same_start and is_frontend and same_dir) else None


def _forget(root: Path, state: Optional[Dict[str, Any]]) -> None:
    """Remove the state file and the private temp folder of a server that is gone."""
    if state and state.get("tmpdir") and Path(state["tmpdir"]).name.startswith("weclip-demo-"):
        shutil.rmtree(state["tmpdir"], ignore_errors=True)
    (root / STATE_FILE).unlink(missing_ok=True)


# ---- samples --------------------------------------------------------------------------------------------
def ensure_samples() -> list[Path]:
    """The bundled sample images (demo-world scenes + one photo-like synthetic picture)."""
    paths = sorted(SAMPLES_DIR.glob("*.jpg"))
    if paths:
        return paths
    from PIL import Image

    from .demo.world import SPLIT_OFFSETS, WorldConfig, generate_sample

    SAMPLES_DIR.mkdir(parents=True, exist_ok=True)
    for k in range(5):
        s = generate_sample(2024, SPLIT_OFFSETS["test"] + k, WorldConfig())
        Image.fromarray(s.image).save(SAMPLES_DIR / f"demo_{k}.jpg", quality=92)
    Image.fromarray(_photo_like()).save(SAMPLES_DIR / "photo_like.jpg", quality=92)
    return sorted(SAMPLES_DIR.glob("*.jpg"))


def _photo_like(h: int = 360, w: int = 480) -> np.ndarray:
    """A photo-like synthetic picture: sky gradient, sun, hills, a red ball on a meadow."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    rng = np.random.default_rng(7)
    img = np.zeros((h, w, 3), np.float32)
    sky = np.clip(y / (0.55 * h), 0, 1)[..., None]
    img[:] = (1 - sky) * np.array([90, 140, 220]) + sky * np.array([200, 220, 240])
    sun = ((x - 0.8 * w) ** 2 + (y - 0.18 * h) ** 2) < (0.06 * h) ** 2
    img[sun] = [255, 235, 160]
    hill = y > 0.55 * h + 0.08 * h * np.sin(x / w * 6.0)
    img[hill] = np.array([70, 130, 60]) + rng.normal(0, 12, (int(hill.sum()), 3))
    ball = ((x - 0.35 * w) ** 2 + (y - 0.75 * h) ** 2) < (0.09 * h) ** 2
    shade = np.clip(1.2 - ((x - 0.33 * w) ** 2 + (y - 0.72 * h) ** 2) / (0.09 * h) ** 2 * 0.5, 0.5, 1.2)
    img[ball] = (np.array([210, 30, 30]) * shade[ball][:, None])
    img += rng.normal(0, 3, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


# ---- the grid with a legend ----------------------------------------------------------------------------
def legend_grid(tiles: Sequence[np.ndarray], captions: Sequence[str], class_names: Sequence[str],
                width: int = 512) -> np.ndarray:
    """Stack ``tiles`` (image | overlay pairs) with a caption line each and a colour legend below.

    ``class_names`` includes ``background`` first; the legend shows every foreground class in
    its palette colour (the colours of the overlays and of the mask PNGs).
    """
    from PIL import Image, ImageDraw, ImageFont

    from .palette import voc_palette

    font = ImageFont.load_default()
    pal = voc_palette()
    line_h = 14
    rows: List[np.ndarray] = []
    for tile, cap in zip(tiles, captions):
        im = Image.fromarray(tile).resize((width, max(1, int(width * tile.shape[0] / tile.shape[1]))))
        band = Image.new("RGB", (width, line_h + 6), (255, 255, 255))
        ImageDraw.Draw(band).text((4, 3), cap, fill=(0, 0, 0), font=font)
        rows += [np.asarray(band), np.asarray(im)]
    fg = list(enumerate(class_names))[1:]
    per_row = 4
    n_lines = (len(fg) + per_row - 1) // per_row
    legend = Image.new("RGB", (width, 8 + line_h * (n_lines + 1)), (255, 255, 255))
    d = ImageDraw.Draw(legend)
    d.text((4, 4), "legend (overlay and mask colours):", fill=(0, 0, 0), font=font)
    col_w = width // per_row
    for k, (idx, name) in enumerate(fg):
        x, y = 4 + (k % per_row) * col_w, 4 + line_h * (1 + k // per_row)
        d.rectangle([x, y + 1, x + 10, y + 11], fill=tuple(int(c) for c in pal[idx]), outline=(0, 0, 0))
        d.text((x + 14, y), f"{idx} {name}", fill=(0, 0, 0), font=font)
    rows.append(np.asarray(legend))
    return np.concatenate(rows, axis=0)


# ---- start / stop -----------------------------------------------------------------------------------
def _build_mar(root: Path) -> Path:
    from .export.mar import build_mar

    store = root / "model_store"
    mar = store / f"{MAR_NAME}.mar"
    if mar.is_file():
        return mar
    if not (DEMO_MODEL_DIR / "config.json").is_file():
        raise FileNotFoundError(f"the embedded demo model is missing: {DEMO_MODEL_DIR}")
    print(f"building {mar} from {DEMO_MODEL_DIR} ...", flush=True)
    return build_mar(DEMO_MODEL_DIR, store, name=MAR_NAME)


def _torchserve() -> str:
    return shutil.which("torchserve") or str(Path(sys.executable).parent / "torchserve")


def _start(root: Path, config: Path, addresses: Dict[str, str], ports: Dict[str, int]) -> None:
    import psutil

    from .io_utils import write_json_atomic

    if shutil.which("java") is None:
        raise DemoError("TorchServe needs Java 11+ (e.g. apt-get install openjdk-17-jre-headless)")
    busy = [f"{name} {port}" for name, port in ports.items() if _port_in_use(port)]
    if busy:
        raise DemoError(f"ports in use by another program: {', '.join(busy)}; stop it, or copy {config} with other "
                        "ports (all five listeners) and pass it with --config")
    # A private temp folder: TorchServe's pid file and the worker sockets live there, so this
    # server can neither see nor collide with another TorchServe on the machine.
    tmp = tempfile.mkdtemp(prefix="weclip-demo-")
    (root / "logs").mkdir(exist_ok=True)
    env = {**os.environ, "LOG_LOCATION": str(root / "logs"), "METRICS_LOCATION": str(root / "logs"),
           "TMPDIR": tmp, "TEMP": tmp}
    cmd = [_torchserve(), "--start", "--ncs", "--model-store", "model_store", "--models",
           f"{MODEL_NAME}={MAR_NAME}.mar", "--ts-config", str(config)]
    print("starting:", " ".join(cmd[1:]), flush=True)
    start_log = root / "logs" / "torchserve_start.log"
    try:
        with open(start_log, "wb") as log:
            subprocess.run(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                           check=True, timeout=120)
        pid = int((Path(tmp) / ".model_server.pid").read_text().strip())
        proc = psutil.Process(pid)
        state = {"pid": pid, "create_time": proc.create_time(), "workdir": str(root), "tmpdir": tmp,
                 "config": str(config), **addresses}
    except (OSError, ValueError, psutil.Error, subprocess.SubprocessError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DemoError(f"TorchServe did not start; see {start_log}") from e
    write_json_atomic(root / STATE_FILE, state)
    deadline = time.time() + 180
    while time.time() < deadline:
        if own_server(root, state) is None:
            raise DemoError(f"TorchServe exited during start-up; see {root / 'logs'}")
        if _model_state_refreshing(root, addresses["management_address"]) == "ready":
            return
        time.sleep(1.0)
    raise DemoError(f"TorchServe did not report the model READY within 180 s; see {root / 'logs'} "
                    "(it is still running: make stop)")


def stop(root: Path, timeout: float = 60.0) -> int:
    """Stop the TorchServe this demo started from ``root`` (and its workers); nothing else."""
    import psutil

    state = _read_state(root)
    if state is None:
        print(f"no demo server recorded in {root / STATE_FILE}: nothing stopped")
        return 0
    proc = own_server(root, state)
    if proc is None:
        _forget(root, state)
        print(f"the demo server started from {root} is no longer running (record removed); nothing stopped")
        return 0
    family = [proc, *proc.children(recursive=True)]
    proc.terminate()  # TorchServe's frontend stops its Python workers on SIGTERM
    gone, alive = psutil.wait_procs(family, timeout=timeout)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=10)
    (root / "key_file.json").unlink(missing_ok=True)  # its keys are void now
    _forget(root, state)
    print(f"stopped the demo TorchServe (pid {proc.pid}) started from {root}")
    return 0


def _ensure_server(root: Path, config: Path) -> Tuple[str, str]:
    """Start or re-use the demo server; returns ``(inference URL, management URL)``."""
    from .serving.ts_config import listen_ports, read_properties

    props = read_properties(config)
    inf, mgmt = props["inference_address"], props["management_address"]
    state = _read_state(root)
    if state is not None and own_server(root, state) is not None:
        inf, mgmt = state.get("inference_address", inf), state.get("management_address", mgmt)
        st = _model_state_refreshing(root, mgmt)
        deadline = time.time() + 180
        while st == "loading" and time.time() < deadline:
            time.sleep(1.0)
            st = _model_state_refreshing(root, mgmt)
        if st != "ready":
            raise DemoError(f"the demo server (pid {state['pid']}) is running but model '{MODEL_NAME}' is not ready "
                            f"({st}); run `make stop` and `make demo` again")
        print(f"TorchServe is already running with model '{MODEL_NAME}' at {inf} (re-using it)")
        return inf, mgmt
    if state is not None:
        _forget(root, state)  # a record of a server that is gone
    _start(root, config, {"inference_address": inf, "management_address": mgmt}, listen_ports(props))
    return inf, mgmt


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="weclip-demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="out", help="folder for the masks and grid.png (default: out)")
    ap.add_argument("--workdir", default=".", help="server working folder: model_store/, logs/, key_file.json, "
                    f"{STATE_FILE} (default: the current folder)")
    ap.add_argument("--config", default=None, help="TorchServe config.properties to start with (default: the one "
                    "shipped in the package); a copy with other ports runs a second demo beside the first")
    ap.add_argument("--stop", action="store_true", help="stop the TorchServe this demo started from --workdir")
    ap.add_argument("--debug", action="store_true", help="show the traceback of an error")
    a = ap.parse_args(argv)
    root = Path(a.workdir).resolve()
    try:
        try:
            import psutil  # noqa: F401 - installed with TorchServe
            import ts  # noqa: F401
        except ImportError:
            raise DemoError("TorchServe is not installed in this Python (pip install -e '.[serve]'; "
                            "`make demo` does)") from None
        if a.stop:
            return stop(root)
        config = Path(a.config).resolve() if a.config else _config_file()
        if not config.is_file():
            raise DemoError(f"{config}: config file not found")
        _build_mar(root)
        samples = ensure_samples()
        inf, mgmt = _ensure_server(root, config)
        return _segment_samples(root, Path(a.out), inf, mgmt, samples)
    except (DemoError, FileNotFoundError, OSError, subprocess.SubprocessError, urllib.error.URLError) as e:
        if a.debug:
            raise
        print(f"make demo: error: {e}", file=sys.stderr)
        return 1


def _segment_samples(root: Path, out: Path, inf: str, mgmt: str, samples: Sequence[Path]) -> int:
    from PIL import Image

    from .imageio import atomic_write_bytes, load_image, save_png_atomic
    from .palette import overlay

    out.mkdir(parents=True, exist_ok=True)
    url = f"{inf}/predictions/{MODEL_NAME}"

    def predict(data: bytes, headers: dict) -> Tuple[int, bytes, str]:
        headers = {"Content-Type": "image/jpeg", **headers}
        status, body, ctype = _call(url, _keys(root).get("inference"), data, headers, timeout=120)
        if _invalid_key(status, body):  # the key expired while the demo ran
            refresh_keys(root, mgmt)
            status, body, ctype = _call(url, _keys(root).get("inference"), data, headers, timeout=120)
        return status, body, ctype

    status, body, _ = predict(samples[0].read_bytes(), {"X-WeCLIP-Output": "json"})
    if status != 200:
        raise DemoError(f"the server answered HTTP {status}: {body[:300]!r}")
    class_names = list(json.loads(body)["scores"])  # every class, in index order
    tiles, captions = [], []
    for p in samples:
        t0 = time.perf_counter()
        status, body, ctype = predict(p.read_bytes(), {})
        dt = time.perf_counter() - t0
        if status != 200:
            raise DemoError(f"{p.name}: the server answered HTTP {status}: {body[:300]!r}")
        mask = np.asarray(Image.open(io.BytesIO(body)))
        atomic_write_bytes(out / f"{p.stem}_mask.png", body)  # the server's palette PNG as is
        img = load_image(p)
        tiles.append(np.concatenate([img, overlay(img, mask)], axis=1))
        present = sorted(set(np.unique(mask).tolist()) - {0})
        found = [class_names[i] if i < len(class_names) else str(i) for i in present]
        captions.append(f"{p.name}: {', '.join(found) if found else 'no class found'}")
        print(f"{p.name}: HTTP {status} {ctype}, {dt * 1000:.0f} ms, classes found: {', '.join(found) or 'none'}")
    save_png_atomic(out / "grid.png", legend_grid(tiles, captions, class_names))
    print(f"\nwrote {len(samples)} masks and {out / 'grid.png'} (legend: class colours; caption: classes found)")
    print("\nTry another image (the token is in key_file.json):")
    read_key = "import json;print(json.load(open('key_file.json'))['inference']['key'])"
    print(f"  curl -H \"Authorization: Bearer $(python3 -c \"{read_key}\")\" -T your_image.jpg {url} -o mask.png")
    print("  add -H 'X-WeCLIP-Output: json' for classes, pixel counts and boxes (docs/serving.md: more options)")
    print("\nStop the server with: make stop")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

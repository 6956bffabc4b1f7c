"""``make demo``: the main job on the embedded default model, through TorchServe.

1. builds ``model_store/weclip_demo.mar`` from the shipped demo checkpoint if it is missing;
2. starts TorchServe on 127.0.0.1 with ``config.properties`` (token auth on) unless one is
   already serving the model — re-running is safe;
3. waits until the model is READY, uploads the bundled sample images, writes the returned masks
   and an overlay grid into ``out/``;
4. prints the curl command (with the token header) for another image and how to stop.

``python -m weclip_infer.quickstart --stop`` (``make stop``) stops the server.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

__all__ = ["main", "DEMO_MODEL_DIR", "SAMPLES_DIR", "ensure_samples"]

PKG = Path(__file__).resolve().parent
ASSETS = PKG / "assets"
DEMO_MODEL_DIR = ASSETS / "demo_model"
SAMPLES_DIR = ASSETS / "samples"
MODEL_NAME = "weclip"
MAR_NAME = "weclip_demo"


def _config_file() -> Path:
    """The TorchServe ``config.properties`` shipped in the package (works from a wheel too)."""
    from .serving import torchserve_config_file

    return torchserve_config_file()


def _props(path: Path) -> dict:
    out = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            k, v = line.split("=", 1)
            out[k.strip()] = v.strip()
    return out


def _key(root: Path, kind: str = "inference") -> str | None:
    f = root / "key_file.json"
    if not f.is_file():
        return None
    try:
        data = json.loads(f.read_text())
        return data[kind]["key"]
    except (KeyError, json.JSONDecodeError, TypeError):
        return None


def _request(url: str, key: str | None, data: bytes | None = None, headers: dict | None = None, timeout: float = 60):
    h = dict(headers or {})
    if key:
        h["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(url, data=data, headers=h, method="POST" if data is not None else "GET")
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.status, r.read(), r.headers.get("Content-Type", "")


def _model_ready(mgmt: str, key: str | None) -> bool:
    try:
        status, body, _ = _request(f"{mgmt}/models/{MODEL_NAME}", key, timeout=5)
        info = json.loads(body)
        return status == 200 and any(w.get("status") == "READY" for m in info for w in m.get("workers", []))
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _server_up(inf: str) -> bool:
    try:
        _request(f"{inf}/ping", None, timeout=3)
        return True
    except urllib.error.HTTPError:
        return True  # answered (e.g. 400 without a token): something is listening
    except (urllib.error.URLError, OSError):
        return False


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


def _start(root: Path, inf: str, mgmt: str) -> None:
    exe = shutil.which("torchserve") or str(Path(sys.executable).parent / "torchserve")
    if shutil.which("java") is None:
        raise RuntimeError("TorchServe needs Java 11+ (e.g. apt-get install openjdk-17-jre-headless)")
    env = {**os.environ, "LOG_LOCATION": str(root / "logs"), "METRICS_LOCATION": str(root / "logs")}
    cmd = [exe, "--start", "--ncs", "--model-store", "model_store", "--models", f"{MODEL_NAME}={MAR_NAME}.mar",
           "--ts-config", str(_config_file())]
    print("starting:", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True, timeout=120)
    deadline = time.time() + 180
    while time.time() < deadline:
        if _model_ready(mgmt, _key(root, "management")):
            return
        time.sleep(1.0)
    raise RuntimeError(f"TorchServe did not report the model READY within 180 s; see {root / 'logs'}")


def stop(root: Path) -> int:
    exe = shutil.which("torchserve") or str(Path(sys.executable).parent / "torchserve")
    r = subprocess.run([exe, "--stop"], cwd=root, capture_output=True, text=True, timeout=60)
    print((r.stdout or r.stderr).strip() or "stopped")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="weclip-demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="out", help="folder for the masks and grid.png (default: out)")
    ap.add_argument("--workdir", default=".", help="server working folder: model_store/, logs/, key_file.json "
                    "(default: the current folder)")
    ap.add_argument("--stop", action="store_true", help="stop the TorchServe started by the demo")
    a = ap.parse_args(argv)
    root = Path(a.workdir).resolve()
    if a.stop:
        return stop(root)
    props = _props(_config_file())
    inf, mgmt = props["inference_address"], props["management_address"]
    try:
        _build_mar(root)
        samples = ensure_samples()
        if _model_ready(mgmt, _key(root, "management")):
            print(f"TorchServe is already running with model '{MODEL_NAME}' at {inf} (re-using it)")
        elif _server_up(inf):
            raise RuntimeError(f"something else is listening on {inf}; stop it first (make stop)")
        else:
            _start(root, inf, mgmt)
    except (FileNotFoundError, RuntimeError, subprocess.SubprocessError) as e:
        print(f"make demo: error: {e}", file=sys.stderr)
        return 1
    from PIL import Image

    from .imageio import atomic_write_bytes, load_image, save_png_atomic
    from .palette import overlay

    key = _key(root, "inference")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    tiles = []
    for p in samples:
        t0 = time.perf_counter()
        status, body, ctype = _request(f"{inf}/predictions/{MODEL_NAME}", key, p.read_bytes(),
                                       {"Content-Type": "image/jpeg"}, timeout=120)
        dt = time.perf_counter() - t0
        mask = np.asarray(Image.open(io.BytesIO(body)))
        atomic_write_bytes(out / f"{p.stem}_mask.png", body)  # the server's palette PNG as is
        img = load_image(p)
        tile = np.concatenate([img, overlay(img, mask)], axis=1)
        tiles.append(np.asarray(Image.fromarray(tile).resize((512, int(512 * tile.shape[0] / tile.shape[1])))))
        classes = sorted(set(np.unique(mask).tolist()) - {0})
        print(f"{p.name}: HTTP {status} {ctype}, {dt * 1000:.0f} ms, classes {classes}")
    save_png_atomic(out / "grid.png", np.concatenate(tiles, axis=0))
    print(f"\nwrote {len(samples)} masks and {out / 'grid.png'}")
    print("\nTry another image (the token is in key_file.json):")
    print(f"  curl -H \"Authorization: Bearer $(python3 -c \"import json;print(json.load(open('key_file.json'))['inference']['key'])\")\" "
          f"-T your_image.jpg {inf}/predictions/{MODEL_NAME} -o mask.png")
    print("  add -H 'X-WeCLIP-Output: json' for classes, pixel counts and boxes")
    print("\nStop the server with: make stop")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The built wheel is the product: build it from a copy of the tracked files, install it into a
fresh folder (not editable) and use it from elsewhere, as a user who ran `pip install` would."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


def _run(cmd, cwd, env, timeout=600):
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
                       stdin=subprocess.DEVNULL)
    assert p.returncode == 0, f"{' '.join(map(str, cmd))}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    for rel in filter(None, files.decode().split("\0")):
        s, d = REPO / rel, src / rel
        if not os.path.lexists(s):
            continue  # deleted in the work tree
        d.parent.mkdir(parents=True, exist_ok=True)
        if s.is_symlink():
            os.symlink(os.readlink(s), d)
        else:
            shutil.copy2(s, d)
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(root / "dist"),
          str(src)], cwd=root, env=env)
    (whl,) = (root / "dist").glob("weclip_infer-*.whl")
    target = root / "T"
    _run([sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(target), str(whl)], cwd=root, env=env)
    work = root / "elsewhere"
    work.mkdir()
    run_env = dict(env, PYTHONPATH=str(target), HF_HUB_OFFLINE="1")
    return {"whl": whl, "target": target, "work": work, "env": run_env}


def test_wheel_carries_package_data(installed):
    names = set(zipfile.ZipFile(installed["whl"]).namelist())
    for need in ("weclip_infer/serving/weclip_handler.py", "weclip_infer/serving/config.properties",
                 "weclip_infer/configs/demo.yaml", "weclip_infer/assets/demo_model/config.json",
                 "weclip_infer/training/loop.py", "weclip_infer/export/mar.py"):
        assert need in names, need
    assert not any(n.startswith(("training/", "export/", "handlers/", "tests/")) for n in names)


def test_installed_wheel_is_used_and_finds_its_files(installed):
    out = _run([sys.executable, "-c", "import json, weclip_infer, weclip_infer.quickstart as q; "
                "print(json.dumps([weclip_infer.__file__, str(q._config_file())]))"],
               cwd=installed["work"], env=installed["env"])
    pkg_file, cfg = json.loads(out.strip().splitlines()[-1])
    assert Path(pkg_file).resolve().is_relative_to(installed["target"].resolve())
    assert Path(cfg).is_file() and Path(cfg).resolve().is_relative_to(installed["target"].resolve())
    assert "inference_address=http://127.0.0.1:" in Path(cfg).read_text()
    help_text = _run([sys.executable, "-m", "weclip_infer.train", "--config", "demo", "--help"],
                     cwd=installed["work"], env=installed["env"])
    assert "--config" in help_text


def test_installed_wheel_builds_a_working_mar(installed):
    pytest.importorskip("ts", reason="torchserve not installed")
    pytest.importorskip("model_archiver", reason="torch-model-archiver not installed")
    demo = installed["target"] / "weclip_infer" / "assets" / "demo_model"
    work = installed["work"]
    _run([sys.executable, "-m", "weclip_infer.export.mar", str(demo), "--out", "store", "--name", "demo"],
         cwd=work, env=installed["env"])
    mar = work / "store" / "demo.mar"
    unpacked = work / "unpacked"
    zipfile.ZipFile(mar).extractall(unpacked)
    assert (unpacked / "weclip_handler.py").is_file()
    # Load the archive the way a TorchServe worker does: the handler module from the unpacked
    # model folder, its `handle` entry point, a context pointing at the folder.
    script = r"""
import io, json, sys
import numpy as np
from PIL import Image
from ts.context import Context, RequestProcessor
sys.path.insert(0, sys.argv[1])
import weclip_handler
ctx = Context("demo", sys.argv[1], None, 1, None, "0.12.0")
buf = io.BytesIO(); Image.fromarray(np.full((48, 64, 3), 128, np.uint8)).save(buf, format="PNG")
ctx.request_processor = [RequestProcessor({})]
weclip_handler.handle(None, ctx)
out = weclip_handler.handle([{"body": bytearray(buf.getvalue())}], ctx)
print(json.dumps([ctx.get_response_content_type(0), len(out[0]), weclip_handler.__file__]))
"""
    out = _run([sys.executable, "-c", script, str(unpacked)], cwd=work, env=installed["env"])
    ctype, n, handler_file = json.loads(out.strip().splitlines()[-1])
    assert ctype == "image/png" and n > 0
    assert Path(handler_file).resolve().is_relative_to(unpacked.resolve())

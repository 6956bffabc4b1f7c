"""``weclip-serve-ray``: serve a WeCLIP model over HTTP with Ray Serve.

    weclip-serve-ray [--config ray_serve.yaml] [--address auto|ray://HOST:10001] [--model DIR]
                     [--host 127.0.0.1] [--port 8000] [--replicas N] [--num-cpus C] [--num-gpus G]
                     [--token-file FILE | --new-token FILE | --no-auth]

Reads the same configuration file as Ray's ``serve run`` (default: the one shipped in the
package); flags override it. Without ``--address`` a single-node Ray is started on this machine
with its node address on 127.0.0.1 and no dashboard. The endpoint answers on
``POST /predictions/<model_name>`` with the TorchServe endpoint's request and response formats.

Authentication is on: the bearer token comes from ``--token-file``, the file named in the config,
or the ``WECLIP_SERVE_TOKEN`` environment variable. ``--new-token FILE`` creates a random token
in a new file (mode 0600) and uses it. The server refuses to start without a token unless
``--no-auth`` is given.
"""
from __future__ import annotations

import argparse
import copy
import logging
import os
import secrets
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Dict, Optional

__all__ = ["load_config", "apply_overrides", "deploy", "write_new_token", "main"]

logger = logging.getLogger(__name__)

_IMPORT_PATH = "weclip_infer.ray.serve:app_builder"


def load_config(path: Optional[str] = None) -> Dict[str, Any]:
    """The ``serve run`` config (``path`` or the packaged one), checked against Ray Serve's schema
    and our application arguments; ``ValueError`` naming the problem."""
    import yaml

    from . import serve_config_file

    p = Path(path) if path else serve_config_file()
    try:
        cfg = yaml.safe_load(p.read_text(encoding="utf-8"))
    except OSError as e:
        raise ValueError(f"cannot read config {p}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise ValueError(f"config {p}: invalid YAML: {e}") from None
    return check_config(cfg, str(p))


def check_config(cfg: Any, where: str = "config") -> Dict[str, Any]:
    from pydantic import ValidationError
    from ray.serve.schema import ServeDeploySchema

    from .serve import validate_app_args

    if not isinstance(cfg, dict):
        raise ValueError(f"{where}: expected a mapping")
    try:
        ServeDeploySchema(**cfg)
    except ValidationError as e:
        first = e.errors()[0]
        raise ValueError(f"{where}: {'.'.join(str(x) for x in first['loc'])}: {first['msg']}") from None
    apps = [a for a in cfg.get("applications", []) if a.get("import_path") == _IMPORT_PATH]
    if len(apps) != 1:
        raise ValueError(f"{where}: expected exactly one application with import_path {_IMPORT_PATH}")
    deps = apps[0].get("deployments") or [{"name": "WeCLIP"}]
    if len(deps) != 1 or deps[0].get("name") != "WeCLIP":
        raise ValueError(f"{where}: the application has one deployment, named WeCLIP")
    try:
        validate_app_args(apps[0].get("args"))
    except ValueError as e:
        raise ValueError(f"{where}: args: {e}") from None
    return cfg


def apply_overrides(cfg: Dict[str, Any], **over: Any) -> Dict[str, Any]:
    """A copy of ``cfg`` with CLI overrides (``None`` values are ignored): ``host``, ``port``,
    ``replicas``, ``num_cpus``, ``num_gpus`` and any application argument."""
    from .serve import APP_ARGS

    cfg = copy.deepcopy(cfg)
    app = next(a for a in cfg["applications"] if a.get("import_path") == _IMPORT_PATH)
    app.setdefault("deployments", [{"name": "WeCLIP"}])
    dep = app["deployments"][0]
    http = cfg.setdefault("http_options", {})
    for key, value in over.items():
        if value is None:
            continue
        if key in ("host", "port"):
            http[key] = value
        elif key == "replicas":
            dep["num_replicas"] = value
        elif key in ("num_cpus", "num_gpus"):
            dep.setdefault("ray_actor_options", {})[key] = value
        elif key in APP_ARGS:
            app.setdefault("args", {})[key] = value
        else:
            raise ValueError(f"unknown override {key!r}")
    return check_config(cfg)


def deploy(cfg: Dict[str, Any]) -> str:
    """Start Serve's HTTP proxy and the WeCLIP application of ``cfg`` on the connected Ray
    cluster; returns the prediction URL. The token is resolved (or refused) before anything starts."""
    from ray import serve

    from .serve import build_app

    app = next(a for a in cfg["applications"] if a.get("import_path") == _IMPORT_PATH)
    dep = dict((app.get("deployments") or [{"name": "WeCLIP"}])[0])
    dep.pop("name", None)
    application = build_app(app.get("args"), dep)  # validates args and resolves the token first
    http = dict(cfg.get("http_options") or {})
    http.setdefault("host", "127.0.0.1")
    if http["host"] not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("Serve binds %s: the endpoint is reachable from the network; put TLS in front of it",
                       http["host"])
    serve.start(http_options=http, proxy_location=cfg.get("proxy_location", "HeadOnly"))
    serve.run(application, name=app.get("name", "weclip"), route_prefix=app.get("route_prefix", "/"))
    from .serve import validate_app_args

    name = validate_app_args(app.get("args"))["model_name"]
    prefix = (app.get("route_prefix") or "/").rstrip("/")
    return f"http://{http['host']}:{http.get('port', 8000)}{prefix}/predictions/{name}"


def write_new_token(path: str) -> str:
    """Create ``path`` (mode 0600, never overwriting) holding a new random token; returns the path."""
    p = Path(path).expanduser()
    token = secrets.token_urlsafe(32)
    try:
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise ValueError(f"--new-token: {p} exists (use --token-file {p} to use it)") from None
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(token + "\n")
        f.flush()
        os.fsync(f.fileno())
    return str(p)


def _init_ray(address: Optional[str], num_cpus: Optional[int]) -> None:
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage report to the network
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
    else:  # a private single-node cluster on the loopback address
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1",
                 logging_level=logging.WARNING)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="weclip-serve-ray", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None, help="serve run config (default: the packaged serve_config.yaml)")
    ap.add_argument("--address", default=None,
                    help="Ray cluster to use: auto (the running local cluster) or ray://HOST:10001; "
                         "default: start a private single-node Ray on 127.0.0.1")
    ap.add_argument("--cluster-cpus", type=int, default=None, help="CPUs of the private Ray (default: all)")
    ap.add_argument("--model", default=None, help="checkpoint folder or export bundle (default: the demo model)")
    ap.add_argument("--model-name", default=None, help="served at POST /predictions/<name> (default weclip)")
    ap.add_argument("--host", default=None, help="HTTP address (default 127.0.0.1)")
    ap.add_argument("--port", type=int, default=None, help="HTTP port (default 8000)")
    ap.add_argument("--replicas", type=int, default=None, help="model replicas")
    ap.add_argument("--num-cpus", type=float, default=None, help="CPUs per replica")
    ap.add_argument("--num-gpus", type=float, default=None, help="GPUs per replica (fractions share a GPU)")
    ap.add_argument("--max-batch-size", type=int, default=None, help="requests per model call")
    auth = ap.add_mutually_exclusive_group()
    auth.add_argument("--token-file", default=None, help="file holding the bearer token")
    auth.add_argument("--new-token", default=None, metavar="FILE",
                      help="create FILE with a new random token and use it")
    auth.add_argument("--no-auth", action="store_true", help="serve WITHOUT authentication (trusted networks only)")
    ap.add_argument("--debug", action="store_true", help="full tracebacks")
    a = ap.parse_args(argv)
    cfg: Optional[Dict[str, Any]] = None
    logging.basicConfig(level=logging.DEBUG if a.debug else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        from . import require_ray

        require_ray()
        cfg = load_config(a.config)
        token_file = write_new_token(a.new_token) if a.new_token else a.token_file
        cfg = apply_overrides(cfg, host=a.host, port=a.port, replicas=a.replicas, num_cpus=a.num_cpus,
                              num_gpus=a.num_gpus, max_batch_size=a.max_batch_size, model=a.model,
                              model_name=a.model_name, token_file=token_file, auth=False if a.no_auth else None)
        from .serve import resolve_token, validate_app_args

        args = validate_app_args(next(x for x in cfg["applications"] if x.get("import_path") == _IMPORT_PATH)["args"])
        resolve_token(args["auth"], args["token_env"], args["token_file"])  # refuse before starting Ray
        _init_ray(a.address, a.cluster_cpus)
        url = deploy(cfg)
    except KeyboardInterrupt:
        print("weclip-serve-ray: interrupted while starting", file=sys.stderr)
        _shutdown(a.address, cfg_app_name(cfg) if cfg else None)
        return 130
    except Exception as e:  # noqa: BLE001
        if a.debug:
            raise
        print(f"weclip-serve-ray: error: {e}", file=sys.stderr)
        _shutdown(a.address, cfg_app_name(cfg) if cfg else None)
        return 2
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    hdr = "" if a.no_auth else f' -H "Authorization: Bearer $(cat {token_file})"' if token_file else \
        f' -H "Authorization: Bearer ${args["token_env"]}"'
    print(f"serving {url}\n  curl{hdr} --data-binary @photo.jpg {url} -o mask.png\nCtrl-C stops.", flush=True)
    try:
        while not stop.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass
    print("stopping", flush=True)
    _shutdown(a.address, cfg_app_name(cfg))
    return 0


def cfg_app_name(cfg: Dict[str, Any]) -> str:
    app = next(x for x in cfg["applications"] if x.get("import_path") == _IMPORT_PATH)
    return str(app.get("name", "weclip"))


def _shutdown(address: Optional[str], app_name: Optional[str]) -> None:
    """On a private Ray: stop Serve and Ray. On a shared cluster: delete only our application
    (other Serve applications keep running) and disconnect."""
    import ray

    if not ray.is_initialized():
        return
    from ray import serve

    try:
        if address is None:
            serve.shutdown()
        elif app_name:
            serve.delete(app_name)
    finally:
        ray.shutdown()


if __name__ == "__main__":
    raise SystemExit(main())

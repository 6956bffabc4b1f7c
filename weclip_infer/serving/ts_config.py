"""TorchServe ``config.properties``: read it, and derive copies that listen on other ports.

Every listener TorchServe 0.12 opens is named in the shipped file (HTTP inference, management and
metrics; gRPC inference and management, which cannot be switched off), so a second server on one
machine (tests, benchmarks, a second demo) only needs a copy with other ports for all five.
"""
from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Dict, Iterable, Mapping, Optional, Union

__all__ = ["PORT_KEYS", "read_properties", "listen_ports", "free_ports", "derive_config", "models_setting"]

#: Listener name → the property that holds its address (HTTP: a URL; gRPC: a port number).
PORT_KEYS = {
    "inference": "inference_address",
    "management": "management_address",
    "metrics": "metrics_address",
    "grpc_inference": "grpc_inference_port",
    "grpc_management": "grpc_management_port",
}
_GRPC_DEFAULTS = {"grpc_inference": 7070, "grpc_management": 7071}  # TorchServe's own defaults


def read_properties(path: Union[str, Path]) -> Dict[str, str]:
    """``key → value`` of a Java properties file (``#`` comments, first ``=`` splits)."""
    out: Dict[str, str] = {}
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            k, v = line.split("=", 1)
            out[k.strip()] = v.strip()
    return out


def listen_ports(props: Mapping[str, str]) -> Dict[str, int]:
    """The TCP port of each listener named in ``props`` (gRPC ports default to 7070/7071)."""
    out: Dict[str, int] = {}
    for name, key in PORT_KEYS.items():
        v = props.get(key)
        if v is None:
            if name in _GRPC_DEFAULTS:
                out[name] = _GRPC_DEFAULTS[name]
            continue
        out[name] = int(v.rsplit(":", 1)[-1].strip("/")) if name in ("inference", "management", "metrics") else int(v)
    return out


def free_ports(names: Iterable[str] = tuple(PORT_KEYS)) -> Dict[str, int]:
    """One currently free loopback port per name (all different)."""
    socks, out = [], {}
    try:
        for n in names:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            out[n] = s.getsockname()[1]
    finally:
        for s in socks:
            s.close()
    return out


def models_setting(name: str, mar: str, version: str = "1.0", batch_size: int = 8, max_batch_delay_ms: int = 20,
                   workers: int = 1, response_timeout_s: int = 120) -> str:
    """A ``models=`` line: per-model worker count, batch size and batch delay for ``name``."""
    cfg = {name: {version: {"marName": mar, "minWorkers": workers, "maxWorkers": workers, "batchSize": batch_size,
                            "maxBatchDelay": max_batch_delay_ms, "responseTimeout": response_timeout_s}}}
    return "models=" + json.dumps(cfg, separators=(", ", ": "))


def derive_config(source: Union[str, Path], dest: Union[str, Path], ports: Mapping[str, int],
                  model_store: Optional[Union[str, Path]] = None,
                  overrides: Optional[Mapping[str, str]] = None) -> Path:
    """Write a copy of ``source`` to ``dest`` listening on ``ports`` (loopback), with ``overrides``.

    ``ports`` must name every listener in :data:`PORT_KEYS`; ``overrides`` replaces (or adds)
    properties, e.g. ``{"models": models_setting(...)[len("models="):], "vmargs": "..."}``.
    """
    missing = set(PORT_KEYS) - set(ports)
    if missing:
        raise ValueError(f"derive_config: no port given for {sorted(missing)}")
    values: Dict[str, str] = {}
    for name, key in PORT_KEYS.items():
        values[key] = str(int(ports[name])) if name.startswith("grpc") else f"http://127.0.0.1:{int(ports[name])}"
    values["grpc_inference_address"] = values["grpc_management_address"] = "127.0.0.1"
    if model_store is not None:
        values["model_store"] = str(model_store)
    values.update({k: str(v) for k, v in (overrides or {}).items()})
    lines, seen = [], set()
    for line in Path(source).read_text().splitlines():
        key = line.split("=", 1)[0].strip()
        if "=" in line and not line.lstrip().startswith("#") and key in values:
            line = f"{key}={values[key]}"
            seen.add(key)
        lines.append(line)
    lines += [f"{k}={v}" for k, v in values.items() if k not in seen]
    dest = Path(dest)
    dest.write_text("\n".join(lines) + "\n")
    return dest

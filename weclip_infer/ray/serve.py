"""The Ray Serve deployment: the TorchServe endpoint's HTTP contract on a maintained, multi-node engine.

Each replica holds one :class:`~weclip_infer.serving.SegmentationService` (the same request
parsing, decoding, ``Segmenter`` and response encoding as the TorchServe handler) and groups
concurrent requests with ``@serve.batch``. The HTTP side:

* ``POST /predictions/<model_name>``: the image as the raw body, as a multipart field (``data``,
  ``file``, ``image``) or as JSON ``{"image": "<base64>", ...}``; options as ``X-WeCLIP-*`` headers,
  query parameters, form fields or JSON fields. Answers as TorchServe does: a palette PNG, JSON or
  an overlay JPEG, and ``{"error": ...}`` with a 4xx status for bad requests.
* ``GET /ping``: ``{"status": "Healthy"}`` (no token needed, as TorchServe's ping).

Limits: bodies larger than ``max_request_bytes`` (default 50 MiB, as the TorchServe config) are
refused with 413 before they are read in full; images above the model's ``max_pixels``
(``serve_config.json``) with 413 before they are decoded; Serve's ``max_queued_requests`` bounds
the waiting queue (503 beyond it).

Authentication: a bearer token, on by default. The token comes from a file (``token_file``) or an
environment variable (``token_env``, default ``WECLIP_SERVE_TOKEN``), read where the application is
built; replicas only receive its SHA-256 digest and compare digests in constant time. Without a
token the application refuses to build unless ``auth: false`` is set explicitly.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import os
import stat
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

from ray import serve
from starlette.requests import Request
from starlette.responses import Response as HTTPResponse

from ..serving.service import Response, SegmentationService

__all__ = ["TOKEN_ENV", "DEFAULT_MAX_REQUEST_BYTES", "APP_ARGS", "validate_app_args", "resolve_token",
           "WeCLIPDeployment", "build_app", "app_builder"]

logger = logging.getLogger(__name__)

TOKEN_ENV = "WECLIP_SERVE_TOKEN"
DEFAULT_MAX_REQUEST_BYTES = 50 * 1024 * 1024  # TorchServe's max_request_size in our config.properties
MIN_TOKEN_CHARS = 16
MAX_FORM_PARTS = 16

#: application arguments (``args:`` in the ``serve run`` config) and their defaults
APP_ARGS: Dict[str, Any] = {
    "model": None,  # checkpoint directory or export bundle; None: the embedded demo model
    "model_name": "weclip",
    "device": None,  # None: CUDA when the replica was given a GPU, else CPU
    "auth": True,
    "token_file": None,
    "token_env": TOKEN_ENV,
    "max_request_bytes": DEFAULT_MAX_REQUEST_BYTES,
    "max_batch_size": 4,
    "batch_wait_timeout_s": 0.01,
}


def validate_app_args(args: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
    """Typed copy of the application arguments with defaults; ``ValueError`` naming the key."""
    args = dict(args or {})
    unknown = set(args) - set(APP_ARGS)
    if unknown:
        raise ValueError(f"unknown application arguments {sorted(unknown)} (known: {sorted(APP_ARGS)})")
    out = {**APP_ARGS, **{k: v for k, v in args.items()}}
    if not isinstance(out["auth"], bool):
        raise ValueError(f"auth must be true or false, got {out['auth']!r}")
    name = out["model_name"]
    if not isinstance(name, str) or not name or not all(c.isalnum() or c in "-_." for c in name):
        raise ValueError(f"model_name must be letters, digits, '-', '_' or '.', got {name!r}")
    for key, lo in (("max_request_bytes", 1), ("max_batch_size", 1)):
        v = out[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{key} must be an integer >= {lo}, got {v!r}")
    v = out["batch_wait_timeout_s"]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 10:
        raise ValueError(f"batch_wait_timeout_s must be a number of seconds in [0, 10], got {v!r}")
    out["batch_wait_timeout_s"] = float(v)
    for key in ("model", "token_file", "device"):
        if out[key] is not None and not isinstance(out[key], str):
            raise ValueError(f"{key} must be a string or null, got {out[key]!r}")
    if not isinstance(out["token_env"], str) or not out["token_env"]:
        raise ValueError(f"token_env must be an environment variable name, got {out['token_env']!r}")
    return out


def resolve_token(auth: bool, token_env: str = TOKEN_ENV, token_file: Optional[str] = None) -> Optional[str]:
    """The bearer token (``token_file`` first, then ``$token_env``); ``None`` only when ``auth`` is off.

    ``ValueError`` when auth is on and there is no usable token, so a server never starts open by
    accident.
    """
    if not auth:
        return None
    token, source = "", ""
    if token_file:
        p = Path(token_file).expanduser()
        try:
            token, source = p.read_text(encoding="utf-8").strip(), str(p)
        except OSError as e:
            raise ValueError(f"cannot read token file {p}: {e.strerror or e}") from None
        if p.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            logger.warning("token file %s is readable by other users (chmod 600 it)", p)
    else:
        token, source = os.environ.get(token_env, "").strip(), f"${token_env}"
    if not token:
        raise ValueError(f"authentication is on but there is no token: set {token_env} or a token file "
                         "(weclip-serve-ray --new-token FILE writes one), or turn auth off explicitly")
    if len(token) < MIN_TOKEN_CHARS:
        raise ValueError(f"the token from {source} is too short (at least {MIN_TOKEN_CHARS} characters)")
    return token


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def _json(status: int, message: str, extra_headers: Optional[Dict[str, str]] = None) -> HTTPResponse:
    return HTTPResponse(json.dumps({"error": message}).encode("utf-8"), status_code=status,
                        media_type="application/json", headers=extra_headers)


async def _aiter(data: bytes):
    yield data


class _TooLarge(Exception):
    pass


@serve.deployment(name="WeCLIP", num_replicas=1, max_ongoing_requests=16, max_queued_requests=100,
                  ray_actor_options={"num_cpus": 1})
class WeCLIPDeployment:
    """One replica: a :class:`SegmentationService` behind an HTTP handler (see the module docstring)."""

    def __init__(self, model_dir: str, model_name: str = "weclip", token_sha256: Optional[str] = None,
                 max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES, max_batch_size: int = 4,
                 batch_wait_timeout_s: float = 0.01, device: Optional[str] = None):
        self.service = SegmentationService.from_model_dir(model_dir, device=device)
        self.model_name = model_name
        self.token_sha256 = token_sha256
        self.max_request_bytes = int(max_request_bytes)
        batcher: Any = self._segment_batch  # @serve.batch adds the setters (invisible to type checkers)
        batcher.set_max_batch_size(int(max_batch_size))
        batcher.set_batch_wait_timeout_s(float(batch_wait_timeout_s))
        if token_sha256 is None:
            logger.warning("WeCLIP replica started WITHOUT authentication (auth: false)")

    # -- request side --------------------------------------------------------------------------------
    def _authorized(self, request: Request) -> bool:
        if self.token_sha256 is None:
            return True
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return False
        return hmac.compare_digest(_digest(token.strip()), self.token_sha256)

    async def _read_body(self, request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_request_bytes:
            raise _TooLarge
        chunks, n = [], 0
        async for chunk in request.stream():
            n += len(chunk)
            if n > self.max_request_bytes:
                raise _TooLarge
            chunks.append(chunk)
        return b"".join(chunks)

    async def _request_mapping(self, request: Request, body: bytes) -> Dict[str, Any]:
        """The request as the engine-independent parser expects it (the shape TorchServe hands over)."""
        req: Dict[str, Any] = {k: v for k, v in request.query_params.items()}
        ctype = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if ctype == "application/json":
            try:
                req["body"] = json.loads(body)
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ValueError(f"invalid JSON body: {e}") from None
        elif ctype == "multipart/form-data":
            from starlette.formparsers import MultiPartException, MultiPartParser

            parser = MultiPartParser(request.headers, _aiter(body), max_files=MAX_FORM_PARTS,
                                     max_fields=MAX_FORM_PARTS, max_part_size=self.max_request_bytes)
            try:
                form = await parser.parse()
            except MultiPartException as e:
                raise ValueError(f"malformed multipart body: {e.message}") from None
            for key, value in form.multi_items():
                req[key] = await value.read() if hasattr(value, "read") else value
        else:
            req["body"] = body
        return req

    async def __call__(self, request: Request) -> HTTPResponse:
        path = request.url.path.rstrip("/") or "/"
        if path == "/ping":
            if request.method != "GET":
                return _json(405, "use GET /ping")
            return HTTPResponse(b'{"status": "Healthy"}', media_type="application/json")
        if path != f"/predictions/{self.model_name}":
            return _json(404, f"unknown path {request.url.path!r}: POST /predictions/{self.model_name}")
        if request.method not in ("POST", "PUT"):
            return _json(405, f"use POST /predictions/{self.model_name}")
        if not self._authorized(request):
            return _json(401, "missing or invalid token: send 'Authorization: Bearer <token>'",
                         {"WWW-Authenticate": "Bearer"})
        try:
            body = await self._read_body(request)
        except _TooLarge:
            return _json(413, f"request body larger than the limit of {self.max_request_bytes} bytes")
        try:
            req = await self._request_mapping(request, body)
        except ValueError as e:
            return _json(400, str(e))
        headers = {k.lower(): v for k, v in request.headers.items()}
        resp: Response = await self._segment_batch((req, headers))
        return HTTPResponse(resp.body, status_code=resp.status, media_type=resp.content_type)

    # -- model side ----------------------------------------------------------------------------------
    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.01)
    async def _segment_batch(self, items: List[Tuple[Dict[str, Any], Dict[str, Any]]]) -> List[Response]:
        # the model runs in a worker thread so the replica keeps accepting (and batching) requests
        return await asyncio.get_running_loop().run_in_executor(None, self.service.handle, items)


def build_app(args: Optional[Mapping[str, Any]] = None, deployment_options: Optional[Mapping[str, Any]] = None):
    """The Serve application for validated ``args`` (see :data:`APP_ARGS`), with optional
    ``deployment_options`` (``num_replicas``, ``ray_actor_options``, ``max_ongoing_requests``, ...)."""
    a = validate_app_args(args)
    token = resolve_token(a["auth"], a["token_env"], a["token_file"])
    if a["model"] is None:
        from ..quickstart import DEMO_MODEL_DIR

        model_dir = str(DEMO_MODEL_DIR)
    else:
        model_dir = str(Path(a["model"]).expanduser().resolve())
        if not Path(model_dir).is_dir():
            raise ValueError(f"model: not a folder: {model_dir}")
    dep: Any = WeCLIPDeployment  # a serve.Deployment (the decorator's type is invisible to type checkers)
    if deployment_options:
        dep = dep.options(**dict(deployment_options))
    return dep.bind(model_dir, a["model_name"], None if token is None else _digest(token), a["max_request_bytes"],
                    a["max_batch_size"], a["batch_wait_timeout_s"], a["device"])


def app_builder(args: Dict[str, Any]):
    """``import_path`` target for ``serve run`` / ``serve deploy`` configs (``args:`` → :func:`build_app`);
    replicas and ``ray_actor_options`` come from the config's ``deployments:`` section."""
    return build_app(args)

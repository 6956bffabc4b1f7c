"""TorchServe handler for WeCLIP segmentation (``WeCLIPHandler``).

The archive's files are a model directory that ``Segmenter.from_pretrained`` understands: our
checkpoint (``config.json`` + ``model.safetensors`` [+ ``backbone.safetensors``]) or an exported
bundle (``manifest.json`` + ``model.ts.pt`` / ``model.onnx``). Nothing is unpickled: safetensors,
``torch.jit.load`` or ONNX Runtime only. An optional ``serve_config.json`` in the archive sets
``backend`` (``auto``|``torchscript``|``onnx``|``eager``), ``max_pixels`` (default 40 000 000),
default ``scales`` / ``flip`` / ``crf``, ``long_side`` and ``num_threads``.

Requests (each request of a TorchServe batch is handled on its own, so images of different
sizes batch fine and one bad request never fails the others):

* raw body (``curl -T img.jpg`` / ``--data-binary @img.jpg`` with any content type),
* multipart form data (``-F data=@img.jpg``; TorchServe names the part ``data`` / ``file``),
* JSON ``{"image": "<base64>", "output": "json", "scales": [1, 0.75], ...}``.

Options, by increasing precedence: request headers ``X-WeCLIP-<Option>`` (e.g. ``X-WeCLIP-Output:
json``), query parameters, multipart text fields, JSON fields. Verified on TorchServe 0.12: query
parameters reach the handler (as request-dict entries) only on ``POST /<model>/predict?...`` and
``POST /invocations?model_name=<model>&...``; ``/predictions/<model>`` drops the query string
(the frontend passes no query decoder), so there use headers, form fields or JSON. Raw bodies
need a non-form content type (``-T``, or ``--data-binary`` with ``-H 'Content-Type: image/jpeg'``):
with curl's default ``application/x-www-form-urlencoded`` the frontend's form decoder rejects
binary data before the handler sees it. ``output=png|json|overlay`` (default
png), ``scales=1,0.75``, ``flip=true|false``, ``crf=true|false``, ``rle=true`` (json only),
``labels=dog,cat`` (hint: class names or 1-based ids).

Responses: ``png`` → palette PNG (``image/png``, pixel value = class index); ``json`` →
``{"classes", "pixel_counts", "boxes" ([x0, y0, x1, y1], x1/y1 exclusive), "scores", "size"
([H, W]), "timings" (seconds), "rle" (optional; per present class, row-major run lengths starting
with a run of zeros)}``; ``overlay`` → JPEG. Bad input → HTTP 400 with ``{"error": "..."}``; an
unexpected failure of one request → HTTP 500 with ``{"error": ...}`` for that request only.
Per-stage latencies are emitted as TorchServe custom metrics (never failing a request).
"""
from __future__ import annotations

import base64
import binascii
import io
import json
import logging
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from ts.torch_handler.base_handler import BaseHandler
from ts.utils.util import PredictionException

logger = logging.getLogger(__name__)

__all__ = ["WeCLIPHandler", "BadRequest", "parse_options", "rle_encode", "rle_decode", "SERVE_CONFIG"]

SERVE_CONFIG = "serve_config.json"
OUTPUTS = ("png", "json", "overlay")
BACKENDS = ("auto", "torchscript", "onnx", "eager")
IMAGE_KEYS = ("data", "file", "body", "image")  # where the image may arrive in a request dict
OPTION_KEYS = ("output", "scales", "flip", "crf", "rle", "labels")
HEADER_PREFIX = "x-weclip-"
MAX_SCALES = 8
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def BadRequest(message: str, status: int = 400) -> PredictionException:
    """A client error, answered with HTTP ``status`` and ``{"error": message}``. (A function, not
    a class: TorchServe requires the handler module to define exactly one class.)"""
    return PredictionException(message, status)


# ---- option parsing --------------------------------------------------------------------------------
def _text(v: Any) -> Any:
    if isinstance(v, (bytes, bytearray)):
        try:
            return bytes(v).decode("utf-8").strip()
        except UnicodeDecodeError:
            raise BadRequest("option values must be UTF-8 text") from None
    return v.strip() if isinstance(v, str) else v


def _parse_bool(name: str, v: Any) -> bool:
    v = _text(v)
    if isinstance(v, bool):
        return v
    if isinstance(v, (int, float)) and v in (0, 1):
        return bool(v)
    if isinstance(v, str) and v.lower() in _TRUE:
        return True
    if isinstance(v, str) and v.lower() in _FALSE:
        return False
    raise BadRequest(f"{name}: expected true or false, got {v!r}")


def _parse_scales(v: Any) -> tuple:
    v = _text(v)
    items = v.split(",") if isinstance(v, str) else (v if isinstance(v, (list, tuple)) else [v])
    out = []
    for it in items:
        try:
            if isinstance(it, bool):
                raise ValueError
            s = float(_text(it))
        except (TypeError, ValueError):
            raise BadRequest(f"scales: expected comma-separated positive numbers, got {v!r}") from None
        if not (0 < s <= 4) or s != s:
            raise BadRequest(f"scales: each scale must be in (0, 4], got {s:g}")
        out.append(s)
    if not out or len(out) > MAX_SCALES:
        raise BadRequest(f"scales: between 1 and {MAX_SCALES} scales expected, got {len(out)}")
    return tuple(out)


def _parse_labels(v: Any) -> list:
    v = _text(v)
    items = v.split(",") if isinstance(v, str) else (v if isinstance(v, (list, tuple)) else [v])
    out = []
    for it in items:
        it = _text(it)
        if isinstance(it, bool):
            raise BadRequest(f"labels: expected class names or ids, got {v!r}")
        if isinstance(it, int):
            out.append(it)
        elif isinstance(it, str) and it:
            out.append(int(it) if it.isdigit() else it)
        elif it not in ("", None):
            raise BadRequest(f"labels: expected class names or ids, got {v!r}")
    if not out:
        raise BadRequest("labels: empty list")
    return out


def parse_options(raw: Dict[str, Any]) -> Dict[str, Any]:
    """Validate raw option values (strings, bytes or JSON values) into typed options."""
    opts: Dict[str, Any] = {"output": "png", "rle": False}
    for key, v in raw.items():
        if v is None:
            continue
        if key == "output":
            o = _text(v)
            if not isinstance(o, str) or o.lower() not in OUTPUTS:
                raise BadRequest(f"output: expected one of {', '.join(OUTPUTS)}, got {o!r}")
            opts["output"] = o.lower()
        elif key == "scales":
            opts["scales"] = _parse_scales(v)
        elif key in ("flip", "crf", "rle"):
            opts[key] = _parse_bool(key, v)
        elif key == "labels":
            opts["labels"] = _parse_labels(v)
    if opts["rle"] and opts["output"] != "json":
        raise BadRequest("rle: only available with output=json")
    return opts


# ---- encoding helpers ------------------------------------------------------------------------------
def rle_encode(mask: np.ndarray) -> List[int]:
    """Row-major run lengths of a binary mask, starting with a (possibly empty) run of zeros."""
    flat = np.asarray(mask, dtype=bool).ravel()
    if flat.size == 0:
        return []
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat[0]:
        counts = [0] + counts
    return [int(c) for c in counts]


def rle_decode(counts: List[int], shape) -> np.ndarray:
    """Inverse of ``rle_encode``: ``H×W`` bool mask."""
    vals = np.arange(len(counts)) % 2 == 1
    return np.repeat(vals, counts).reshape(shape)


def _png_bytes(labels: np.ndarray) -> bytes:
    from PIL import Image

    from weclip_infer.palette import voc_palette

    if labels.size and (labels.min() < 0 or labels.max() > 255):
        img = Image.fromarray(labels.astype(np.uint16))  # more than 256 classes: 16-bit grey
    else:
        img = Image.fromarray(labels.astype(np.uint8), mode="P")
        img.putpalette(voc_palette().reshape(-1).tolist())
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _jpeg_bytes(image: np.ndarray, labels: np.ndarray) -> bytes:
    from PIL import Image

    from weclip_infer.palette import overlay

    buf = io.BytesIO()
    Image.fromarray(overlay(image, labels)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _json_body(res, rle: bool) -> dict:
    labels = res.labels
    names = res.class_names
    ids, counts = np.unique(labels, return_counts=True)

    def name(i):
        return names[i] if 0 <= i < len(names) else str(int(i))

    boxes = {}
    for i in ids:
        if i == 0:
            continue
        ys, xs = np.nonzero(labels == i)
        boxes[name(i)] = [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]
    body = {
        "classes": [name(i) for i in ids],
        "pixel_counts": {name(i): int(c) for i, c in zip(ids, counts)},
        "boxes": boxes,
        "scores": {name(i): float(s) for i, s in enumerate(np.asarray(res.scores).tolist())},
        "size": [int(labels.shape[0]), int(labels.shape[1])],
        "timings": {k: float(v) for k, v in res.timings.items()},
    }
    if rle:
        body["rle"] = {name(i): rle_encode(labels == i) for i in ids}
    return body


def _phrase(status: int) -> str:
    from http import HTTPStatus

    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""


def _error_body(message: str) -> bytes:
    return json.dumps({"error": message}).encode("utf-8")


def _new_item() -> SimpleNamespace:
    """One request of a batch as it moves through preprocess → inference → postprocess."""
    return SimpleNamespace(payload=None, opts={}, image=None, result=None, error=None, status=200,
                           t0=time.perf_counter(), timings={})


def _fail(item: SimpleNamespace, message: str, status: int) -> None:
    item.error, item.status = message, status


# ---- the handler -----------------------------------------------------------------------------------
class WeCLIPHandler(BaseHandler):
    """TorchServe handler around ``weclip_infer.predictor.Segmenter``."""

    def __init__(self):
        super().__init__()
        self.segmenter = None
        self.serve_config: Dict[str, Any] = {}
        self.max_pixels = 40_000_000

    # -- loading ------------------------------------------------------------------------------------
    @staticmethod
    def read_serve_config(model_dir: Path) -> Dict[str, Any]:
        f = model_dir / SERVE_CONFIG
        if not f.is_file():
            return {}
        try:
            cfg = json.loads(f.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{SERVE_CONFIG}: invalid JSON: {e}") from None
        if not isinstance(cfg, dict):
            raise ValueError(f"{SERVE_CONFIG}: expected a JSON object")
        unknown = set(cfg) - {"backend", "max_pixels", "scales", "flip", "crf", "long_side", "num_threads"}
        if unknown:
            raise ValueError(f"{SERVE_CONFIG}: unknown keys {sorted(unknown)}")
        backend = str(cfg.get("backend", "auto")).lower()
        if backend not in BACKENDS:
            raise ValueError(f"{SERVE_CONFIG}: backend must be one of {BACKENDS}, got {backend!r}")
        cfg["backend"] = backend
        mp = cfg.get("max_pixels", 40_000_000)
        if isinstance(mp, bool) or not isinstance(mp, int) or mp <= 0:
            raise ValueError(f"{SERVE_CONFIG}: max_pixels must be a positive integer, got {mp!r}")
        cfg["max_pixels"] = mp
        try:
            if cfg.get("scales") is not None:
                cfg["scales"] = _parse_scales(cfg["scales"])
            for k in ("flip", "crf"):
                if cfg.get(k) is not None:
                    cfg[k] = _parse_bool(k, cfg[k])
        except PredictionException as e:
            raise ValueError(f"{SERVE_CONFIG}: {e.message}") from None
        return cfg

    def initialize(self, context):
        from weclip_infer.predictor import Segmenter

        props = context.system_properties
        model_dir = Path(props["model_dir"])
        self.manifest = getattr(context, "manifest", None)
        cfg = self.read_serve_config(model_dir)
        self.serve_config = cfg
        if cfg.get("num_threads"):
            torch.set_num_threads(int(cfg["num_threads"]))
        gpu_id = props.get("gpu_id")
        if torch.cuda.is_available() and gpu_id is not None:
            self.map_location, device = "cuda", f"cuda:{int(gpu_id)}"
        else:
            self.map_location, device = "cpu", "cpu"
        self.device = torch.device(device)
        backend = cfg.get("backend", "auto")
        is_bundle = (model_dir / "manifest.json").is_file()
        if backend == "eager" and is_bundle:
            raise ValueError(f"{SERVE_CONFIG}: backend 'eager' needs a checkpoint directory, this archive is an export bundle")
        if backend in ("torchscript", "onnx") and not is_bundle:
            raise ValueError(f"{SERVE_CONFIG}: backend {backend!r} needs an export bundle (manifest.json), "
                             "this archive is a checkpoint directory")
        self.max_pixels = cfg.get("max_pixels", 40_000_000)
        options = {k: cfg[k] for k in ("scales", "flip", "crf", "long_side") if cfg.get(k) is not None}
        t0 = time.perf_counter()
        self.segmenter = Segmenter.from_pretrained(model_dir, device=device,
                                                   backend="auto" if backend == "eager" else backend,
                                                   max_pixels=self.max_pixels, **options)
        logger.info("WeCLIP model loaded from %s (%s, device %s) in %.2f s", model_dir,
                    "bundle" if is_bundle else "checkpoint", device, time.perf_counter() - t0)
        self.model = getattr(self.segmenter, "model", None)
        from weclip_infer.memory import reuse_freed_memory

        reuse_freed_memory(device=self.device)  # per-request temporaries reused, not page-faulted in again (issue 9)
        self.initialized = True

    # -- per-request parsing ------------------------------------------------------------------------
    def _headers(self, idx: int) -> Dict[str, Any]:
        try:
            hdrs = self.context.get_all_request_header(idx) or {}
        except Exception:  # noqa: BLE001 - no request processor (e.g. unit tests)
            return {}
        return {str(k).lower(): v for k, v in hdrs.items() if isinstance(k, str)}

    def _parse_request(self, req: Dict[str, Any], idx: int, item: SimpleNamespace) -> None:
        if not isinstance(req, dict):
            raise BadRequest("malformed request")
        raw: Dict[str, Any] = {}
        for k, v in self._headers(idx).items():  # lowest precedence: X-WeCLIP-* headers
            if k.startswith(HEADER_PREFIX) and k[len(HEADER_PREFIX):] in OPTION_KEYS and not isinstance(v, dict):
                raw[k[len(HEADER_PREFIX):]] = v
        for k in OPTION_KEYS:  # query string and multipart text fields
            if k in req and not isinstance(req[k], dict):
                raw[k] = req[k]
        payload = None
        for k in IMAGE_KEYS:
            v = req.get(k)
            if v is None:
                continue
            if isinstance(v, dict):  # JSON body (TorchServe decodes application/json)
                for ok in OPTION_KEYS:
                    if ok in v:
                        raw[ok] = v[ok]
                b64 = v.get("image", v.get("data", v.get("b64")))
                if not isinstance(b64, str):
                    raise BadRequest('JSON body: expected {"image": "<base64 image>", ...}')
                if b64.startswith("data:") and "," in b64:
                    b64 = b64.split(",", 1)[1]
                try:
                    payload = base64.b64decode(b64, validate=True)
                except (binascii.Error, ValueError):
                    raise BadRequest("JSON body: 'image' is not valid base64") from None
            elif isinstance(v, (bytes, bytearray)):
                payload = bytes(v)
            elif isinstance(v, str):
                if k == "image":  # base64 in a form field / query
                    try:
                        payload = base64.b64decode(v, validate=True)
                    except (binascii.Error, ValueError):
                        raise BadRequest("'image': not valid base64") from None
                else:  # a text/* body: the client mislabelled binary data, or sent text
                    payload = v.encode("utf-8", "surrogateescape")
            elif isinstance(v, list):
                raise BadRequest("JSON body: expected an object, got a list")
            else:
                raise BadRequest(f"unsupported request payload of type {type(v).__name__}")
            break
        if payload is None:
            raise BadRequest("no image in the request: send the image as the body, as multipart field "
                             "'data', or as JSON {\"image\": \"<base64>\"}")
        item.payload = payload
        item.opts = parse_options(raw)

    # -- TorchServe stages --------------------------------------------------------------------------
    def preprocess(self, data):
        """Parse each request and decode its image; failures are recorded per request."""
        from weclip_infer.imageio import ImageDecodeError, load_image

        items = []
        for idx, req in enumerate(data):
            item = _new_item()
            items.append(item)
            try:
                self._parse_request(req, idx, item)
                t0 = time.perf_counter()
                item.image = load_image(item.payload, max_pixels=self.max_pixels, name="request body")
                item.timings["decode"] = time.perf_counter() - t0
                item.payload = None
            except PredictionException as e:
                _fail(item, e.message, e.error_code)
            except ImageDecodeError as e:
                _fail(item, f"bad image: {e.reason}", 413 if "more than the limit" in e.reason else 400)
            except Exception as e:  # noqa: BLE001
                logger.exception("request %d: preprocessing failed", idx)
                _fail(item, f"preprocessing failed: {type(e).__name__}: {e}", 500)
        return items

    def inference(self, items, *args, **kwargs):
        """Run ``Segmenter.predict`` on each decoded image (one at a time: sizes differ)."""
        for idx, item in enumerate(items):
            if item.error is not None:
                continue
            o = item.opts
            try:
                item.result = self.segmenter.predict(item.image, scales=o.get("scales"), flip=o.get("flip"),
                                                     crf=o.get("crf"), labels_hint=o.get("labels"))
                for k, v in item.result.timings.items():
                    if k != "decode":
                        item.timings[k] = v
            except ImportError as e:
                _fail(item, f"option not available on this server: {e}", 400)
            except ValueError as e:  # too small image, unknown label hint, bad scale...
                _fail(item, str(e), 400)
            except Exception as e:  # noqa: BLE001
                logger.exception("request %d: inference failed", idx)
                _fail(item, f"inference failed: {type(e).__name__}: {e}", 500)
        return items

    def postprocess(self, items):
        """Encode each result (PNG / JSON / JPEG) and set per-request status and content type."""
        out = []
        for idx, item in enumerate(items):
            body, ctype = None, "application/json"
            if item.error is None:
                try:
                    t0 = time.perf_counter()
                    fmt = item.opts.get("output", "png")
                    res = item.result
                    if fmt == "png":
                        body, ctype = _png_bytes(res.labels), "image/png"
                    elif fmt == "overlay":
                        body, ctype = _jpeg_bytes(item.image, res.labels), "image/jpeg"
                    else:
                        res.timings["decode"] = item.timings.get("decode", 0.0)
                        body = json.dumps(_json_body(res, item.opts.get("rle", False))).encode("utf-8")
                    item.timings["encode"] = time.perf_counter() - t0
                except Exception as e:  # noqa: BLE001
                    logger.exception("request %d: encoding failed", idx)
                    _fail(item, f"encoding failed: {type(e).__name__}: {e}", 500)
            if item.error is not None:
                body = _error_body(item.error)
                ctype = "application/json"
            item.timings["request"] = time.perf_counter() - item.t0
            self._set_response(idx, item.status, ctype)
            out.append(body)
            item.image = item.result = None
        return out

    def _set_response(self, idx: int, status: int, ctype: str) -> None:
        ctx = self.context
        if ctx is None:
            return
        try:
            ctx.set_response_content_type(idx, ctype)
            if status != 200:
                ctx.set_response_status(status, _phrase(status), idx)
        except Exception:  # noqa: BLE001 - no request processor (unit tests)
            logger.debug("could not set response headers", exc_info=True)

    def _emit_metrics(self, items) -> None:
        metrics = getattr(self.context, "metrics", None)
        if metrics is None:
            return
        try:
            agg: Dict[str, float] = {}
            for item in items:
                for k, v in item.timings.items():
                    stage = "network" if k.startswith("network@") else k
                    agg[stage] = agg.get(stage, 0.0) + v
            names = {"decode": "WeCLIPDecodeTime", "network": "WeCLIPNetworkTime", "fuse": "WeCLIPFuseTime",
                     "crf": "WeCLIPCRFTime", "encode": "WeCLIPEncodeTime", "request": "WeCLIPRequestTime"}
            for stage, name in names.items():
                if stage in agg:
                    metrics.add_time(name, round(agg[stage] * 1000.0, 3), None, "ms")
            errors = sum(1 for it in items if it.error is not None)
            if errors:
                metrics.add_counter("WeCLIPRequestErrors", errors, None)
        except Exception:  # noqa: BLE001 - metrics must never fail a request
            logger.debug("metrics emission failed", exc_info=True)

    def handle(self, data, context):
        """Entry point: per-request preprocess → inference → postprocess; always one answer per request."""
        self.context = context
        items = self.preprocess(data)
        items = self.inference(items)
        out = self.postprocess(items)
        self._emit_metrics(items)
        return out

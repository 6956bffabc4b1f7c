"""Where the image and the options sit in a request, whatever the engine that received it.

A request is a mapping as the engines hand it over: TorchServe's request dict (``body`` / ``data``
/ ``file`` / ``image`` entries, query parameters and form fields), or the equivalent that the Ray
Serve deployment builds from a Starlette request. Options come, by increasing precedence, from
``X-WeCLIP-<Option>`` headers, query parameters / multipart text fields, and JSON fields.

A field named ``image`` may hold the image itself or its base64 text (URL-encoded forms can only
carry text): base64 is recognised by its alphabet and decoded.
"""
from __future__ import annotations

import base64
import binascii
from typing import Any, Dict, Mapping, Tuple

from .errors import RequestError
from .options import OPTION_KEYS, parse_options

__all__ = ["IMAGE_KEYS", "HEADER_PREFIX", "parse_request"]

IMAGE_KEYS = ("data", "file", "body", "image")  # where the image may arrive in a request dict
HEADER_PREFIX = "x-weclip-"
_B64_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=\r\n\t "


def _is_base64_text(data: bytes) -> bool:
    """True when ``data`` (after an optional ``data:...;base64,`` prefix) uses only base64 characters."""
    if data.startswith(b"data:") and b"," in data[:256]:
        data = data.split(b",", 1)[1]
    return bool(data) and not data.translate(None, _B64_ALPHABET)


def _b64(text: str, what: str) -> bytes:
    if text.startswith("data:") and "," in text:
        text = text.split(",", 1)[1]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(f"{what} is not valid base64") from None


def parse_request(req: Any, headers: Mapping[str, Any]) -> Tuple[bytes, Dict[str, Any]]:
    """``(image bytes, typed options)`` of one request; raises :class:`RequestError` when malformed."""
    if not isinstance(req, dict):
        raise RequestError("malformed request")
    raw: Dict[str, Any] = {}
    for k, v in headers.items():  # lowest precedence: X-WeCLIP-* headers
        k = str(k).lower()
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
        if isinstance(v, dict):  # a JSON body (decoded by the engine)
            for ok in OPTION_KEYS:
                if ok in v:
                    raw[ok] = v[ok]
            b64 = v.get("image", v.get("data", v.get("b64")))
            if not isinstance(b64, str):
                raise RequestError('JSON body: expected {"image": "<base64 image>", ...}')
            payload = _b64(b64, "JSON body: 'image'")
        elif isinstance(v, (bytes, bytearray)):
            payload = bytes(v)
            if k == "image" and _is_base64_text(payload):  # base64 in a form field (URL-encoded forms)
                payload = _b64(payload.decode("ascii"), "'image':")
        elif isinstance(v, str):
            if k == "image":  # base64 in a form field / query
                payload = _b64(v, "'image':")
            else:  # a text/* body: the client mislabelled binary data, or sent text
                payload = v.encode("utf-8", "surrogateescape")
        elif isinstance(v, list):
            raise RequestError("JSON body: expected an object, got a list")
        else:
            raise RequestError(f"unsupported request payload of type {type(v).__name__}")
        break
    if payload is None:
        raise RequestError("no image in the request: send the image as the body, as multipart field "
                           "'data', or as JSON {\"image\": \"<base64>\"}")
    return payload, parse_options(raw)

"""Request options: the names a client may set and how their raw values are validated.

Raw values arrive as strings or bytes (headers, query parameters, form fields) or as JSON values;
:func:`parse_options` turns them into typed options or raises :class:`RequestError` (HTTP 400).
"""
from __future__ import annotations

from typing import Any, Dict, List, Tuple, Union

from .errors import RequestError

__all__ = ["OUTPUTS", "MODES", "OPTION_KEYS", "MAX_SCALES", "MAX_LABELS", "MAX_LABEL_LENGTH", "parse_options",
           "parse_bool", "parse_scales", "parse_labels"]

OUTPUTS = ("png", "json", "overlay")
#: ``decoder``: the trained decoder (``labels`` restricts it to those classes); ``tags``: masks from
#: the given classes of the model (or zero-shot tags without ``labels``); ``open``: masks for
#: free-text class names (see ``weclip_infer.annotate``).
MODES = ("decoder", "tags", "open")
OPTION_KEYS = ("output", "scales", "flip", "crf", "rle", "labels", "mode")
MAX_SCALES = 8
MAX_LABELS = 20  # names per tags/open request: each costs a GradCAM backward (and a text encoding when new)
MAX_LABEL_LENGTH = 80
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _text(v: Any) -> Any:
    if isinstance(v, (bytes, bytearray)):
        try:
            return bytes(v).decode("utf-8").strip()
        except UnicodeDecodeError:
            raise RequestError("option values must be UTF-8 text") from None
    return v.strip() if isinstance(v, str) else v


def parse_bool(name: str, v: Any) -> bool:
    """``true/false/1/0/yes/no/on/off`` (any case) or a JSON boolean."""
    v = _text(v)
    if isinstance(v, bool):
        return v
    if isinstance(v, (int, float)) and v in (0, 1):
        return bool(v)
    if isinstance(v, str) and v.lower() in _TRUE:
        return True
    if isinstance(v, str) and v.lower() in _FALSE:
        return False
    raise RequestError(f"{name}: expected true or false, got {v!r}")


def parse_scales(v: Any) -> Tuple[float, ...]:
    """Comma-separated text or a JSON list of scales, validated by :func:`weclip_infer.config.validate_scales`."""
    from ..config import validate_scales

    v = _text(v)
    items = v.split(",") if isinstance(v, str) else (v if isinstance(v, (list, tuple)) else [v])
    if len(items) > MAX_SCALES:
        raise RequestError(f"scales: between 1 and {MAX_SCALES} scales expected, got {len(items)}")
    out = []
    for it in items:
        try:
            if isinstance(it, bool):
                raise ValueError
            out.append(float(_text(it)))
        except (TypeError, ValueError):
            raise RequestError(f"scales: expected comma-separated positive numbers, got {v!r}") from None
    try:
        return validate_scales(out, "scales")
    except ValueError as e:
        raise RequestError(str(e)) from None


def parse_labels(v: Any) -> List[Union[int, str]]:
    """Class names or 1-based ids: comma-separated text or a JSON list."""
    v = _text(v)
    items = v.split(",") if isinstance(v, str) else (v if isinstance(v, (list, tuple)) else [v])
    out: List[Union[int, str]] = []
    for it in items:
        it = _text(it)
        if isinstance(it, bool):
            raise RequestError(f"labels: expected class names or ids, got {v!r}")
        if isinstance(it, int):
            out.append(it)
        elif isinstance(it, str) and it:
            if len(it) > MAX_LABEL_LENGTH or not it.isprintable():
                raise RequestError(f"labels: each name at most {MAX_LABEL_LENGTH} printable characters, "
                                   f"got {it[:20]!r}{'…' if len(it) > 20 else ''}")
            out.append(int(it) if it.isdigit() else it)
        elif it not in ("", None):
            raise RequestError(f"labels: expected class names or ids, got {v!r}")
    if not out:
        raise RequestError("labels: empty list")
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
                raise RequestError(f"output: expected one of {', '.join(OUTPUTS)}, got {o!r}")
            opts["output"] = o.lower()
        elif key == "scales":
            opts["scales"] = parse_scales(v)
        elif key in ("flip", "crf", "rle"):
            opts[key] = parse_bool(key, v)
        elif key == "labels":
            opts["labels"] = parse_labels(v)
        elif key == "mode":
            m = _text(v)
            if not isinstance(m, str) or m.lower() not in MODES:
                raise RequestError(f"mode: expected one of {', '.join(MODES)}, got {m!r}")
            opts["mode"] = m.lower()
    if opts.get("mode", "decoder") != "decoder" and len(opts.get("labels", ())) > MAX_LABELS:
        raise RequestError(f"labels: at most {MAX_LABELS} names with mode={opts['mode']}, got {len(opts['labels'])}")
    if opts["rle"] and opts["output"] != "json":
        raise RequestError("rle: only available with output=json")
    return opts

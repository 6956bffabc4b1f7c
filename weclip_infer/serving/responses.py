"""Response encoding shared by every server engine: palette PNG, JSON summary, overlay JPEG, errors."""
from __future__ import annotations

import json
from http import HTTPStatus
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np

__all__ = ["rle_encode", "rle_decode", "json_body", "encode_result", "error_body", "status_phrase"]


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


def rle_decode(counts: Sequence[int], shape: Tuple[int, int]) -> np.ndarray:
    """Inverse of :func:`rle_encode`: an ``H×W`` bool mask."""
    vals = np.arange(len(counts)) % 2 == 1
    return np.repeat(vals, counts).reshape(shape)


def json_body(res: Any, rle: bool) -> Dict[str, Any]:
    """``{"classes", "pixel_counts", "boxes", "scores", "size", "timings"[, "rle"]}`` of a result."""
    labels = res.labels
    names = res.class_names
    ids, counts = np.unique(labels, return_counts=True)

    def name(i: int) -> str:
        return names[i] if 0 <= i < len(names) else str(int(i))

    boxes = {}
    for i in ids:
        if i == 0:
            continue
        ys, xs = np.nonzero(labels == i)
        boxes[name(i)] = [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]
    body: Dict[str, Any] = {
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


def encode_result(res: Any, image: np.ndarray, output: str, rle: bool = False) -> Tuple[bytes, str]:
    """``(body, content type)`` for ``output`` = ``png`` | ``json`` | ``overlay``."""
    from ..imageio import encode_label_png, encode_overlay_jpeg

    if output == "png":
        return encode_label_png(res.labels), "image/png"
    if output == "overlay":
        return encode_overlay_jpeg(image, res.labels), "image/jpeg"
    return json.dumps(json_body(res, rle)).encode("utf-8"), "application/json"


def error_body(message: str) -> bytes:
    return json.dumps({"error": message}).encode("utf-8")


def status_phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""

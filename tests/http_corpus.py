"""The request corpus both HTTP servers are tested with (TorchServe and Ray Serve): images,
multipart bodies, a decompression-bomb header and the bad-input cases with the word each error
must contain. Imported by module name from the test files, like ``training_world``."""
from __future__ import annotations

import io
import struct
import uuid
import zlib

import numpy as np
from PIL import Image

__all__ = ["img_bytes", "png_chunk", "bomb_png", "multipart", "decode_png", "BAD_REQUESTS"]


def img_bytes(h: int, w: int, seed: int = 0, fmt: str = "JPEG") -> bytes:
    """A random ``h×w`` image with a red top-left quarter (some structure), encoded as ``fmt``."""
    rng = np.random.RandomState(seed)
    arr = (rng.rand(h, w, 3) * 255).astype(np.uint8)
    arr[: h // 2, : w // 2] = (200, 30, 30)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def bomb_png(w: int = 20000, h: int = 20000) -> bytes:
    """A tiny PNG whose header declares ``w×h`` pixels (a decompression-bomb header)."""
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 16)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def multipart(fields: dict) -> tuple:
    """``(body, content type)`` of a multipart form: bytes values as file parts, others as text."""
    boundary = uuid.uuid4().hex
    out = io.BytesIO()
    for name, value in fields.items():
        out.write(f"--{boundary}\r\n".encode())
        if isinstance(value, bytes):
            out.write(f'Content-Disposition: form-data; name="{name}"; filename="{name}.img"\r\n'.encode())
            out.write(b"Content-Type: application/octet-stream\r\n\r\n")
            out.write(value)
        else:
            out.write(f'Content-Disposition: form-data; name="{name}"\r\n\r\n{value}'.encode())
        out.write(b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue(), f"multipart/form-data; boundary={boundary}"


def decode_png(body: bytes) -> np.ndarray:
    """A palette-PNG mask response as an int64 label map (fails unless the PNG is a palette PNG)."""
    im = Image.open(io.BytesIO(body))
    assert im.mode == "P"
    return np.asarray(im).astype(np.int64)


#: case → (body, headers, a word the JSON error must contain); "" for the empty body, which
#: TorchServe's frontend answers itself (each server's tests may demand more of it)
BAD_REQUESTS = {
    "random_bytes": (np.random.RandomState(0).bytes(3000), {}, "not a recognised image"),
    "truncated_jpeg": (img_bytes(80, 80)[:300], {}, "image"),
    "zero_bytes": (b"", {}, ""),
    "bomb_header": (bomb_png(), {}, "limit"),
    "output_gif": (img_bytes(32, 32), {"X-WeCLIP-Output": "gif"}, "output"),
    "scales_abc": (img_bytes(32, 32), {"X-WeCLIP-Scales": "abc"}, "scales"),
    "flip_maybe": (img_bytes(32, 32), {"X-WeCLIP-Flip": "maybe"}, "flip"),
    "unknown_label": (img_bytes(32, 32), {"X-WeCLIP-Labels": "unicorn"}, "unicorn"),
    "rle_with_png": (img_bytes(32, 32), {"X-WeCLIP-Rle": "true"}, "rle"),
}

"""Safe image decoding: any PIL mode, EXIF orientation, pixel limits, clear errors.

Every entry point that reads user images (predictor, batch CLI, datasets, the TorchServe handler)
goes through ``load_image`` so that bad input always produces the same ``ImageDecodeError``.
"""
from __future__ import annotations

import io
import os
import threading
import warnings
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from .io_utils import atomic_write_bytes  # the one atomic-write owner; re-exported for callers

__all__ = ["ImageDecodeError", "load_image", "DEFAULT_MAX_PIXELS", "save_png_atomic", "atomic_write_bytes",
           "encode_label_png", "encode_overlay_jpeg"]

DEFAULT_MAX_PIXELS = 40_000_000  # 40 MP; decompression bombs beyond this are refused

ImageSource = Union[str, os.PathLike, bytes, bytearray, np.ndarray, Image.Image]


class ImageDecodeError(ValueError):
    """An input could not be decoded as an image; ``.source`` and ``.reason`` say which and why."""

    def __init__(self, source: str, reason: str):
        super().__init__(f"{source}: {reason}")
        self.source = source
        self.reason = reason


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        if mode.startswith("I;16") and hi <= 65535:
            arr = arr / 257.0
        elif hi > lo:
            arr = (arr - lo) / (hi - lo) * 255.0
        g = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        return Image.fromarray(np.stack([g] * 3, axis=-1))
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))  # transparent → white
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return img.convert("RGB")


_SEQUENTIAL_HUFFMAN_SOF = (0xC0, 0xC1)  # baseline and extended sequential DCT, Huffman-coded
_TRUNCATION_LOCK = threading.Lock()


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _jpeg_data_shortfall(data: bytes) -> str | None:
    """Why a sequential Huffman-coded JPEG cannot hold the image its header declares, or None.

    Every 8×8 block of such a file costs at least two bits (a DC code and an end-of-block code),
    so a file with fewer than ``2 × blocks`` bits was cut or had its size field altered; the
    decoder would otherwise pad the missing part with grey and report success. Progressive and
    arithmetic-coded files have no such bound and are not judged here.
    """
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            i += 2
            continue
        length = int.from_bytes(data[i + 2 : i + 4], "big")
        if marker == 0xDA or length < 2:  # start of scan: no frame header before it
            return None
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            if marker not in _SEQUENTIAL_HUFFMAN_SOF or i + 10 > n:
                return None
            seg = data[i + 4 : i + 2 + length]
            h, w, ncomp = int.from_bytes(seg[1:3], "big"), int.from_bytes(seg[3:5], "big"), seg[5]
            comps = [(seg[6 + 3 * k + 1] >> 4, seg[6 + 3 * k + 1] & 15) for k in range(ncomp) if 8 + 3 * k < len(seg)]
            if not comps or h == 0 or w == 0:
                return None
            hmax, vmax = max(c[0] for c in comps) or 1, max(c[1] for c in comps) or 1
            blocks = sum(_ceil_div(_ceil_div(w * hs, hmax), 8) * _ceil_div(_ceil_div(h * vs, vmax), 8)
                         for hs, vs in comps)
            if 8 * n < 2 * blocks:
                return (f"corrupt or truncated JPEG: the header declares {w}x{h} pixels ({blocks} blocks) but the "
                        f"file holds only {n} bytes, too few for that size")
            return None
        i += 2 + length
    return None


def load_image(src: ImageSource, max_pixels: int = DEFAULT_MAX_PIXELS, name: str | None = None) -> np.ndarray:
    """Decode ``src`` (path, bytes, PIL image or array) into an H×W×3 uint8 RGB array.

    Applies EXIF orientation; converts L/P/RGBA/CMYK/16-bit to RGB. Raises ``ImageDecodeError``
    for missing, empty, non-image, truncated or oversized (> ``max_pixels``) input, and for a
    JPEG whose data is too short for the size its header declares. Truncated data is an error
    even where another library switched on PIL's ``ImageFile.LOAD_TRUNCATED_IMAGES``.
    """
    label = name or (str(src) if isinstance(src, (str, os.PathLike)) else f"<{type(src).__name__}>")
    if isinstance(src, np.ndarray):
        arr = src
        if arr.ndim == 2:
            arr = np.stack([arr] * 3, axis=-1)
        if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
            raise ImageDecodeError(label, f"expected an H×W, H×W×3 or H×W×4 array, got shape {arr.shape}")
        if arr.shape[2] == 1:
            arr = np.repeat(arr, 3, axis=2)
        arr = arr[..., :3]
        if arr.shape[0] < 1 or arr.shape[1] < 1:
            raise ImageDecodeError(label, f"empty image of shape {arr.shape}")
        if arr.shape[0] * arr.shape[1] > max_pixels:
            raise ImageDecodeError(label, f"image has {arr.shape[0] * arr.shape[1]} pixels, "
                                          f"more than the limit {max_pixels}")
        if arr.dtype != np.uint8:
            if np.issubdtype(arr.dtype, np.floating) and arr.max(initial=0) <= 1.0:
                arr = arr * 255.0
            arr = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(arr)
    data = b""
    if isinstance(src, Image.Image):
        img = src
    else:
        if isinstance(src, (bytes, bytearray)):
            data = bytes(src)
        else:
            path = Path(src)
            if not path.exists():
                raise ImageDecodeError(label, "file not found")
            if not path.is_file():
                raise ImageDecodeError(label, "not a regular file")
            data = path.read_bytes()
        if len(data) == 0:
            raise ImageDecodeError(label, "empty file (0 bytes)")
        try:
            img = Image.open(io.BytesIO(data))
        except UnidentifiedImageError:
            raise ImageDecodeError(label, "not a recognised image format") from None
        except Image.DecompressionBombError as e:  # Pillow's own cap fired first: the header is far too large
            raise ImageDecodeError(label, f"image size is more than the limit {max_pixels} pixels ({e})") from None
        except Exception as e:  # noqa: BLE001 - any decoder failure is a bad input
            raise ImageDecodeError(label, f"cannot open image: {e}") from None
    w, h = img.size
    if w < 1 or h < 1:
        raise ImageDecodeError(label, f"empty image of size {w}x{h}")
    if w * h > max_pixels:
        raise ImageDecodeError(label, f"image has {w * h} pixels ({w}x{h}), more than the limit {max_pixels}")
    if data and img.format == "JPEG":
        why = _jpeg_data_shortfall(data)
        if why:
            raise ImageDecodeError(label, why)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            _load_strict(img)
            img = ImageOps.exif_transpose(img)
            img = _to_rgb(img)
            arr = np.asarray(img, dtype=np.uint8)
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise ImageDecodeError(label, f"decompression bomb refused: {e}") from None
    except OSError as e:
        raise ImageDecodeError(label, f"corrupt or truncated image: {e}") from None
    except Exception as e:  # noqa: BLE001
        raise ImageDecodeError(label, f"cannot decode image: {e}") from None
    return np.ascontiguousarray(arr)


def _load_strict(img: Image.Image) -> None:
    """``img.load()`` with PIL's truncated-image tolerance off (it is process-wide; when another
    library turned it on, it is switched off around this load only)."""
    if not ImageFile.LOAD_TRUNCATED_IMAGES:
        img.load()
        return
    with _TRUNCATION_LOCK:
        old = ImageFile.LOAD_TRUNCATED_IMAGES
        ImageFile.LOAD_TRUNCATED_IMAGES = False
        try:
            img.load()
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = old


def encode_label_png(labels: np.ndarray, palette: np.ndarray | None = None) -> bytes:
    """A label map as PNG bytes: a palette PNG (pixel value = class index; VOC colours unless
    ``palette`` is given) for values 0..255, 16-bit greyscale for more classes."""
    from .palette import voc_palette

    arr = np.asarray(labels)
    if arr.size and (arr.min() < 0 or arr.max() > 255):
        img = Image.fromarray(arr.astype(np.uint16))
    else:
        img = Image.fromarray(arr.astype(np.uint8), mode="P")
        pal = voc_palette() if palette is None else np.asarray(palette, dtype=np.uint8)
        img.putpalette(pal.reshape(-1).tolist())
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def encode_overlay_jpeg(image: np.ndarray, labels: np.ndarray, quality: int = 90) -> bytes:
    """The VOC-coloured ``labels`` blended over ``image`` (H×W×3 uint8), as JPEG bytes."""
    from .palette import overlay

    buf = io.BytesIO()
    Image.fromarray(overlay(image, labels)).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def save_png_atomic(path: Union[str, os.PathLike], array: np.ndarray, palette: np.ndarray | None = None) -> None:
    """Save a H×W label map (palette PNG when ``palette`` is given, else 8-bit grey) or an
    H×W×3 image atomically."""
    arr = np.asarray(array)
    if arr.ndim == 2 and palette is not None:
        atomic_write_bytes(path, encode_label_png(arr, palette))
        return
    img = Image.fromarray(arr.astype(np.uint8), mode="L") if arr.ndim == 2 else Image.fromarray(arr.astype(np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())

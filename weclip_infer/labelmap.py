"""Reading label maps (ground truth and predictions) from PNG files: the one rule for every reader.

A label PNG stores one class index per pixel:

* palette ``P`` and greyscale ``L`` (8-bit) images: the stored values are the class indices, taken
  as they are (the palette colours are ignored);
* 1-bit ``1`` images: 0/1;
* 16/32-bit greyscale ``I``/``I;16`` images (what :func:`weclip_infer.imageio.encode_label_png`
  writes for more than 256 classes): the stored values;
* colour images (RGB, RGBA, …, e.g. a palette-coloured visualisation saved as RGB) are refused
  with a clear message: colours cannot be mapped back to classes without guessing.

No torch import: the evaluation CLI uses this module too.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image

from .imageio import ImageDecodeError

__all__ = ["read_label_png", "LABEL_MODES"]

#: PIL modes accepted as label maps (anything else is refused).
LABEL_MODES = ("P", "L", "1", "I", "I;16", "I;16B", "I;16L", "I;16N")


def read_label_png(path: Union[str, os.PathLike]) -> np.ndarray:
    """Read a label PNG as an H×W array of class indices (``uint8`` for P/L/1 images, the stored
    integer type for 16/32-bit ones; never converted through RGB).

    Raises :class:`~weclip_infer.imageio.ImageDecodeError` naming the file for a missing,
    unreadable or colour image.
    """
    p = Path(path)
    try:
        with Image.open(p) as img:
            if img.mode not in LABEL_MODES:
                raise ImageDecodeError(
                    str(p), f"is a {img.mode} image; expected a single-channel label PNG (mode P or L) holding "
                            f"class indices (a colour visualisation cannot be read back as labels)")
            img.load()
            arr = np.asarray(img)
    except ImageDecodeError:
        raise
    except FileNotFoundError:
        raise ImageDecodeError(str(p), "file not found") from None
    except Exception as e:  # noqa: BLE001 - any decoder failure is a bad file
        raise ImageDecodeError(str(p), f"cannot read label PNG: {e}") from None
    if arr.ndim != 2:
        raise ImageDecodeError(str(p), f"expected a 2-D label map, got shape {arr.shape}")
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8)
    return np.ascontiguousarray(arr)

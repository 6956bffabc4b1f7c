"""Serving: request parsing, response encoding, serve config and the service every server engine wraps.

:class:`SegmentationService` is engine-independent; :mod:`weclip_infer.serving.torchserve` adapts
it to TorchServe and ``weclip_handler.py`` (package data) is the file ``torch-model-archiver``
packs. :mod:`~weclip_infer.serving.batching` lets the requests of one server batch share their
network passes. ``config.properties`` here is the TorchServe configuration the quick start uses;
:mod:`~weclip_infer.serving.ts_config` reads it and derives copies on other ports.
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path

from .errors import RequestError
from .options import parse_options
from .responses import rle_decode, rle_encode
from .serve_config import SERVE_CONFIG, read_serve_config, validate_serve_config
from .service import Response, SegmentationService

__all__ = ["RequestError", "parse_options", "rle_encode", "rle_decode", "SERVE_CONFIG", "read_serve_config",
           "validate_serve_config", "Response", "SegmentationService", "handler_file", "torchserve_config_file"]


def handler_file() -> Path:
    """The TorchServe handler file shipped in the package (what ``.mar`` archives carry)."""
    return Path(str(resources.files(__name__) / "weclip_handler.py"))


def torchserve_config_file() -> Path:
    """The ``config.properties`` shipped in the package."""
    return Path(str(resources.files(__name__) / "config.properties"))

"""Scale-out engines on Ray: batch segmentation with Ray Data and an HTTP endpoint on Ray Serve.

* :mod:`weclip_infer.ray.data`: ``segment_dataset`` (a ``ray.data.Dataset`` of images or paths in,
  masks out) and ``segment_folder_ray``, the engine behind ``weclip-segment --engine ray``.
* :mod:`weclip_infer.ray.serve`: the Ray Serve deployment around the same
  :class:`~weclip_infer.serving.SegmentationService` as the TorchServe handler, with the
  ``serve run`` config shipped as ``serve_config.yaml`` (:func:`serve_config_file`).
* :mod:`weclip_infer.ray.cli`: ``weclip-serve-ray``.

Ray is an optional dependency (``pip install 'weclip-infer[ray]'``); importing this package does
not import Ray.
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path

__all__ = ["serve_config_file", "require_ray", "RAY_INSTALL_HINT"]

RAY_INSTALL_HINT = "Ray is not installed: pip install 'weclip-infer[ray]' (ray[data,serve])"


def require_ray() -> None:
    """``RuntimeError`` with the install command when Ray is missing."""
    try:
        import ray  # noqa: F401
    except ImportError:
        raise RuntimeError(RAY_INSTALL_HINT) from None


def serve_config_file() -> Path:
    """The ``serve run`` configuration shipped in the package."""
    return Path(str(resources.files(__name__) / "serve_config.yaml"))

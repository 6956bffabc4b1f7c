"""DenseCRF post-processing (the paper's "w/ CRF" numbers), with two interchangeable backends.

Both refine class probabilities with the same fully connected CRF: unary ``-log(max(p, 1e-5))``,
a Gaussian smoothness kernel (spatial std 3 px, weight 3) and a bilateral appearance kernel
(spatial std 64 px, colour std 5, weight 4), Potts compatibility, 10 mean-field iterations; the
label map is the argmax of the returned marginals.

* ``"torch"`` (:func:`dense_crf_torch`): the mean field in torch with permutohedral-lattice
  filtering, on any device (the model's GPU included), batched. Always available.
  :func:`refine_labels` returns its label map on the probabilities' device (nothing but the
  ``H×W`` labels needs to leave a GPU). On CPU its lattices are built by compiled loops when
  numba is installed (the ``crf`` extra; :mod:`~weclip_infer.crf.lattice_numba`), several times
  faster than with torch operations; :func:`prepare_torch_crf` compiles them ahead of use.
* ``"densecrf"`` (:func:`dense_crf`): the reference C++ implementation through pydensecrf, an
  optional dependency (``pip install "weclip-infer[crf]"``); when it is missing,
  :class:`CRFUnavailableError` says how to install it — CRF is never skipped silently.
* ``"auto"``: the torch backend.

Both compute the same CRF (same lattice approximation): their label maps agree on 100% of the
demo-world val pixels, the marginals up to float rounding (``benchmarks/results/crf.md``). The cost of either grows
with the number of pixels (and with the image's colour variety), so callers cap the size they
refine: :class:`~weclip_infer.predictor.Segmenter` refines at most ``crf_max_pixels`` pixels.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Optional

import numpy as np

from .densecrf import INSTALL_HINT, CRFUnavailableError, _import_pydensecrf, crf_available, dense_crf

if TYPE_CHECKING:  # torch is imported when a torch CRF runs
    import torch

__all__ = ["CRF_BACKENDS", "CRFUnavailableError", "INSTALL_HINT", "crf_available", "crf_labels", "dense_crf",
           "dense_crf_labels_torch", "dense_crf_torch", "prepare_torch_crf", "refine", "refine_labels",
           "resolve_crf_backend"]

CRF_BACKENDS = ("auto", "torch", "densecrf")


def resolve_crf_backend(backend: str) -> str:
    """``"auto"`` → ``"torch"``; checks the name (and that pydensecrf imports, for ``"densecrf"``)."""
    if backend not in CRF_BACKENDS:
        raise ValueError(f"crf_backend must be one of {', '.join(CRF_BACKENDS)}, got {backend!r}")
    if backend == "densecrf":
        _import_pydensecrf()  # raises CRFUnavailableError with the install hint
        return backend
    return "torch"


def dense_crf_torch(*args: Any, **kwargs: Any):
    """See :func:`weclip_infer.crf.permutohedral.dense_crf_torch` (imported lazily: torch)."""
    from .permutohedral import dense_crf_torch as impl

    return impl(*args, **kwargs)


def dense_crf_labels_torch(*args: Any, **kwargs: Any):
    """See :func:`weclip_infer.crf.permutohedral.dense_crf_labels_torch` (imported lazily: torch)."""
    from .permutohedral import dense_crf_labels_torch as impl

    return impl(*args, **kwargs)


def prepare_torch_crf(device: Any = "cpu") -> bool:
    """Make the torch backend ready on ``device`` before the first image: on CPU with numba, the
    lattice construction is compiled (a few seconds, once per machine) or loaded from numba's
    cache. Returns True where there was something to prepare (a no-op elsewhere)."""
    import torch

    from .permutohedral import PermutohedralLattice, _compiled_construction, pixel_features

    if torch.device(device).type != "cpu" or _compiled_construction() is None:
        return False
    PermutohedralLattice(pixel_features(4, 4, 3.0, device="cpu"))
    return True


def _torch_pair(image: Any, probs: Any) -> tuple:
    """``image`` and ``probs`` as tensors, the image on the probabilities' device (numpy → CPU)."""
    import torch

    img_t = image if isinstance(image, torch.Tensor) else torch.from_numpy(np.require(image, requirements=["C", "W"]))
    p_t = probs if isinstance(probs, torch.Tensor) else torch.from_numpy(np.require(probs, requirements=["C", "W"]))
    if img_t.dtype != torch.uint8:
        raise ValueError(f"CRF: image must be uint8 (the original RGB image), got {img_t.dtype}")
    return img_t.to(p_t.device), p_t


def refine(image: Any, probs: Any, backend: str = "auto", max_vertices: Optional[int] = None) -> np.ndarray:
    """CRF marginals ``C×H×W`` (numpy float32) for one ``H×W×3`` uint8 image and ``C×H×W``
    probabilities, with the chosen backend. The torch backend runs on ``probs``' device when it
    is a tensor (CPU for numpy input); ``max_vertices`` caps its lattice (see
    :func:`~weclip_infer.crf.permutohedral.dense_crf_torch`)."""
    backend = resolve_crf_backend(backend)
    if backend == "densecrf":
        return dense_crf(image, probs)
    img_t, p_t = _torch_pair(image, probs)
    q = dense_crf_torch([img_t], [p_t], max_vertices=max_vertices)[0]
    return q.cpu().numpy()


def refine_labels(image: Any, probs: Any, max_vertices: Optional[int] = None) -> "torch.Tensor":
    """The torch backend's CRF label map for one ``H×W×3`` uint8 image and ``C×H×W``
    probabilities: an ``H×W`` int64 tensor on ``probs``' device (CPU for numpy input), equal to
    ``refine(image, probs, "torch").argmax(0)`` (the first class on ties), computed without
    moving the marginals off the device. ``max_vertices`` as for :func:`refine`."""
    img_t, p_t = _torch_pair(image, probs)
    return dense_crf_labels_torch([img_t], [p_t], max_vertices=max_vertices)[0]


def crf_labels(image: np.ndarray, probs: np.ndarray, backend: str = "auto") -> tuple[np.ndarray, float]:
    """CRF on ``H×W×3`` uint8 ``image`` and ``C×H×W`` ``probs`` → (``H×W`` int64 labels, seconds).
    A plain function, so the batch CLI can run it in a worker process."""
    t = time.perf_counter()
    if resolve_crf_backend(backend) == "torch":
        labels = refine_labels(image, probs).cpu().numpy()
    else:
        labels = refine(image, probs, backend).argmax(0).astype(np.int64)
    return labels, time.perf_counter() - t

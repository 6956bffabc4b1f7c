"""DenseCRF through pydensecrf (the reference backend; the paper's "w/ CRF" numbers).

Input: class probabilities (softmax of the fused logits, upsampled to the original image size)
and the original uint8 RGB image. Unary = −log(prob) (pydensecrf's ``unary_from_softmax``, probs
clipped to ≥ 1e-5), a Gaussian pairwise term (sxy 3, compat 3) and a bilateral one (sxy 64,
srgb 5, compat 4), 10 mean-field iterations. The prediction is the argmax of the returned
marginals.

pydensecrf is an optional dependency (``pip install "weclip-infer[crf]"``, which installs
``pydensecrf2==1.1``; it builds from source and needs a C++ compiler). It is imported lazily, and
when it is missing :func:`dense_crf` raises :class:`CRFUnavailableError` — CRF is never skipped
silently.
"""
from __future__ import annotations

from typing import Any, Callable, Tuple

import numpy as np

__all__ = ["CRFUnavailableError", "crf_available", "dense_crf", "INSTALL_HINT"]

INSTALL_HINT = (
    'install it with: pip install "weclip-infer[crf]"  '
    "(this installs pydensecrf2==1.1, which imports as `pydensecrf`; it builds from source and "
    "needs a C++ compiler such as g++ and the Python headers)"
)


class CRFUnavailableError(RuntimeError, ImportError):
    """DenseCRF was requested but the ``pydensecrf`` package cannot be imported."""


def _import_pydensecrf() -> Tuple[Any, Callable[..., np.ndarray]]:
    """Import pydensecrf lazily; returns ``(densecrf_module, unary_from_softmax)``."""
    try:
        import pydensecrf.densecrf as dcrf
        from pydensecrf.utils import unary_from_softmax
    except Exception as e:  # ImportError, or a broken binary build (e.g. numpy ABI mismatch)
        raise CRFUnavailableError(
            f"DenseCRF post-processing needs the `pydensecrf` package, which could not be imported "
            f"({type(e).__name__}: {e}); {INSTALL_HINT}"
        ) from e
    return dcrf, unary_from_softmax


def crf_available() -> bool:
    """True if ``pydensecrf`` can be imported (so :func:`dense_crf` will work)."""
    try:
        _import_pydensecrf()
    except CRFUnavailableError:
        return False
    return True


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach") and hasattr(x, "cpu") and hasattr(x, "numpy"):  # torch.Tensor
        x = x.detach().cpu()
        if str(getattr(x, "dtype", "")) in ("torch.float16", "torch.bfloat16"):
            x = x.float()
        x = x.numpy()
    return np.asarray(x)


def dense_crf(
    image: Any,
    probs: Any,
    iters: int = 10,
    gauss_sxy: float = 3,
    gauss_compat: float = 3,
    bi_sxy: float = 64,
    bi_srgb: float = 5,
    bi_compat: float = 4,
) -> np.ndarray:
    """Refine class probabilities with a fully connected CRF.

    Args:
        image: H×W×3 uint8 RGB image (the original, un-normalised image).
        probs: C×H×W class probabilities (float; numpy or torch), e.g. a softmax over classes.
        iters: mean-field iterations (spec: 10).
        gauss_sxy, gauss_compat: Gaussian (smoothness) kernel — spatial std and weight.
        bi_sxy, bi_srgb, bi_compat: bilateral (appearance) kernel — spatial std, colour std, weight.

    Returns:
        C×H×W float32 marginals (each pixel sums to 1); ``.argmax(0)`` is the label map.

    Raises:
        CRFUnavailableError: pydensecrf is not installed (message says how to install it).
        ValueError: bad shapes/dtypes, image and probs sizes disagree, or non-finite probs.
    """
    img = _to_numpy(image)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"dense_crf: image must be H×W×3 RGB, got shape {img.shape}")
    if img.dtype != np.uint8:
        raise ValueError(
            f"dense_crf: image must be uint8 (the original RGB image, not a normalised tensor), got {img.dtype}"
        )
    p = _to_numpy(probs)
    if p.ndim != 3:
        raise ValueError(f"dense_crf: probs must be C×H×W, got shape {p.shape}")
    if not np.issubdtype(p.dtype, np.floating):
        raise ValueError(f"dense_crf: probs must be floating point, got {p.dtype}")
    C, H, W = p.shape
    if (H, W) != img.shape[:2]:
        raise ValueError(
            f"dense_crf: image is {img.shape[0]}×{img.shape[1]} (H×W) but probs are {H}×{W} "
            f"(C×H×W = {p.shape}); upsample the probabilities to the image size first"
        )
    if C < 1 or H < 1 or W < 1:
        raise ValueError(f"dense_crf: empty probs of shape {p.shape}")
    if not np.isfinite(p).all():
        raise ValueError("dense_crf: probs contain NaN or inf")
    if int(iters) != iters or iters < 0:
        raise ValueError(f"dense_crf: iters must be a non-negative integer, got {iters!r}")

    dcrf, unary_from_softmax = _import_pydensecrf()

    unary = np.ascontiguousarray(unary_from_softmax(p.astype(np.float32, copy=False)), dtype=np.float32)  # (C, H·W)
    d = dcrf.DenseCRF2D(W, H, C)  # width first
    d.setUnaryEnergy(unary)
    d.addPairwiseGaussian(sxy=gauss_sxy, compat=gauss_compat)
    d.addPairwiseBilateral(sxy=bi_sxy, srgb=bi_srgb, rgbim=np.require(img, np.uint8, ["C", "W"]), compat=bi_compat)
    q = d.inference(int(iters))
    return np.asarray(q, dtype=np.float32).reshape(C, H, W)

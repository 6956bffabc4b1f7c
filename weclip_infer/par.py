"""Pixel-adaptive refinement (PAR, from AFA) and online pseudo labels (docs/method.md §5).

Vectorised over the whole batch and all classes: images with fewer classes are padded with
all-zero channels, which stay zero under PAR (it is linear in the CAMs) and are excluded from
the argmax.

Two implementations of the same arithmetic, chosen by device:

* CPU: the neighbours are strided views of one replicate-padded tensor, accumulated one by one
  (``8·len(dilations)`` small in-place products per iteration, image by image so the working
  set stays in cache);
* other devices (GPU): the neighbours of all pixels are taken with one gather from a
  precomputed index (replicate padding is a clamped index), so an iteration is a few large
  kernels instead of ~50 tiny ones: on a GPU the sliced form is bound by kernel launches, not
  by memory. The gathered block is at most :data:`PAR_GATHER_BYTES`; more neighbours are taken
  in chunks.

A third form computes the same iterations as sparse matrix products: each pixel's 48 weights
are one row of a CSR matrix over the replicate-padded CAMs, so an iteration is one row gather
and one sparse × dense product that reads the weights once, where the gathered form writes and
reads ``B×K×48×H×W`` values. :data:`PAR_OFF_CPU_FORM` chooses between the two off CPU; the
gathered form stays the default until the sparse one has been timed on a GPU
(``benchmarks/gpu.py``, check ``par_variants``).
"""
from __future__ import annotations

import math
import warnings
from typing import Sequence

import torch
import torch.nn.functional as F

from .cam import minmax_normalize
from .tensor_ops import channel_argmax, to_device

__all__ = ["NEIGHBOUR_OFFSETS", "PAR_GATHER_BYTES", "PAR_OFF_CPU_FORM", "par_kernel", "pixel_adaptive_refine",
           "upsample_cams", "cam_stack", "pseudo_labels_from_cams"]

# (dy, dx) of the 8 neighbours in the order of docs/method.md §5.2.
NEIGHBOUR_OFFSETS = [(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)]

# Largest gathered neighbour block (bytes) of the gathered implementation: B×K×n'×H×W floats;
# also the largest sparse matrix (weights and column indices) of the sparse one.
PAR_GATHER_BYTES = 256 * 2**20

# The form PAR takes off CPU: "gathered" or "sparse" (see the module docstring).
PAR_OFF_CPU_FORM = "gathered"


def _neighbours(x: torch.Tensor, dilations: Sequence[int]) -> list[torch.Tensor]:
    """The 8·len(dilations) dilated neighbours of every pixel, replicate-padded; each ``B×C×H×W``."""
    H, W = x.shape[-2:]
    # One replicate pad by the largest dilation serves all of them: a clamped index does not
    # depend on how far the padding reaches.
    m = max(dilations)
    p = F.pad(x, (m, m, m, m), mode="replicate")
    out = []
    for d in dilations:
        for dy, dx in NEIGHBOUR_OFFSETS:
            out.append(p[..., m + dy * d : m + dy * d + H, m + dx * d : m + dx * d + W])
    return out


def _neighbour_index(h: int, w: int, dilations: Sequence[int], device: torch.device) -> torch.Tensor:
    """Flat source index of every dilated neighbour of every pixel, ``n×(h·w)`` int64, in the
    order of :func:`_neighbours`; replicate padding is the clamped coordinate."""
    off = to_device(torch.tensor([(dy * d, dx * d) for d in dilations for dy, dx in NEIGHBOUR_OFFSETS]), device)
    y = (torch.arange(h, device=device)[None, :] + off[:, :1]).clamp_(0, h - 1)  # n×h
    x = (torch.arange(w, device=device)[None, :] + off[:, 1:]).clamp_(0, w - 1)  # n×w
    return (y[:, :, None] * w + x[:, None, :]).flatten(1)


def _gather_chunks(x: torch.Tensor, index: torch.Tensor):
    """Yield ``(start, B×C×n'×(h·w))`` blocks of the neighbours of ``x`` (``B×C×h×w``), each at
    most :data:`PAR_GATHER_BYTES`."""
    B, C = x.shape[:2]
    n, hw = index.shape
    per_neighbour = B * C * hw * x.element_size()
    step = max(1, min(n, PAR_GATHER_BYTES // max(1, per_neighbour)))
    flat = x.flatten(2)
    for a in range(0, n, step):
        yield a, flat[:, :, index[a : a + step]]


def _par_kernel_gathered(image: torch.Tensor, index: torch.Tensor, dilations: Sequence[int], w1: float,
                         w2: float) -> torch.Tensor:
    """:func:`par_kernel` with the neighbours gathered by ``index`` (:func:`_neighbour_index` of
    the image size; see the module docstring)."""
    B, c, H, W = image.shape
    n = index.shape[0]
    flat = image.flatten(2)
    mean = torch.zeros_like(flat)
    for _, nb in _gather_chunks(image, index):
        mean.add_(nb.sum(2))
    mean.div_(n)
    var = torch.zeros_like(flat)
    for _, nb in _gather_chunks(image, index):
        var.add_(nb.sub(mean[:, :, None]).square_().sum(2))
    var.div_(n - 1)
    inv = (var.sqrt_().add_(1e-8).mul_(w1)).reciprocal_()
    k = image.new_empty(B, n, H * W)
    for a, nb in _gather_chunks(image, index):
        k[:, a : a + nb.shape[2]] = nb.sub_(flat[:, :, None]).mul_(inv[:, :, None]).square_().sum(1)
    k.div_(-c)
    k.sub_(k.amax(dim=1, keepdim=True)).exp_()
    k.div_(k.sum(dim=1, keepdim=True))
    k.add_(w2 * _position_term(dilations, w1, image).reshape(1, -1, 1))
    return k.view(B, n, H, W)


def _position_term(dilations: Sequence[int], w1: float, ref: torch.Tensor) -> torch.Tensor:
    """softmax over the neighbours of −(distance / std(distances) / w1)²: the kernel's fixed part."""
    dist = to_device(torch.tensor([d * (math.sqrt(2.0) if dy and dx else 1.0) for d in dilations
                                   for dy, dx in NEIGHBOUR_OFFSETS], dtype=ref.dtype), ref.device)
    a_pos = -((dist / (dist.std() + 1e-8) / w1) ** 2)
    return torch.softmax(a_pos, dim=0)


def par_kernel(image: torch.Tensor, dilations: Sequence[int], w1: float = 0.3, w2: float = 0.01) -> torch.Tensor:
    """PAR affinity kernel from the (normalised) guide image (docs/method.md §5.2).

    ``image``: ``B×3×H×W`` → ``B×n×H×W`` with ``n = 8·len(dilations)``; rows sum to ``1 + w2``.
    """
    # Neighbours are strided views of one padded tensor per dilation: no B×3×n×H×W stack; the
    # B×n×H×W logits are written into one buffer and softmaxed in place (peak memory, speed).
    nbs = _neighbours(image, dilations)
    n = len(nbs)
    B, c, H, W = image.shape
    mean = torch.zeros_like(image)
    for nb in nbs:
        mean.add_(nb)
    mean.div_(n)
    var = torch.zeros_like(image)
    for nb in nbs:
        dev = torch.sub(nb, mean)
        var.addcmul_(dev, dev)
    var.div_(n - 1)  # unbiased, two-pass like torch.std
    inv = (var.sqrt_().add_(1e-8).mul_(w1)).reciprocal_()  # 1 / ((σ_c(p) + 1e-8) · w1), B×3×H×W
    # a_rgb(p, q) = mean_c −(|I_c(q) − I_c(p)| / (σ_c(p) + 1e-8) / w1)²
    k = image.new_empty(B, n, H, W)
    for i, nb in enumerate(nbs):
        torch.sum(torch.sub(nb, image).mul_(inv).square_(), dim=1, out=k[:, i])
    k.div_(-c)
    # softmax over the n neighbours, in place: exp(a − max) / Σ exp(a − max)
    k.sub_(k.amax(dim=1, keepdim=True)).exp_()
    k.div_(k.sum(dim=1, keepdim=True))
    k.add_(w2 * _position_term(dilations, w1, image).reshape(1, -1, 1, 1))
    return k


@torch.no_grad()
def pixel_adaptive_refine(image: torch.Tensor, cams: torch.Tensor, dilations: Sequence[int] = (1, 2, 4, 8, 12, 24),
                          num_iter: int = 20, w1: float = 0.3, w2: float = 0.01) -> torch.Tensor:
    """Propagate ``cams`` (``B×K×H×W``) ``num_iter`` times with the image-derived kernel.

    The guide image is resized (bilinear, ``align_corners=True``) to the CAM size (a no-op when
    they match, as in training). Returns ``B×K×H×W``.
    """
    if image.shape[-2:] != cams.shape[-2:]:
        image = F.interpolate(image, size=cams.shape[-2:], mode="bilinear", align_corners=True)
    if image.device.type == "cpu" and image.shape[0] > 1:
        # Image by image on CPU: the B×n×H×W kernel is the largest tensor of a training step
        # (79 MB at batch 4, 320²); per image it is a quarter, and it stays warmer in cache.
        return torch.cat([pixel_adaptive_refine(image[b : b + 1], cams[b : b + 1], dilations, num_iter, w1, w2)
                          for b in range(image.shape[0])])
    if image.device.type != "cpu":
        form = _OFF_CPU_FORMS.get(PAR_OFF_CPU_FORM)
        if form is None:
            raise ValueError(f"par.PAR_OFF_CPU_FORM must be one of {', '.join(_OFF_CPU_FORMS)}, "
                             f"got {PAR_OFF_CPU_FORM!r}")
        return form(image.float(), cams.float(), dilations, num_iter, w1, w2)
    kern = par_kernel(image.float(), dilations, w1, w2)
    x = cams.float()
    for _ in range(num_iter):
        nbs = _neighbours(x, dilations)
        acc = torch.mul(nbs[0], kern[:, 0:1])
        for i in range(1, len(nbs)):
            acc.addcmul_(nbs[i], kern[:, i : i + 1])
        x = acc
    return x


def _refine_gathered(image: torch.Tensor, cams: torch.Tensor, dilations: Sequence[int], num_iter: int, w1: float,
                     w2: float) -> torch.Tensor:
    """The PAR iterations with gathered neighbours (see the module docstring); same sizes in and out."""
    B, K, H, W = cams.shape
    index = _neighbour_index(H, W, dilations, cams.device)
    kern = _par_kernel_gathered(image, index, dilations, w1, w2).flatten(2)[:, None]  # B×1×n×HW
    x = cams
    for _ in range(num_iter):
        acc = cams.new_zeros(B, K, H * W)
        for a, nb in _gather_chunks(x, index):
            acc.add_(nb.mul_(kern[:, :, a : a + nb.shape[2]]).sum(2))
        x = acc.view(B, K, H, W)
    return x


def _sparse_structure(h: int, w: int, dilations: Sequence[int], batch: int, device: torch.device):
    """CSR structure of one PAR iteration as a sparse matrix product over replicate-padded CAMs.

    The CAMs of ``batch`` images are padded by ``m = max(dilations)`` with their edge pixels
    (``pad_index``: padded pixel → source pixel, rows of the pixel-major ``(batch·h·w)×K``
    CAMs). Row ``p`` of the ``(batch·h·w) × (batch·(h+2m)·(w+2m))`` matrix holds the 48 kernel
    weights of pixel ``p`` at its neighbours' padded positions: the neighbours are distinct
    there, and sorting them by offset (``perm``) gives every row the ascending, duplicate-free
    column indices that sparse libraries require. Returns ``(crow, col, perm, pad_index)``.
    """
    off = [(dy * d, dx * d) for d in dilations for dy, dx in NEIGHBOUR_OFFSETS]
    n, m = len(off), max(dilations)
    hp, wp = h + 2 * m, w + 2 * m
    shift = [dy * wp + dx for dy, dx in off]  # distinct: |dx| <= m < wp / 2
    order = sorted(range(n), key=shift.__getitem__)
    itype = torch.int32 if batch * hp * wp < 2**31 and batch * h * w * n < 2**31 else torch.int64
    perm = to_device(torch.tensor(order), device)
    shifts = to_device(torch.tensor([shift[i] for i in order], dtype=itype), device)
    ys = torch.arange(h, device=device, dtype=itype)
    xs = torch.arange(w, device=device, dtype=itype)
    centre = ((ys[:, None] + m) * wp + (xs[None, :] + m)).flatten()  # padded position of each pixel
    images = torch.arange(batch, device=device, dtype=itype)
    col = (images[:, None, None] * (hp * wp) + centre[None, :, None] + shifts).flatten()
    crow = torch.arange(0, batch * h * w * n + 1, n, device=device, dtype=itype)
    src_y = (torch.arange(hp, device=device, dtype=itype) - m).clamp_(0, h - 1)
    src_x = (torch.arange(wp, device=device, dtype=itype) - m).clamp_(0, w - 1)
    pad = (src_y[:, None] * w + src_x[None, :]).flatten()
    pad_index = (images[:, None] * (h * w) + pad[None, :]).flatten()
    return crow, col, perm, pad_index


def _refine_sparse(image: torch.Tensor, cams: torch.Tensor, dilations: Sequence[int], num_iter: int, w1: float,
                   w2: float) -> torch.Tensor:
    """The PAR iterations as sparse matrix products (:func:`_sparse_structure`): per iteration
    one row gather (the replicate padding) and one CSR × dense product, reading each pixel's 48
    weights once instead of materialising the gathered neighbours. Same sizes in and out."""
    B, K, H, W = cams.shape
    n = 8 * len(dilations)
    per_image = 8 * n * H * W  # float32 weight + int32 column per entry
    if per_image > PAR_GATHER_BYTES:  # one image's matrix alone is over the bound: gathered blocks
        return _refine_gathered(image, cams, dilations, num_iter, w1, w2)
    step = max(1, PAR_GATHER_BYTES // per_image)
    if B > step:
        return torch.cat([_refine_sparse(image[a : a + step], cams[a : a + step], dilations, num_iter, w1, w2)
                          for a in range(0, B, step)])
    crow, col, perm, pad_index = _sparse_structure(H, W, dilations, B, cams.device)
    index = _neighbour_index(H, W, dilations, cams.device)
    kern = _par_kernel_gathered(image, index, dilations, w1, w2)  # B×n×H×W
    vals = kern.flatten(2).transpose(1, 2)[:, :, perm].reshape(-1)  # pixel-major, rows sorted by offset
    hp, wp = H + 2 * max(dilations), W + 2 * max(dilations)
    with warnings.catch_warnings():  # torch flags its CSR layout as beta at every construction
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta", category=UserWarning)
        A = torch.sparse_csr_tensor(crow, col, vals, size=(B * H * W, B * hp * wp), check_invariants=False)
    x = cams.permute(0, 2, 3, 1).reshape(B * H * W, K)
    for _ in range(num_iter):
        x = A @ x.index_select(0, pad_index)
    return x.view(B, H, W, K).permute(0, 3, 1, 2).contiguous()


_OFF_CPU_FORMS = {"gathered": _refine_gathered, "sparse": _refine_sparse}


def upsample_cams(cams: Sequence[torch.Tensor], size: Sequence[int]) -> list[torch.Tensor]:
    """Per image ``K_i×h×w`` CAMs → ``K_i×H×W``: min-max normalised, then bilinear
    (``align_corners=False``) to ``size`` (docs/method.md §5.1)."""
    H, W = int(size[0]), int(size[1])
    return [F.interpolate(minmax_normalize(c)[None], size=(H, W), mode="bilinear", align_corners=False)[0]
            if c.shape[0] else c.new_zeros(0, H, W) for c in cams]


def cam_stack(cams_hr: Sequence[torch.Tensor], bg_power: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image ``K_i×H×W`` CAMs → padded ``B×(1+Kmax)×H×W`` stack ``[bg; CAM_1..CAM_K]`` with
    ``bg = (1 − max_k CAM_k)^bg_power`` (docs/method.md §5.1) and a ``B×(1+Kmax)`` validity mask."""
    B = len(cams_hr)
    H, W = cams_hr[0].shape[-2:]
    kmax = max(c.shape[0] for c in cams_hr)
    ref = cams_hr[0]
    out = ref.new_zeros(B, 1 + kmax, H, W)
    valid = torch.zeros(B, 1 + kmax, dtype=torch.bool, device=ref.device)
    for b, c in enumerate(cams_hr):
        k = c.shape[0]
        bg = (1 - c.max(dim=0).values) ** bg_power if k else torch.ones(H, W, dtype=ref.dtype, device=ref.device)
        out[b, 0] = bg
        out[b, 1 : 1 + k] = c
        valid[b, : 1 + k] = True
    return out, valid


def pseudo_labels_from_cams(cams: torch.Tensor, valid: torch.Tensor, keys: Sequence[Sequence[int]]) -> torch.Tensor:
    """``M_p = valid_key[argmax_c cams]`` (docs/method.md §5.2): ``B×(1+Kmax)×H×W`` → ``B×H×W`` int64
    with values in {0} ∪ {c_k + 1}; padded channels never win."""
    masked = cams.masked_fill(~valid[:, :, None, None], float("-inf"))
    idx = channel_argmax(masked, dim=1)
    lut = torch.zeros(valid.shape, dtype=torch.long)
    for b, kb in enumerate(keys):
        if kb:
            lut[b, 1 : 1 + len(kb)] = torch.tensor([k + 1 for k in kb])
    lut = to_device(lut, cams.device)
    return torch.gather(lut, 1, idx.flatten(1)).reshape(idx.shape)

"""Fully connected CRF in torch: mean-field inference with permutohedral-lattice filtering.

The same model and numerics as the reference DenseCRF (Krähenbühl & Koltun, "Efficient Inference
in Fully Connected CRFs with Gaussian Edge Potentials"; the C++ library behind pydensecrf): the
unary is ``-log(max(p, 1e-5))``, each pairwise kernel is a Gaussian over a feature space
(pixel position for the smoothness kernel; position and colour for the appearance kernel),
filtered approximately on a permutohedral lattice (Adams, Baek & Davis, 2010) with symmetric
normalisation, and the label compatibility is Potts. Every step is a tensor operation (sorting,
sparse matrix products, gathers), so it runs on the model's device — CPU or CUDA — and a batch of
images shares one lattice (images never interact: the image index is part of each lattice key).
"""
from __future__ import annotations

import math
import threading
from collections import OrderedDict
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

__all__ = ["LatticeTooLargeError", "PermutohedralLattice", "dense_crf_torch", "pixel_features"]


class LatticeTooLargeError(RuntimeError):
    """The appearance lattice of an image has more vertices than the caller allows
    (``.vertices``); its cost per mean-field step grows with that number."""

    def __init__(self, vertices: int, limit: int):
        super().__init__(f"the CRF lattice has {vertices} vertices, more than the limit {limit}")
        self.vertices = vertices
        self.limit = limit


class PermutohedralLattice:
    """Gaussian filtering of values attached to ``N`` points with ``d``-dimensional features.

    ``features`` (``N×d`` float) are the positions already divided by the kernel's standard
    deviations; ``group`` (``N`` int, optional) keeps points of different groups (images of a
    batch) apart. :meth:`filter` returns, for every point, the sum over all points of
    ``exp(-|f_i - f_j|² / 2)``-like weights times their values, as the permutohedral
    approximation computes it (splat onto lattice vertices with barycentric weights, blur with
    ``[1/2, 1, 1/2]`` along each of the ``d + 1`` lattice axes, slice back).
    """

    def __init__(self, features: torch.Tensor, group: Optional[torch.Tensor] = None):
        if features.ndim != 2:
            raise ValueError(f"features must be N×d, got shape {tuple(features.shape)}")
        f = features.float()
        N, d = f.shape
        dev = f.device
        self.N, self.d = N, d
        d1 = d + 1
        # Elevate onto the hyperplane sum(x) = 0 of R^{d+1}, scaled so that the blur below has the
        # standard deviation of a unit Gaussian in feature space.
        inv_std = math.sqrt(2.0 / 3.0) * d1
        scale = torch.tensor([inv_std / math.sqrt((i + 2) * (i + 1)) for i in range(d)], dtype=torch.float32,
                             device=dev)
        cf = f * scale
        rc = torch.cat([cf.flip(1).cumsum(1).flip(1), torch.zeros(N, 1, device=dev)], 1)  # rc[:, j] = sum_{k>=j} cf
        elevated = torch.empty(N, d1, device=dev)
        elevated[:, 0] = rc[:, 0]
        elevated[:, 1:] = rc[:, 1:] - torch.arange(1, d1, device=dev, dtype=torch.float32) * cf
        del cf, rc
        # Nearest remainder-0 lattice point (coordinates multiple of d+1), then the simplex.
        down = 1.0 / d1
        v = elevated * down
        up_pt = torch.ceil(v) * d1
        dn_pt = torch.floor(v) * d1
        rem0 = torch.where(up_pt - elevated < elevated - dn_pt, up_pt, dn_pt)
        del v, up_pt, dn_pt
        total = torch.round(rem0 * down).sum(1).long()
        diff = elevated - rem0
        rank = self._ranks(diff)
        rank = rank + total[:, None]
        lo_mask, hi_mask = rank < 0, rank > d
        rank = torch.where(lo_mask, rank + d1, torch.where(hi_mask, rank - d1, rank))
        rem0 = torch.where(lo_mask, rem0 + d1, torch.where(hi_mask, rem0 - d1, rem0))
        # Barycentric coordinates of each point in its simplex.
        vb = (elevated - rem0) * down
        bary = torch.zeros(N, d + 2, device=dev)
        bary.scatter_add_(1, d - rank, vb)
        bary.scatter_add_(1, d - rank + 1, -vb)
        bary[:, 0] += 1.0 + bary[:, d1]
        bary = bary[:, :d1].contiguous()
        del vb, elevated, diff
        # The d+1 vertices of each point's simplex, each as one integer code: the first d lattice
        # coordinates (the last one follows from the zero sum) in mixed radix, the group (image
        # index) as the most significant digit. Vertex r of a point is rem0 + canonical[r, rank],
        # canonical[r, k] = r - (d+1)·[k > d - r]; a margin of d+2 around the coordinate range
        # keeps every blur neighbour's code collision-free, so neighbours are found by arithmetic.
        rem0_i = rem0[:, :d].round().long()
        rank_d = rank[:, :d]
        del rem0, rank
        margin = d + 2
        lo = rem0_i.min(0).values - margin
        radix = rem0_i.max(0).values - lo + margin + 1
        n_groups = int(group.max()) + 1 if group is not None else 1
        if float(torch.prod(radix.double())) * n_groups >= 2.0 ** 62:
            raise OverflowError("permutohedral lattice: feature range too large for 64-bit vertex codes")
        strides = torch.ones(d, dtype=torch.int64, device=dev)
        for i in range(d - 2, -1, -1):
            strides[i] = strides[i + 1] * radix[i + 1]
        span = int(strides[0] * radix[0])
        base = ((rem0_i - lo) * strides).sum(1)
        if group is not None:
            base = base + group.to(device=dev, dtype=torch.int64) * span
        del rem0_i
        s_all = int(strides.sum())
        n_perm = d1 ** d  # rank vectors, as base-(d+1) numbers
        if float(span) * n_groups * n_perm < 2.0 ** 62:
            vcodes = self._init_by_simplex(base, rank_d, bary, strides, s_all, n_perm)
        else:
            vcodes = self._init_by_entry(base, rank_d, bary, strides, s_all)
        del base, rank_d
        M = int(vcodes.shape[0])
        self.M = M
        # Blur along each lattice axis: vertex i becomes v_i + (v_n1 + v_n2) / 2, where n1/n2 add
        # (+d, -1, ..., -1) / (-d, +1, ..., +1) with the +-d on axis j. A missing neighbour points
        # at row M, which stays zero (its own bag has weight 0).
        half = torch.full((M + 1, 3), 0.5, device=dev)
        half[:, 0] = 1.0
        half[M] = 0.0
        self._blur_w = half
        self._blur_idx = []
        own = torch.arange(M, device=dev)
        for j in range(d1):
            step = (d1 * int(strides[j]) if j < d else 0) - s_all
            idx = torch.full((M + 1, 3), M, dtype=torch.int64, device=dev)
            idx[:M, 0] = own
            idx[:M, 1] = self._lookup(vcodes, vcodes + step)
            idx[:M, 2] = self._lookup(vcodes, vcodes - step)
            self._blur_idx.append(idx)
        self._alpha = 1.0 / (1.0 + 2.0 ** (-d))
        self._norm: Optional[torch.Tensor] = None

    # ---- construction helpers --------------------------------------------------------------------
    @staticmethod
    def _ranks(diff: torch.Tensor) -> torch.Tensor:
        """Position of each coordinate in descending order (ties: the earlier coordinate first)."""
        d1 = diff.shape[1]
        rank = torch.zeros(diff.shape, dtype=torch.int64, device=diff.device)
        for i in range(d1 - 1):
            for j in range(i + 1, d1):
                later_larger = diff[:, j] > diff[:, i]
                rank[:, i] += later_larger
                rank[:, j] += ~later_larger
        return rank

    @staticmethod
    def _vertex_codes(base: torch.Tensor, rank_d: torch.Tensor, strides: torch.Tensor, s_all: int) -> torch.Tensor:
        d = rank_d.shape[1]
        codes = torch.empty(base.shape[0], d + 1, dtype=torch.int64, device=base.device)
        for r in range(d + 1):
            wrap = ((rank_d > d - r).long() * strides).sum(1)
            codes[:, r] = base + r * s_all - (d + 1) * wrap
        return codes

    @staticmethod
    def _group_sorted(keys: torch.Tensor):
        """Sort ``keys``; returns (unique keys, id of each key's group, sort order, group starts)."""
        sorted_keys, order = torch.sort(keys)
        first = torch.ones_like(sorted_keys, dtype=torch.bool)
        first[1:] = sorted_keys[1:] != sorted_keys[:-1]
        ids = torch.empty_like(order)
        ids[order] = first.cumsum(0) - 1
        return sorted_keys[first], ids, order, torch.nonzero(first).squeeze(1)

    def _init_by_simplex(self, base, rank_d, bary, strides, s_all: int, n_perm: int) -> torch.Tensor:
        """Vertices via the distinct simplices: neighbouring pixels of similar colour share their
        simplex, so one sort of the N points (not of the N·(d+1) point-vertex pairs) finds them.
        Splat runs in two stages: points → (simplex, corner), then (simplex, corner) → vertex."""
        N, d = rank_d.shape
        d1 = d + 1
        dev = base.device
        digits = d1 ** torch.arange(d, device=dev, dtype=torch.int64)
        skeys, point_simplex, order, starts = self._group_sorted(base * n_perm + (rank_d * digits).sum(1))
        S = int(skeys.shape[0])
        s_rank = torch.div((skeys % n_perm)[:, None], digits, rounding_mode="floor") % d1
        corner_codes = self._vertex_codes(torch.div(skeys, n_perm, rounding_mode="floor"), s_rank, strides, s_all)
        vcodes, corner_vertex, corner_order, v_starts = self._group_sorted(corner_codes.t().reshape(-1))  # row r·S + s
        self._slice_idx = corner_vertex.view(d1, S).t()[point_simplex].contiguous()  # N×(d+1)
        self._slice_w = bary
        stage_a = (order.repeat(d1), (starts[None, :] + N * torch.arange(d1, device=dev)[:, None]).reshape(-1),
                   bary[order].t().reshape(-1).contiguous())
        stage_b = (corner_order, v_starts, None)
        self._splat = [stage_a, stage_b]
        return vcodes

    def _init_by_entry(self, base, rank_d, bary, strides, s_all: int) -> torch.Tensor:
        """Vertices via one sort of all N·(d+1) point-vertex pairs (used when simplex keys would
        not fit in 64 bits)."""
        N, d = rank_d.shape
        d1 = d + 1
        vcodes, offset, order, starts = self._group_sorted(self._vertex_codes(base, rank_d, strides, s_all).reshape(-1))
        self._slice_idx = offset.view(N, d1)
        self._slice_w = bary
        self._splat = [(torch.div(order, d1, rounding_mode="floor"), starts, bary.reshape(-1)[order].contiguous())]
        return vcodes

    @staticmethod
    def _lookup(table: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """Index of each code in the sorted ``table``, or ``len(table)`` where it is absent."""
        M = table.shape[0]
        pos = torch.searchsorted(table, codes).clamp_(max=M - 1)
        return torch.where(table[pos] == codes, pos, torch.full_like(pos, M))

    # ---- filtering --------------------------------------------------------------------------------
    def filter(self, values: torch.Tensor) -> torch.Tensor:
        """``N×K`` values → ``N×K`` Gaussian-filtered values (the point itself included)."""
        vals = self.splat(values.float().contiguous())
        vals = torch.cat([vals, vals.new_zeros(1, vals.shape[1])], 0)
        for idx in self._blur_idx:
            vals = F.embedding_bag(idx, vals, mode="sum", per_sample_weights=self._blur_w)
        out = F.embedding_bag(self._slice_idx, vals, mode="sum", per_sample_weights=self._slice_w)
        return out.mul_(self._alpha)

    def splat(self, values: torch.Tensor, point_weights: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``N×K`` point values → ``M×K`` vertex sums (barycentric weights, optionally folded
        with a per-point ``point_weights`` scale precomputed by :meth:`splat_weights`)."""
        for k, (idx, offsets, w) in enumerate(self._splat):
            if k == 0 and point_weights is not None:
                w = point_weights
            values = F.embedding_bag(idx, values, offsets, mode="sum", per_sample_weights=w)
        return values

    def splat_weights(self, scale: torch.Tensor) -> torch.Tensor:
        """First-stage splat weights multiplied by a per-point ``scale`` (``N``)."""
        idx, _, w = self._splat[0]
        return w * scale[idx]

    def norm(self) -> torch.Tensor:
        """Symmetric normalisation ``1/sqrt(K·1)`` per point (computed once)."""
        if self._norm is None:
            ones = torch.ones(self.N, 1, device=self._slice_w.device)
            self._norm = torch.rsqrt(self.filter(ones)[:, 0] + 1e-20)
        return self._norm


def pixel_features(h: int, w: int, sxy: float, image: Optional[torch.Tensor] = None, srgb: float = 1.0,
                   device=None) -> torch.Tensor:
    """Per-pixel features in row-major order: ``(x/sxy, y/sxy)`` and, with ``image`` (``H×W×3``),
    ``(r/srgb, g/srgb, b/srgb)`` appended."""
    dev = image.device if image is not None else device
    ys, xs = torch.meshgrid(torch.arange(h, device=dev, dtype=torch.float32),
                            torch.arange(w, device=dev, dtype=torch.float32), indexing="ij")
    parts = [xs.reshape(-1, 1) / sxy, ys.reshape(-1, 1) / sxy]
    if image is not None:
        parts.append(image.reshape(-1, 3).float() / srgb)
    return torch.cat(parts, 1)


def _check_pair(img: torch.Tensor, p: torch.Tensor, i: int) -> None:
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"dense_crf_torch: image {i} must be H×W×3 RGB, got shape {tuple(img.shape)}")
    if img.dtype != torch.uint8:
        raise ValueError(f"dense_crf_torch: image {i} must be uint8 (the original RGB image), got {img.dtype}")
    if p.ndim != 3:
        raise ValueError(f"dense_crf_torch: probs {i} must be C×H×W, got shape {tuple(p.shape)}")
    if not torch.is_floating_point(p):
        raise ValueError(f"dense_crf_torch: probs {i} must be floating point, got {p.dtype}")
    if tuple(p.shape[1:]) != tuple(img.shape[:2]):
        raise ValueError(f"dense_crf_torch: image {i} is {img.shape[0]}×{img.shape[1]} (H×W) but probs are "
                         f"{p.shape[1]}×{p.shape[2]}; upsample the probabilities to the image size first")
    if p.numel() == 0:
        raise ValueError(f"dense_crf_torch: empty probs of shape {tuple(p.shape)}")
    if not bool(torch.isfinite(p).all()):
        raise ValueError("dense_crf_torch: probs contain NaN or inf")


class _Kernel:
    """One pairwise term: a lattice with the symmetric normalisation and the Potts weight folded
    into its splat and slice weights, so applying it is three kinds of gather-sums."""

    def __init__(self, lat: PermutohedralLattice, compat: float):
        norm = lat.norm()
        self.lat = lat
        self.splat_w = lat.splat_weights(norm)
        self.slice_w = lat._slice_w * (norm * (lat._alpha * compat))[:, None]

    def apply(self, q: torch.Tensor) -> torch.Tensor:
        lat = self.lat
        vals = lat.splat(q, self.splat_w)
        vals = torch.cat([vals, vals.new_zeros(1, vals.shape[1])], 0)
        for idx in lat._blur_idx:
            vals = F.embedding_bag(idx, vals, mode="sum", per_sample_weights=lat._blur_w)
        return F.embedding_bag(lat._slice_idx, vals, mode="sum", per_sample_weights=self.slice_w)


# The smoothness kernel depends only on the image size: its lattice is kept for a few recent sizes
# (up to _CACHE_MAX_POINTS pixels each), so a stream of same-sized images builds it once.
_CACHE: "OrderedDict[tuple, PermutohedralLattice]" = OrderedDict()
_CACHE_SIZE = 4
_CACHE_MAX_POINTS = 1 << 21
_CACHE_LOCK = threading.Lock()


def _grid_lattice(sizes: Sequence[tuple], sxy: float, dev: torch.device) -> PermutohedralLattice:
    key = (tuple(sizes), float(sxy), str(dev))
    with _CACHE_LOCK:
        lat = _CACHE.get(key)
        if lat is not None:
            _CACHE.move_to_end(key)
            return lat
    feats = torch.cat([pixel_features(h, w, sxy, device=dev) for h, w in sizes], 0)
    group = _groups(sizes, dev)
    lat = PermutohedralLattice(feats, group)
    if lat.N <= _CACHE_MAX_POINTS:
        with _CACHE_LOCK:
            _CACHE[key] = lat
            while len(_CACHE) > _CACHE_SIZE:
                _CACHE.popitem(last=False)
    return lat


def _groups(sizes: Sequence[tuple], dev: torch.device) -> Optional[torch.Tensor]:
    if len(sizes) == 1:
        return None
    return torch.cat([torch.full((h * w,), i, dtype=torch.int64, device=dev) for i, (h, w) in enumerate(sizes)])


def _softmax_rows_(e: torch.Tensor) -> torch.Tensor:
    """In-place softmax over the (few) columns of an ``N×C`` tensor (faster than ``torch.softmax``
    over a short innermost dimension)."""
    e.sub_(e.amax(1, keepdim=True)).exp_()
    return e.div_(e.sum(1, keepdim=True))


@torch.no_grad()
def dense_crf_torch(images: Sequence[torch.Tensor], probs: Sequence[torch.Tensor], iters: int = 10,
                    gauss_sxy: float = 3, gauss_compat: float = 3, bi_sxy: float = 64, bi_srgb: float = 5,
                    bi_compat: float = 4, max_vertices: Optional[int] = None) -> list:
    """Mean-field DenseCRF for a batch of images (sizes may differ; all on one device).

    ``images``: ``H×W×3`` uint8 tensors; ``probs``: ``C×H×W`` class probabilities (same ``C``
    for all). Same parameters and defaults as :func:`weclip_infer.crf.dense_crf`. Returns the
    ``C×H×W`` float32 marginals per image, on the images' device. ``max_vertices``: raise
    :class:`LatticeTooLargeError` before any mean-field step when the appearance lattice has
    more vertices (noise-like images), so the caller can retry at a smaller size.
    """
    if len(images) != len(probs) or not images:
        raise ValueError("dense_crf_torch: need the same positive number of images and probability maps")
    if int(iters) != iters or iters < 0:
        raise ValueError(f"dense_crf_torch: iters must be a non-negative integer, got {iters!r}")
    C = probs[0].shape[0]
    dev = probs[0].device
    for i, (im, p) in enumerate(zip(images, probs)):
        _check_pair(im, p, i)
        if p.shape[0] != C:
            raise ValueError(f"dense_crf_torch: all probs need the same number of classes ({C}), "
                             f"probs {i} has {p.shape[0]}")
    sizes = [tuple(p.shape[1:]) for p in probs]
    unary = torch.cat([p.to(dev).float().reshape(C, -1).t() for p in probs], 0).clamp_(1e-5, 1.0).log_()  # = -U, N×C
    bi_feats = torch.cat([pixel_features(h, w, bi_sxy, im.to(dev), bi_srgb) for (h, w), im in zip(sizes, images)], 0)
    bi_lattice = PermutohedralLattice(bi_feats, _groups(sizes, dev))
    del bi_feats
    if max_vertices is not None and bi_lattice.M > max_vertices:
        raise LatticeTooLargeError(bi_lattice.M, int(max_vertices))
    kernels = [_Kernel(_grid_lattice(sizes, gauss_sxy, dev), float(gauss_compat)),
               _Kernel(bi_lattice, float(bi_compat))]
    q = _softmax_rows_(unary.clone())
    for _ in range(int(iters)):
        energy = kernels[0].apply(q)
        energy += unary
        for kern in kernels[1:]:
            energy += kern.apply(q)
        q = _softmax_rows_(energy)
    out = []
    start = 0
    for h, w in sizes:
        n = h * w
        out.append(q[start : start + n].t().reshape(C, h, w).contiguous())
        start += n
    return out

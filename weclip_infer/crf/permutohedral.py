"""Fully connected CRF in torch: mean-field inference with permutohedral-lattice filtering.

The same model and numerics as the reference DenseCRF (Krähenbühl & Koltun, "Efficient Inference
in Fully Connected CRFs with Gaussian Edge Potentials"; the C++ library behind pydensecrf): the
unary is ``-log(max(p, 1e-5))``, each pairwise kernel is a Gaussian over a feature space
(pixel position for the smoothness kernel; position and colour for the appearance kernel),
filtered approximately on a permutohedral lattice (Adams, Baek & Davis, 2010) with symmetric
normalisation, and the label compatibility is Potts. Every step is a tensor operation (sorting,
sparse matrix products, gathers), so it runs on the model's device — CPU or CUDA — and a batch of
images shares one lattice (images never interact: the image index is part of each lattice key).
On CPU the lattices are built by compiled loops when numba is installed
(:mod:`weclip_infer.crf.lattice_numba`: the same lattice, several times cheaper there).
"""
from __future__ import annotations

import logging
import math
import os
import threading
from collections import OrderedDict
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

__all__ = ["LatticeTooLargeError", "PermutohedralLattice", "dense_crf_labels_torch", "dense_crf_torch",
           "pixel_features"]


class LatticeTooLargeError(RuntimeError):
    """The appearance lattice of an image has more vertices than the caller allows
    (``.vertices``); its cost per mean-field step grows with that number."""

    def __init__(self, vertices: int, limit: int):
        super().__init__(f"the CRF lattice has {vertices} vertices, more than the limit {limit}")
        self.vertices = vertices
        self.limit = limit


#: Devices whose blur bags list only the neighbours that exist (sizing them waits for the device).
_COMPACT_BLUR_DEVICES = ("cpu",)

_OVERFLOW = "permutohedral lattice: feature range too large for 64-bit vertex codes"
_NONFINITE = "permutohedral lattice: features contain NaN or inf"
_UNRESOLVED = ("permutohedral lattice: feature values too large for float32 (scale positions and colours by "
               "standard deviations of a sensible size)")


def _code_layout(radix: Sequence[int], n_groups: int) -> tuple:
    """``(strides, span)`` of the mixed-radix vertex codes: ``strides[i]`` = product of
    ``radix[i+1:]`` and ``span`` the number of codes of one group (image). Raises
    ``OverflowError`` where the codes of ``n_groups`` groups would not fit in 64 bits."""
    if math.prod(float(r) for r in radix) * n_groups >= 2.0 ** 62:
        raise OverflowError(_OVERFLOW)
    d = len(radix)
    strides = [1] * d
    for i in range(d - 2, -1, -1):
        strides[i] = strides[i + 1] * radix[i + 1]
    return strides, (strides[0] * radix[0] if d else 1)


class PermutohedralLattice:
    """Gaussian filtering of values attached to ``N`` points with ``d``-dimensional features.

    ``features`` (``N×d`` float) are the positions already divided by the kernel's standard
    deviations; ``group`` (``N`` int, optional) keeps points of different groups (images of a
    batch) apart. :meth:`filter` returns, for every point, the sum over all points of
    ``exp(-|f_i - f_j|² / 2)``-like weights times their values, as the permutohedral
    approximation computes it (splat onto lattice vertices with barycentric weights, blur with
    ``[1/2, 1, 1/2]`` along each of the ``d + 1`` lattice axes, slice back).

    Construction waits for the device three times (the coordinate range, the number of distinct
    simplices, the number of vertices: sizes that the index tensors need); filtering never does.
    Raises ``OverflowError`` when the features span too wide a range for 64-bit vertex codes and
    ``ValueError`` when their values are too large for float32 to place them on the lattice.
    """

    def __init__(self, features: torch.Tensor, group: Optional[torch.Tensor] = None):
        if features.ndim != 2 or features.shape[0] < 1 or features.shape[1] < 1:
            raise ValueError(f"features must be N×d with N, d >= 1, got shape {tuple(features.shape)}")
        f = features.detach().float()
        N, d = f.shape
        self.N, self.d = N, d
        self._alpha = 1.0 / (1.0 + 2.0 ** (-d))
        self._norm: Optional[torch.Tensor] = None
        self._plan: Optional[_FilterPlan] = None
        kernels = _compiled_construction() if f.device.type == "cpu" and N * (d + 1) < 2**31 else None
        if kernels is not None:
            try:
                self._build_compiled(kernels, f, group)
                return
            except (ValueError, OverflowError):  # about the features: the torch construction agrees
                raise
            except Exception as e:  # noqa: BLE001 - e.g. numba cannot compile here: same lattice below
                _disable_compiled(e)
        self._build(f, group)

    def _build_compiled(self, kernels, f: torch.Tensor, group: Optional[torch.Tensor]) -> None:
        """The construction as compiled loops (:mod:`weclip_infer.crf.lattice_numba`): same
        lattice, int32 indices."""
        g = None if group is None else group.detach().to("cpu", torch.int64).contiguous().numpy()
        arrays = kernels.build_lattice(f.contiguous().numpy(), g)
        self.M = arrays.M
        self._slice_idx = torch.from_numpy(arrays.slice_idx)
        self._slice_w = torch.from_numpy(arrays.bary)
        self._splat = tuple(torch.from_numpy(a) for a in arrays.splat)
        self._blur = [tuple(torch.from_numpy(a) for a in axis) for axis in arrays.blur]

    def _build(self, f: torch.Tensor, group: Optional[torch.Tensor]) -> None:
        """The construction as whole-array torch operations (any device)."""
        N, d = f.shape
        dev = f.device
        d1 = d + 1
        # Elevate onto the hyperplane sum(x) = 0 of R^{d+1}, scaled so that the blur below has the
        # standard deviation of a unit Gaussian in feature space. (The scale is computed on the
        # device in float64, as Python would, so that no host→device copy waits for the device.)
        inv_std = math.sqrt(2.0 / 3.0) * d1
        i64 = torch.arange(d, device=dev, dtype=torch.float64)
        scale = (inv_std / torch.sqrt((i64 + 2) * (i64 + 1))).float()
        cf = f * scale
        # rc[:, j] = sum_{k>=j} cf, accumulated from the last column in float64 (what CPU's cumsum
        # does; a scan over a dimension of d elements is slow on a GPU)
        rc = torch.zeros(N, d1, device=dev)
        acc = torch.zeros(N, device=dev, dtype=torch.float64)
        for j in range(d - 1, -1, -1):
            acc = acc + cf[:, j]
            rc[:, j] = acc
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
        # A rank outside 0..d means float32 could not resolve the features (values far too
        # large): reported with the sizes below; clamped meanwhile, so no index goes out of range.
        unresolved = ((rank < 0) | (rank > d)).any()
        rank = rank.clamp_(0, d)
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
        lo = rem0_i.amin(0) - margin
        radix = rem0_i.amax(0) - lo + margin + 1
        strides = torch.cat([radix[1:].flip(0).cumprod(0).flip(0), radix.new_ones(1)])  # strides[i] = prod radix[i+1:]
        # The one copy to the host that construction needs before the sorts: the radices, whether
        # the features were usable (2: not finite, 1: unresolved) and the number of groups; the
        # host-side numbers below are computed from them.
        bad = torch.where(torch.isfinite(f).all(), unresolved.long(), 2)
        parts = [radix, bad[None]]
        if group is not None:
            parts.append(group.to(device=dev, dtype=torch.int64).amax()[None])
        stats = torch.cat(parts).tolist()
        if stats[d]:
            raise ValueError(_NONFINITE if stats[d] == 2 else _UNRESOLVED)
        radix_h = stats[:d]
        n_groups = int(stats[d + 1]) + 1 if group is not None else 1
        strides_h, span = _code_layout(radix_h, n_groups)
        base = ((rem0_i - lo) * strides).sum(1)
        if group is not None:
            base = base + group.to(device=dev, dtype=torch.int64) * span
        del rem0_i
        s_all = sum(strides_h)
        n_perm = d1 ** d  # rank vectors, as base-(d+1) numbers
        if float(span) * n_groups * n_perm < 2.0 ** 62:
            vcodes = self._init_by_simplex(base, rank_d, bary, strides, s_all, n_perm)
        else:
            vcodes = self._init_by_entry(base, rank_d, bary, strides, s_all)
        del base, rank_d
        M = int(vcodes.shape[0])
        self.M = M
        # Blur along each lattice axis: vertex i becomes v_i + (v_n1 + v_n2) / 2, where n1/n2 add
        # (+d, -1, ..., -1) / (-d, +1, ..., +1) with the +-d on axis j. Only the n1 codes are
        # looked up (all axes at once): n2 of a vertex is the vertex whose n1 it is. On CPU each
        # bag holds the vertex itself and the neighbours that exist (about half of the appearance
        # lattice's are absent); elsewhere bags keep three entries, which needs no wait for the
        # device to size them.
        steps = torch.cat([d1 * strides, strides.new_zeros(1)]) - s_all  # d+1
        up = (vcodes[None, :] + steps[:, None]).reshape(-1)  # (d+1)·M, each run of M codes sorted
        pos = torch.searchsorted(vcodes, up).clamp_(max=M - 1)
        found = (vcodes.index_select(0, pos) == up).view(d1, M)
        own = torch.arange(M, device=dev)
        # minus[j, n1(i)] = i; vertices that are nobody's n1 keep M (a spare slot, then absent)
        rows = torch.arange(d1, device=dev)[:, None] * (M + 1)
        minus = torch.full((d1 * (M + 1),), M, dtype=torch.int64, device=dev)
        minus.scatter_(0, (torch.where(found, pos.view(d1, M), M) + rows).reshape(-1), own.repeat(d1))
        minus = minus.view(d1, M + 1)[:, :M]
        nbrs = torch.stack([own.expand(d1, M), torch.where(found, pos.view(d1, M), M), minus], 2)  # (d+1)×M×3
        keep = nbrs < M
        w3 = torch.tensor([1.0, 0.5, 0.5], device=dev).expand(d1, M, 3)
        if dev.type not in _COMPACT_BLUR_DEVICES:
            # three entries per bag, an absent neighbour as the vertex itself with weight 0 (adds
            # exactly 0): no wait for the device
            idx = torch.where(keep, nbrs, own[:, None])
            offs = torch.arange(0, 3 * M, 3, device=dev)
            self._blur = [(idx[j].reshape(-1), offs, (w3[j] * keep[j]).reshape(-1)) for j in range(d1)]
        else:
            lens = keep.sum(2)  # entries per bag, 1..3
            sizes = lens.sum(1).tolist()  # entries per axis
            total = sum(sizes)
            # compaction by scatter (the kept entries in order; dropped ones go to a spare last slot)
            kept = keep.reshape(-1)
            dest = torch.where(kept, kept.cumsum(0) - 1, total)
            flat_idx = nbrs.new_empty(total + 1).scatter_(0, dest, nbrs.reshape(-1))[:total]
            flat_w = w3.new_empty(total + 1).scatter_(0, dest, w3.reshape(-1))[:total]
            offs = lens.cumsum(1) - lens
            self._blur = [(i, o, w) for i, o, w in zip(flat_idx.split(sizes), offs.unbind(0), flat_w.split(sizes))]
        if dev.type == "cpu" and N * d1 < 2**31:
            # int32 indices on CPU: the gather-sums are bound by memory traffic (same results)
            i32 = torch.int32
            sp_idx, sp_off, sp_w = self._splat
            self._splat = (sp_idx.to(i32), sp_off.to(i32), sp_w)
            self._slice_idx = self._slice_idx.to(i32)
            self._blur = [(i.to(i32), o.to(i32), w) for i, o, w in self._blur]

    # ---- construction helpers --------------------------------------------------------------------
    @staticmethod
    def _ranks(diff: torch.Tensor) -> torch.Tensor:
        """Position of each coordinate in descending order (ties: the earlier coordinate first):
        rank_i = #{j > i: diff_j > diff_i} + #{j < i: diff_j >= diff_i}. Pairwise comparisons,
        column by column on CPU (faster there), as a few whole-tensor launches elsewhere."""
        if diff.device.type == "cpu":
            return PermutohedralLattice._ranks_by_pairs(diff)
        return PermutohedralLattice._ranks_at_once(diff)

    @staticmethod
    def _ranks_by_pairs(diff: torch.Tensor) -> torch.Tensor:
        d1 = diff.shape[1]
        rank = torch.zeros(diff.shape, dtype=torch.int64, device=diff.device)
        for i in range(d1 - 1):
            for j in range(i + 1, d1):
                later_larger = diff[:, j] > diff[:, i]
                rank[:, i] += later_larger
                rank[:, j] += ~later_larger
        return rank

    @staticmethod
    def _ranks_at_once(diff: torch.Tensor) -> torch.Tensor:
        k = torch.arange(diff.shape[1], device=diff.device)
        later, earlier = k[None, :] > k[:, None], k[None, :] < k[:, None]  # [i, j]: j after / before i
        a, b = diff[:, None, :], diff[:, :, None]  # [n, i, j]: diff_j, diff_i
        return torch.where(later, a > b, (a >= b) & earlier).sum(2)

    @staticmethod
    def _vertex_codes(base: torch.Tensor, rank_d: torch.Tensor, strides: torch.Tensor, s_all: int) -> torch.Tensor:
        """Codes of the d+1 vertices of each simplex: base + r·s_all - (d+1)·wrap_r, where wrap_r
        sums the strides of the coordinates ranked above d - r (a suffix sum over ranks)."""
        n, d = rank_d.shape
        by_rank = torch.zeros(n, d + 1, dtype=torch.int64, device=base.device).scatter_(1, rank_d, strides.expand(n, d))
        wrap = torch.zeros_like(by_rank)  # wrap[:, r] = sum of by_rank[:, d-r+1:]
        for r in range(1, d + 1):
            wrap[:, r] = wrap[:, r - 1] + by_rank[:, d + 1 - r]
        return base[:, None] + torch.arange(d + 1, device=base.device) * s_all - (d + 1) * wrap

    @staticmethod
    def _group_sorted(keys: torch.Tensor):
        """Sort ``keys``; returns (unique keys, id of each key's group, sort order, group starts).
        One wait for the device (the number of groups)."""
        sorted_keys, order = torch.sort(keys)
        first = torch.ones_like(sorted_keys, dtype=torch.bool)
        torch.ne(sorted_keys[1:], sorted_keys[:-1], out=first[1:])
        starts = torch.nonzero(first).squeeze(1)
        ids = torch.empty_like(order).scatter_(0, order, first.cumsum(0) - 1)
        return sorted_keys.index_select(0, starts), ids, order, starts

    def _init_by_simplex(self, base, rank_d, bary, strides, s_all: int, n_perm: int) -> torch.Tensor:
        """Vertices via the distinct simplices: neighbouring pixels of similar colour share their
        simplex, so one sort of the N points (not of the N·(d+1) point-vertex pairs) finds them.
        The splat is one gather-sum per vertex over the (point, corner) pairs that touch it: the
        pairs are laid out simplex corner by simplex corner, the corners sorted by vertex, so
        each vertex's pairs are one run."""
        N, d = rank_d.shape
        d1 = d + 1
        dev = base.device
        digits = d1 ** torch.arange(d, device=dev, dtype=torch.int64)
        skeys, point_simplex, order, starts = self._group_sorted(base * n_perm + (rank_d * digits).sum(1))
        S = int(skeys.shape[0])
        s_rank = torch.div((skeys % n_perm)[:, None], digits, rounding_mode="floor") % d1
        corner_codes = self._vertex_codes(torch.div(skeys, n_perm, rounding_mode="floor"), s_rank, strides, s_all)
        vcodes, corner_vertex, corner_order, v_starts = self._group_sorted(corner_codes.t().reshape(-1))  # row r·S + s
        self._slice_idx = corner_vertex.view(d1, S).t().contiguous().index_select(0, point_simplex)  # N×(d+1)
        self._slice_w = bary
        # One run of (point, weight) pairs per simplex corner (r, s): the points of simplex s (in
        # sorted order) weighted by their barycentric coordinate r, the corners in vertex order.
        c_r = torch.div(corner_order, S, rounding_mode="floor")
        c_s = corner_order - c_r * S
        counts = torch.diff(starts, append=starts.new_full((1,), N))  # points per simplex
        lengths = counts.index_select(0, c_s)
        a_starts = lengths.cumsum(0) - lengths
        owner = torch.repeat_interleave(lengths, output_size=N * d1)  # stage-1 row of each entry
        pos = (starts.index_select(0, c_s) - a_starts).index_select(0, owner) + torch.arange(N * d1, device=dev)
        points = order.index_select(0, pos)
        weights = bary.view(-1).index_select(0, points * d1 + c_r.index_select(0, owner))
        self._splat = (points, a_starts.index_select(0, v_starts), weights)  # a vertex's corners: one run
        return vcodes

    def _init_by_entry(self, base, rank_d, bary, strides, s_all: int) -> torch.Tensor:
        """Vertices via one sort of all N·(d+1) point-vertex pairs (used when simplex keys would
        not fit in 64 bits)."""
        N, d = rank_d.shape
        d1 = d + 1
        vcodes, offset, order, starts = self._group_sorted(self._vertex_codes(base, rank_d, strides, s_all).reshape(-1))
        self._slice_idx = offset.view(N, d1)
        self._slice_w = bary
        self._splat = (torch.div(order, d1, rounding_mode="floor"), starts, bary.reshape(-1).index_select(0, order))
        return vcodes

    # ---- filtering --------------------------------------------------------------------------------
    def filter(self, values: torch.Tensor) -> torch.Tensor:
        """``N×K`` values → ``N×K`` Gaussian-filtered values (the point itself included)."""
        if self._plan is None:
            self._plan = _FilterPlan([(self, None, None)])
        return self._plan.apply(values.float().contiguous()).mul_(self._alpha)

    def splat_weights(self, scale: torch.Tensor) -> torch.Tensor:
        """Splat weights multiplied by a per-point ``scale`` (``N``)."""
        idx, _, w = self._splat
        return w * scale.index_select(0, idx)

    def norm(self) -> torch.Tensor:
        """Symmetric normalisation ``1/sqrt(K·1)`` per point (computed once)."""
        if self._norm is None:
            ones = torch.ones(self.N, 1, device=self._slice_w.device)
            self._norm = torch.rsqrt(self.filter(ones)[:, 0] + 1e-20)
        return self._norm


#: Set ``WECLIP_CRF_COMPILED=0`` to build lattices with torch operations on CPU too.
_COMPILED_ENV = "WECLIP_CRF_COMPILED"
_compiled: Optional[object] = None
_compiled_checked = False
_compiled_lock = threading.Lock()


def _load_compiled() -> object:
    from . import lattice_numba

    return lattice_numba


def _compiled_construction() -> Optional[object]:
    """:mod:`weclip_infer.crf.lattice_numba` when numba imports (and the environment allows it),
    else ``None``; decided once per process. A numba that is installed but cannot be used (no
    writable cache location, a broken LLVM) is logged and the torch construction is used."""
    global _compiled, _compiled_checked
    if _compiled_checked:
        return _compiled
    with _compiled_lock:
        if not _compiled_checked:
            if os.environ.get(_COMPILED_ENV, "1").strip().lower() not in ("0", "false", "no", "off"):
                try:
                    _compiled = _load_compiled()
                except ImportError:
                    logger.debug("numba is not installed: CPU lattices are built with torch operations")
                except Exception as e:  # noqa: BLE001 - the torch construction computes the same lattice
                    logger.warning("the compiled lattice construction is unavailable (%s: %s); CPU lattices are "
                                   "built with torch operations", type(e).__name__, e)
            _compiled_checked = True
    return _compiled


def _disable_compiled(error: BaseException) -> None:
    """The compiled construction failed at run time: log it once and use torch operations."""
    global _compiled
    with _compiled_lock:
        if _compiled is not None:
            logger.warning("the compiled lattice construction failed (%s: %s); CPU lattices are built with torch "
                           "operations from now on", type(error).__name__, error)
            _compiled = None


def _cat(ts: list) -> torch.Tensor:
    return ts[0] if len(ts) == 1 else torch.cat(ts)


class _FilterPlan:
    """Splat, blur and slice of one or more lattices over the same ``N`` points as a fixed
    sequence of gather-sums (``embedding_bag``) on one stacked table of all their vertices, the
    index tensors built once. The lattices' blur axes run side by side (one call per axis for
    all of them); on a GPU their splats do too, so filtering with both pairwise kernels of the
    CRF costs one splat call, one per blur axis and one slice. On CPU each lattice splats on its
    own (no copy of the largest index tensors).

    ``parts``: ``(lattice, splat_scale, slice_w)``: an optional per-point scale folded into the
    splat weights and the slice weights (``N×(d+1)``; default the barycentric ones). One slice
    call sums every lattice's contribution to a point. Index tensors are int32 where the
    lattices keep them so (CPU) and the stacked tables fit."""

    def __init__(self, parts: Sequence[tuple]):
        lats = [p[0] for p in parts]
        dev = lats[0]._slice_w.device
        N = lats[0].N
        # the lattices' index type (int32 on CPU), unless the stacked tables need int64
        itype = lats[0]._slice_idx.dtype
        if any(lat._slice_idx.dtype != itype for lat in lats) or N * sum(lat.d + 1 for lat in lats) >= 2**31:
            itype = torch.int64
        stages = [(i.to(itype), o.to(itype), w) for i, o, w in self._stages(parts)]
        vbase, n = [], 0  # first row of each lattice's vertices in the stacked table
        for lat in lats:
            vbase.append(n)
            n += lat.M
        # splat: gather-sums from the points whose outputs, concatenated, are the vertex table
        self.splat = stages if dev.type == "cpu" or len(lats) == 1 else [self._merged(stages)]
        # blur: axis j of every lattice that has it; the others' vertices are copied (weight 1)
        self.blur = []
        for j in range(max(lat.d + 1 for lat in lats)):
            idx_l, w_l, off_l = [], [], []
            n_idx = 0
            for lat, b in zip(lats, vbase):
                if j <= lat.d:
                    idx, off, w = lat._blur[j]
                    idx_l.append(idx.to(itype) + b if b else idx.to(itype))
                    w_l.append(w)
                    off_l.append(off.to(itype) + n_idx if n_idx else off.to(itype))
                else:
                    idx_l.append(torch.arange(b, b + lat.M, device=dev, dtype=itype))
                    w_l.append(torch.ones(lat.M, device=dev))
                    off_l.append(torch.arange(n_idx, n_idx + lat.M, device=dev, dtype=itype))
                n_idx += idx_l[-1].shape[0]
            self.blur.append((_cat(idx_l), _cat(off_l), _cat(w_l)))
        # slice: one bag per point over its vertices in every lattice
        idx_l, w_l = [], []
        for (lat, _, slice_w), b in zip(parts, vbase):
            idx_l.append(lat._slice_idx.to(itype) + b if b else lat._slice_idx.to(itype))
            w_l.append(slice_w if slice_w is not None else lat._slice_w)
        K = sum(w.shape[1] for w in w_l)
        self.slice = (torch.cat(idx_l, 1).reshape(-1), torch.arange(0, N * K, K, device=dev, dtype=itype),
                      torch.cat(w_l, 1).reshape(-1))

    @staticmethod
    def _stages(parts: Sequence[tuple]) -> list:
        """Per lattice, its splat ``(indices, offsets, weights)`` with the scale folded into the
        weights."""
        stages = []
        for lat, scale, _ in parts:
            idx, off, w = lat._splat
            stages.append((idx, off, lat.splat_weights(scale) if scale is not None else w))
        return stages

    @staticmethod
    def _merged(stages: list) -> tuple:
        """All lattices' splats as one call (each reads the same N points)."""
        idx_l, off_l, w_l = [], [], []
        n_idx = 0
        for idx, off, w in stages:
            idx_l.append(idx)
            off_l.append(off + n_idx if n_idx else off)
            w_l.append(w)
            n_idx += idx.shape[0]
        return _cat(idx_l), _cat(off_l), _cat(w_l)

    def apply(self, values: torch.Tensor, addend: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``N×C`` float32 contiguous → ``N×C``: the sum of the lattices' (weighted)
        splat-blur-slice, plus ``addend``."""
        vals = _cat([F.embedding_bag(idx, values, off, mode="sum", per_sample_weights=w) for idx, off, w in self.splat])
        for idx, off, w in self.blur:
            vals = F.embedding_bag(idx, vals, off, mode="sum", per_sample_weights=w)
        idx, off, w = self.slice
        out = F.embedding_bag(idx, vals, off, mode="sum", per_sample_weights=w)
        return out if addend is None else out.add_(addend)


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


def _softmax_rows_(e: torch.Tensor, shift: bool = True) -> torch.Tensor:
    """In-place softmax over the (few) columns of an ``N×C`` tensor (faster than ``torch.softmax``
    over a short innermost dimension). ``shift=False`` skips subtracting each row's maximum: only
    for rows whose values are known to lie where ``exp`` neither overflows nor underflows to 0."""
    if shift:
        e.sub_(e.amax(1, keepdim=True))
    e.exp_()
    return e.div_(e.sum(1, keepdim=True))


#: The mean-field logits are ``log p`` (in [log 1e-5, 0]) plus non-negative messages when both
#: Potts weights are non-negative; below this bound on the messages ``exp`` of every logit is a
#: normal float32 whose row sum cannot overflow, so the softmax needs no shift by the row maximum.
_UNSHIFTED_MAX_MESSAGE = 60.0


def _mean_field(images: Sequence[torch.Tensor], probs: Sequence[torch.Tensor], iters: int, gauss_sxy: float,
                gauss_compat: float, bi_sxy: float, bi_srgb: float, bi_compat: float,
                max_vertices: Optional[int], logits: bool = False) -> tuple:
    """The marginals of all images as one ``N×C`` tensor (rows: the images' pixels in order),
    with the images' sizes. ``logits``: the last step's unnormalised logits instead (the same
    argmax, one softmax fewer)."""
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
    unary = torch.cat([p.to(dev).float().reshape(C, -1).t() for p in probs], 0)
    if not bool(torch.isfinite(unary).all()):  # one wait for the device, for the whole batch
        raise ValueError("dense_crf_torch: probs contain NaN or inf")
    unary.clamp_(1e-5, 1.0).log_()  # = -U, N×C
    bi_feats = torch.cat([pixel_features(h, w, bi_sxy, im.to(dev), bi_srgb) for (h, w), im in zip(sizes, images)], 0)
    bi_lattice = PermutohedralLattice(bi_feats, _groups(sizes, dev))
    del bi_feats
    if max_vertices is not None and bi_lattice.M > max_vertices:
        raise LatticeTooLargeError(bi_lattice.M, int(max_vertices))
    parts = []
    for lat, compat in ((_grid_lattice(sizes, gauss_sxy, dev), float(gauss_compat)), (bi_lattice, float(bi_compat))):
        # symmetric normalisation and Potts weight folded into the splat and slice weights
        norm = lat.norm()
        parts.append((lat, norm, lat._slice_w * (norm * (lat._alpha * compat))[:, None]))
    plan = _FilterPlan(parts)  # both kernels: gather-sums for the splats, each blur axis and the slices
    # On CPU the softmax skips the shift by the row maximum (a third of its time) when the
    # messages are provably small: the filter of all-ones bounds them (Q <= 1, weights >= 0).
    # One more wait for the device, so on GPUs (where the shift is cheap) it always shifts.
    shift = not (dev.type == "cpu" and gauss_compat >= 0 and bi_compat >= 0
                 and float(plan.apply(unary.new_ones(unary.shape[0], 1)).max()) < _UNSHIFTED_MAX_MESSAGE)
    q = unary.clone() if logits and iters == 0 else _softmax_rows_(unary.clone(), shift)
    for k in range(int(iters)):
        q = plan.apply(q, unary)  # smoothness + unary + appearance
        if not (logits and k == iters - 1):
            q = _softmax_rows_(q, shift)
    return q, sizes


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

    On a GPU the call waits for the device four times (the input check and the appearance
    lattice's three sizes; three more when the smoothness lattice of a new image size is built);
    the mean-field steps queue without waiting.
    """
    q, sizes = _mean_field(images, probs, iters, gauss_sxy, gauss_compat, bi_sxy, bi_srgb, bi_compat, max_vertices)
    C = q.shape[1]
    out = []
    start = 0
    for h, w in sizes:
        n = h * w
        out.append(q[start : start + n].t().reshape(C, h, w).contiguous())
        start += n
    return out


@torch.no_grad()
def dense_crf_labels_torch(images: Sequence[torch.Tensor], probs: Sequence[torch.Tensor], iters: int = 10,
                           gauss_sxy: float = 3, gauss_compat: float = 3, bi_sxy: float = 64, bi_srgb: float = 5,
                           bi_compat: float = 4, max_vertices: Optional[int] = None) -> list:
    """:func:`dense_crf_torch`'s label maps: the ``H×W`` int64 argmax over the classes of each
    image's marginals (the first class on ties), on the images' device; the marginals are never
    laid out as ``C×H×W``."""
    q, sizes = _mean_field(images, probs, iters, gauss_sxy, gauss_compat, bi_sxy, bi_srgb, bi_compat, max_vertices,
                           logits=True)
    labels = q.argmax(1)
    out = []
    start = 0
    for h, w in sizes:
        n = h * w
        out.append(labels[start : start + n].view(h, w))
        start += n
    return out

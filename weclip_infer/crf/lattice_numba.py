"""Construction of a permutohedral lattice as compiled loops (numba), for CPU.

:class:`~weclip_infer.crf.permutohedral.PermutohedralLattice` builds its index tensors with
whole-array torch operations (sorts, searches, gathers), which is what a GPU wants. On a CPU
that is dozens of passes over memory per image, and building the appearance lattice was about
half of the torch CRF's time. The same construction written as one loop over the points,
with a hash table of vertex codes, is several times cheaper there. numba compiles it; it is an
optional dependency (the ``crf`` extra), and without it the torch construction runs.

Same lattice, same numbers: the points' simplices, barycentric weights (bit for bit: the float32
arithmetic is the torch construction's, step by step), vertex codes and blur neighbours are
those of the torch construction. Only the numbering of the vertices (first seen instead of
sorted by code) and the order of the terms inside a splat sum differ, so filtered values agree
to float32 rounding.
"""
from __future__ import annotations

import math
from typing import List, NamedTuple, Optional, Tuple

import numba
import numpy as np

from .permutohedral import _NONFINITE, _UNRESOLVED, _code_layout

__all__ = ["LatticeArrays", "build_lattice"]

_HASH_MUL = np.uint64(0x9E3779B97F4A7C15)  # Fibonacci hashing: the top bits of code * 2^64/phi


class LatticeArrays(NamedTuple):
    """Index arrays of one lattice (numpy; int32 indices, float32 weights).

    ``slice_idx``/``bary``: ``N×(d+1)`` vertex of each simplex corner and its weight;
    ``splat``: ``(points, offsets, weights)``, each vertex's (point, corner) pairs as one run;
    ``blur``: per axis ``(indices, offsets, weights)``, each vertex's bag (itself with weight 1,
    then its neighbours along the axis that exist, weight 1/2); ``M``: the number of vertices.
    """

    slice_idx: np.ndarray
    bary: np.ndarray
    splat: Tuple[np.ndarray, np.ndarray, np.ndarray]
    blur: List[Tuple[np.ndarray, np.ndarray, np.ndarray]]
    M: int


@numba.njit(cache=True, nogil=True)
def _embed(f, scale):  # pragma: no cover - compiled
    """Per point: the remainder-0 lattice point (first d coordinates), the rank of each
    coordinate, the barycentric weights; and the coordinate range over all points."""
    N, d = f.shape
    d1 = d + 1
    down = np.float32(1.0 / d1)
    fd1 = np.float32(d1)
    rem0_out = np.empty((N, d), np.int64)
    rank_out = np.empty((N, d1), np.int64)
    bary_out = np.empty((N, d1), np.float32)
    lo = np.full(d, np.iinfo(np.int64).max, np.int64)
    hi = np.full(d, np.iinfo(np.int64).min, np.int64)
    cf = np.empty(d, np.float32)
    el = np.empty(d1, np.float32)
    rem0 = np.empty(d1, np.float32)
    diff = np.empty(d1, np.float32)
    rank = np.empty(d1, np.int64)
    vb = np.empty(d1, np.float32)
    bary = np.empty(d + 2, np.float32)
    for i in range(N):
        # elevate onto the hyperplane sum(x) = 0 (the suffix sums accumulate in float64)
        for j in range(d):
            cf[j] = f[i, j] * scale[j]
        acc = 0.0
        el[d] = np.float32(0.0)
        for j in range(d - 1, -1, -1):
            acc += np.float64(cf[j])
            el[j] = np.float32(acc)
        for j in range(d, 0, -1):
            el[j] = el[j] - np.float32(j) * cf[j - 1]
        # nearest remainder-0 point, then the rank of each coordinate's remainder
        total = 0
        for j in range(d1):
            v = el[j] * down
            up = np.float32(np.ceil(v)) * fd1
            dn = np.float32(np.floor(v)) * fd1
            r = up if (up - el[j]) < (el[j] - dn) else dn
            rem0[j] = r
            total += np.int64(np.rint(r * down))
            diff[j] = el[j] - r
            rank[j] = 0
        for a in range(d):  # ties: the earlier coordinate ranks first (no branch: data-dependent)
            for b in range(a + 1, d1):
                g = np.int64(diff[b] > diff[a])
                rank[a] += g
                rank[b] += 1 - g
        for j in range(d1):
            rk = rank[j] + total
            if rk < 0:
                rk += d1
                rem0[j] += fd1
            elif rk > d:
                rk -= d1
                rem0[j] -= fd1
            if rk < 0 or rk > d:  # float32 could not resolve the features: stop before any bad index
                return rem0_out, rank_out, bary_out, lo, hi, False
            rank[j] = rk
        # barycentric weights (added in the torch construction's order: all +, then all -)
        for j in range(d + 2):
            bary[j] = np.float32(0.0)
        for j in range(d1):
            vb[j] = (el[j] - rem0[j]) * down
            bary[d - rank[j]] += vb[j]
        for j in range(d1):
            bary[d - rank[j] + 1] += -vb[j]
        bary[0] += np.float32(1.0) + bary[d1]
        for j in range(d1):
            bary_out[i, j] = bary[j]
            rank_out[i, j] = rank[j]
        for j in range(d):
            r0 = np.int64(np.rint(rem0[j]))
            rem0_out[i, j] = r0
            lo[j] = min(lo[j], r0)
            hi[j] = max(hi[j], r0)
    return rem0_out, rank_out, bary_out, lo, hi, True


@numba.njit(cache=True, nogil=True)
def _slot(keys, code, shift):  # pragma: no cover - compiled
    """The slot of ``code`` in an open-addressing table (its own, or the empty one that ends its probe)."""
    mask = keys.shape[0] - 1
    h = np.int64((np.uint64(code) * _HASH_MUL) >> np.uint64(shift))
    while keys[h] != code and keys[h] != -1:
        h = (h + 1) & mask
    return h


@numba.njit(cache=True, nogil=True)
def _vertices(rem0, rank, lo, strides, group, span):  # pragma: no cover - compiled
    """Vertex id of each point's simplex corners (ids in first-seen order), the vertex codes, and
    the hash table (keys, ids, shift) used to find them. Codes are those of the torch
    construction: mixed-radix lattice coordinates, the group as the most significant digit."""
    N, d = rem0.shape
    d1 = d + 1
    s_all = 0
    for j in range(d):
        s_all += strides[j]
    bits = 12
    keys = np.full(1 << bits, -1, np.int64)
    ids = np.empty(1 << bits, np.int64)
    codes = np.empty(1024, np.int64)
    M = 0
    slice_idx = np.empty((N, d1), np.int32)
    by_rank = np.empty(d1, np.int64)
    prev_base = np.int64(-1)
    for i in range(N):
        base = np.int64(0)
        for j in range(d):
            base += (rem0[i, j] - lo[j]) * strides[j]
        if group.shape[0] > 0:
            base += group[i] * span
        if i > 0 and base == prev_base:  # neighbouring points often share their simplex
            same = True
            for j in range(d):
                if rank[i, j] != rank[i - 1, j]:
                    same = False
                    break
            if same:
                for r in range(d1):
                    slice_idx[i, r] = slice_idx[i - 1, r]
                continue
        prev_base = base
        for r in range(d1):
            by_rank[r] = 0
        for j in range(d):
            by_rank[rank[i, j]] = strides[j]
        wrap = np.int64(0)
        for r in range(d1):
            if r > 0:
                wrap += by_rank[d + 1 - r]
            code = base + r * s_all - d1 * wrap
            h = _slot(keys, code, 64 - bits)
            if keys[h] == code:
                slice_idx[i, r] = ids[h]
                continue
            keys[h] = code
            ids[h] = M
            if M == codes.shape[0]:
                grown = np.empty(2 * M, np.int64)
                grown[:M] = codes
                codes = grown
            codes[M] = code
            slice_idx[i, r] = M
            M += 1
            if 2 * M > keys.shape[0]:  # keep the load under 1/2: grow and reinsert
                bits += 1
                keys = np.full(1 << bits, -1, np.int64)
                ids = np.empty(1 << bits, np.int64)
                for m in range(M):
                    hh = _slot(keys, codes[m], 64 - bits)
                    keys[hh] = codes[m]
                    ids[hh] = m
    return slice_idx, codes[:M].copy(), keys, ids, 64 - bits


@numba.njit(cache=True, nogil=True)
def _blur(codes, keys, ids, shift, steps):  # pragma: no cover - compiled
    """Blur bags of every axis, concatenated: per vertex itself (weight 1), then the vertex at
    code + step (1/2) and the one at code - step (1/2) where they exist. Returns (indices,
    weights, offsets (axes×M, per axis), entries per axis)."""
    M = codes.shape[0]
    d1 = steps.shape[0]
    plus = np.full((d1, M), -1, np.int64)
    minus = np.full((d1, M), -1, np.int64)
    for m in range(M):
        for j in range(d1):
            h = _slot(keys, codes[m] + steps[j], shift)
            if keys[h] != -1:  # found: m is the other's minus neighbour
                p = ids[h]
                plus[j, m] = p
                minus[j, p] = m
    sizes = np.zeros(d1, np.int64)
    for j in range(d1):
        n = M
        for m in range(M):
            n += (plus[j, m] >= 0) + (minus[j, m] >= 0)
        sizes[j] = n
    idx = np.empty(sizes.sum(), np.int32)
    w = np.empty(sizes.sum(), np.float32)
    off = np.empty((d1, M), np.int32)
    k = 0
    for j in range(d1):
        start = k
        for m in range(M):
            off[j, m] = k - start
            idx[k] = m
            w[k] = 1.0
            k += 1
            if plus[j, m] >= 0:
                idx[k] = plus[j, m]
                w[k] = 0.5
                k += 1
            if minus[j, m] >= 0:
                idx[k] = minus[j, m]
                w[k] = 0.5
                k += 1
    return idx, w, off, sizes


@numba.njit(cache=True, nogil=True)
def _splat(slice_idx, bary, M):  # pragma: no cover - compiled
    """Each vertex's (point, weight) pairs as one run (a counting sort of the corners by vertex)."""
    N, d1 = slice_idx.shape
    starts = np.zeros(M + 1, np.int64)
    for i in range(N):
        for r in range(d1):
            starts[slice_idx[i, r] + 1] += 1
    for m in range(M):
        starts[m + 1] += starts[m]
    fill = starts[:M].copy()
    pts = np.empty(N * d1, np.int32)
    w = np.empty(N * d1, np.float32)
    for i in range(N):
        for r in range(d1):
            v = slice_idx[i, r]
            k = fill[v]
            pts[k] = i
            w[k] = bary[i, r]
            fill[v] = k + 1
    return pts, starts[:M].astype(np.int32), w


def build_lattice(features: np.ndarray, group: Optional[np.ndarray] = None) -> LatticeArrays:
    """The lattice of ``features`` (``N×d`` float32, already divided by the kernel's standard
    deviations); ``group`` (``N`` int64, optional) keeps points of different groups apart.
    Raises ``OverflowError`` where vertex codes would not fit in 64 bits and ``ValueError``
    where float32 cannot resolve the features (as the torch construction does), or where the
    index arrays would not fit in int32."""
    f = np.ascontiguousarray(features, dtype=np.float32)
    N, d = f.shape
    d1 = d + 1
    if N * d1 >= 2**31:
        raise ValueError(f"lattice_numba: {N} points of dimension {d} need int64 indices")
    if N < 1 or d < 1:
        raise ValueError(f"lattice_numba: features must be N×d with N, d >= 1, got {f.shape}")
    if not np.isfinite(f).all():
        raise ValueError(_NONFINITE)
    i = np.arange(d, dtype=np.float64)
    scale = (math.sqrt(2.0 / 3.0) * d1 / np.sqrt((i + 2) * (i + 1))).astype(np.float32)
    rem0, rank, bary, lo, hi, resolved = _embed(f, scale)
    if not resolved:
        raise ValueError(_UNRESOLVED)
    margin = d + 2
    lo = lo - margin
    radix = hi - lo + margin + 1
    g = np.empty(0, np.int64) if group is None else np.ascontiguousarray(group, dtype=np.int64)
    n_groups = int(g.max()) + 1 if g.size else 1
    strides_l, span = _code_layout([int(r) for r in radix], n_groups)
    strides = np.array(strides_l, np.int64)
    slice_idx, codes, keys, ids, shift = _vertices(rem0, rank, lo, strides, g, span)
    M = int(codes.shape[0])
    s_all = int(strides.sum())
    steps = np.append(d1 * strides, 0) - s_all
    b_idx, b_w, b_off, sizes = _blur(codes, keys, ids, shift, steps)
    cuts = np.cumsum(sizes)[:-1]
    blur = list(zip(np.split(b_idx, cuts), list(b_off), np.split(b_w, cuts)))
    return LatticeArrays(slice_idx, bary, _splat(slice_idx, bary, M), blur, M)

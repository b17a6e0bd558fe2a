"""Compiled kernels for NMF on a host CSR V (n, C): one sweep over the non-zeros per pass.

SciPy's sparse products run on one core, are not blocked for the k << C columns the solvers
need, and a HALS iteration needs two of them (V H^T for W, then W^T V for H). The kernels here,
compiled by Numba with ``nogil`` so that the solver's worker threads run them on row blocks in
parallel, do better in two ways:

* :func:`w_pass` fuses a whole W half-iteration with the product the H half needs. For each row
  i it computes ``v_i H^T`` (k numbers), applies the HALS (or MU) update to row i of W - the
  column-by-column Gauss-Seidel sweep of HALS touches each row of W independently, so sweeping
  a row at a time gives the same W - and, with the new row, accumulates ``W^T V`` and ``W^T W``.
  One read of V per iteration instead of two, and the same arithmetic.
* :func:`gather` (``V X``), :func:`scatter` (``V^T Y``) and :func:`sketch` (``V^T V Omega`` in
  one read, taking V's moments along) serve the other products and the randomised SVD of the
  NNDSVD start; :func:`nndsvd_w` builds that start's W in one sweep.

Layouts: W is held row-major (n, KW) and H transposed (C, KW), with KW = k rounded up to a
multiple of 8 (padding columns are zero), so one row of either is one contiguous run; the
kernels work on 16 or 8 columns at a time with their accumulators in registers. Sums over a
row are float32 (as SciPy's); W^T W and the error's cross term are float64, summed in any
order within a tile (vectorised). Each row block writes its own partial sums and the caller
adds the blocks in a fixed order, so results do not depend on thread timing.

Numba is optional: without it (or with ``DFF_KERNELS=0``) :data:`AVAILABLE` is False and the
solvers use SciPy's products, with the same results up to float rounding. Numba's set-up (disk
cache, vectoriser, background warm-up) is :mod:`concept_engine.compiled`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from concept_engine import compiled

__all__ = ["AVAILABLE", "HALS", "MU", "NONE", "SKETCH_BLOCK", "WIDE", "dense_moments", "gather",
           "gather_gram", "moments", "nndsvd_w", "part_sq_norms", "scatter", "sketch", "w_pass"]


AVAILABLE = compiled.AVAILABLE

#: Update rules of :func:`w_pass`: none (products only), HALS, Lee-Seung MU.
NONE, HALS, MU = 0, 1, 2
#: Columns per register block of :func:`w_pass`: W and H^T are padded to a multiple of it.
WIDE = 8
#: Columns per block of :func:`sketch`: its Omega is drawn this many columns at a time.
SKETCH_BLOCK = 16


_jit = compiled.jit


# Column indices, and the positions p of the non-zeros, are widened to unsigned 64-bit before
# they index: Numba then needs no negative-index wrap-around test. On a column index that test
# kept the loops from being vectorised; on p it cost ~10 instructions per non-zero (the 8-column
# gather and scatter ran 1.8-1.9x slower with a signed p, same sums).


#: Rows per tile of :func:`w_pass`: the row updates run across a tile's rows (independent, so
#: they vectorise) instead of down one row's k coordinates (a chain of dependent operations).
TILE = 256


@_jit
def _tile_update(hvT, wT, nr, HHt, inv_diag, rule, den):
    """Rows 0..nr of the tile: hvT, wT (kw, TILE) float64; wT updated in place by rule."""
    k = HHt.shape[0]
    if rule == 1:  # HALS: coordinate j to its non-negative optimum, in order 0..k-1
        for j in range(k):
            if inv_diag[j] == 0.0:
                continue  # component j is zero on the other side: nothing to solve for
            for r in range(nr):
                den[r] = hvT[j, r]
            for m in range(k):
                hjm = HHt[j, m]
                for r in range(nr):
                    den[r] -= hjm * wT[m, r]
            inv = inv_diag[j]
            for r in range(nr):
                v = wT[j, r] + den[r] * inv
                wT[j, r] = v if v > 0.0 else 0.0
    elif rule == 2:  # MU with the seed's zero-denominator guard; all j from the old row
        for j in range(k):
            for r in range(nr):
                den[r] = 0.0
            for m in range(k):
                hjm = HHt[j, m]
                for r in range(nr):
                    den[r] += hjm * wT[m, r]
            for r in range(nr):
                d = den[r] if den[r] != 0.0 else 1e-7
                hvT[j, r] = hvT[j, r] / d  # the ratio, applied below once every j has its den
        for j in range(k):
            for r in range(nr):
                wT[j, r] = wT[j, r] * hvT[j, r]


@_jit(fastmath={"reassoc"})
def _tile_finish(t0, nr, W, hvT, hv_keep, wT, HHt, rule, inv_diag, den, WtW):  # noqa: E501
    """Everything of a tile between the gather and the scatter; returns (cross_old, cross_new)."""
    k = HHt.shape[0]
    row0 = np.uint64(t0)  # unsigned, as in the products: no wrap-around test per element
    cross_old = 0.0
    for j in range(k):
        for r in range(nr):
            wT[j, r] = W[row0 + np.uint64(r), j]
            cross_old += wT[j, r] * hvT[j, r]
    cross_new = 0.0
    if rule != 0:
        if rule == 2:
            # MU overwrites hvT with its ratios: keep the products for the new cross term
            for j in range(k):
                for r in range(nr):
                    hv_keep[j, r] = hvT[j, r]
        else:
            hv_keep = hvT
        _tile_update(hvT, wT, nr, HHt, inv_diag, rule, den)
        for j in range(k):
            for r in range(nr):
                W[row0 + np.uint64(r), j] = wT[j, r]
                # the stored float32 value is what later products see
                wT[j, r] = W[row0 + np.uint64(r), j]
        for j in range(k):
            for r in range(nr):
                cross_new += wT[j, r] * hv_keep[j, r]
    else:
        cross_new = cross_old
    for j in range(k):
        for m in range(j, k):
            s = 0.0
            for r in range(nr):
                s += wT[j, r] * wT[m, r]
            WtW[j, m] += s
            if m != j:
                WtW[m, j] += s
    return cross_old, cross_new


@_jit
def _inv_diag(HHt):
    k = HHt.shape[0]
    out = np.zeros(k, dtype=np.float64)
    for j in range(k):
        out[j] = 1.0 / HHt[j, j] if HHt[j, j] > 0.0 else 0.0
    return out


@_jit
def _w_pass(indptr, indices, data, a, b, W, Hf, HHt, rule, accumulate, WtVf, WtW):  # noqa: E501
    kw = W.shape[1]  # a multiple of 8: the columns go in blocks of 16 and 8, kept in registers
    hvT = np.zeros((kw, TILE), dtype=np.float64)
    hv_keep = np.zeros((kw, TILE), dtype=np.float64)
    wT = np.zeros((kw, TILE), dtype=np.float64)
    den = np.zeros(TILE, dtype=np.float64)
    inv_diag = _inv_diag(HHt)
    cross_old = 0.0
    cross_new = 0.0
    for t0 in range(a, b, TILE):
        nr = min(TILE, b - t0)
        # the tile's V H^T, summed in float32 and stored straight into the transposed tile
        _gather(indptr, indices, data, t0, t0 + nr, Hf, hvT.T, t0)
        co, cn = _tile_finish(t0, nr, W, hvT, hv_keep, wT, HHt, rule, inv_diag, den, WtW)
        cross_old += co
        cross_new += cn
        if accumulate:
            _scatter(indptr, indices, data, t0, t0 + nr, W, WtVf, 0)  # with the new rows of W
    return cross_old, cross_new


# The products below work on the columns in blocks of 16 (one AVX-512 vector of float32, or
# two AVX2 ones) while at least 16 are left, then one block of 8: each pass over a row's
# non-zeros then feeds twice as many columns (measured 1.5-1.7x faster than blocks of 8 at
# N=5000, with bit-identical sums - every column still adds its terms in the same order).
# The gather's block of 8 (the W pass's for k <= 8) adds the even and the odd non-zeros of a
# row apart and then together: float32 sums that may differ from SciPy's in the last bit.


@_jit
def _gather(indptr, indices, data, a, b, Xf, out, row0):
    """out[i - row0] = v_i X for rows a..b; X (C, m) flattened, m a multiple of 8; sums in X's
    dtype (out may be wider, and a transposed view)."""
    m = out.shape[1]
    um = np.uint64(m)
    zero = Xf.dtype.type(0.0)
    for i in range(a, b):
        o = i - row0
        g = 0
        while g + 16 <= m:
            # two sets of accumulators (even and odd non-zeros), as in the block of 8 below
            # (1.1x faster here)
            ug = np.uint64(g)
            h0 = h1 = h2 = h3 = h4 = h5 = h6 = h7 = zero
            h8 = h9 = h10 = h11 = h12 = h13 = h14 = h15 = zero
            e0 = e1 = e2 = e3 = e4 = e5 = e6 = e7 = zero
            e8 = e9 = e10 = e11 = e12 = e13 = e14 = e15 = zero
            p = np.uint64(indptr[i])
            end = np.uint64(indptr[i + 1])
            while p + np.uint64(1) < end:
                c = np.uint64(indices[p]) * um + ug
                d = data[p]
                h0 += d * Xf[c]
                h1 += d * Xf[c + np.uint64(1)]
                h2 += d * Xf[c + np.uint64(2)]
                h3 += d * Xf[c + np.uint64(3)]
                h4 += d * Xf[c + np.uint64(4)]
                h5 += d * Xf[c + np.uint64(5)]
                h6 += d * Xf[c + np.uint64(6)]
                h7 += d * Xf[c + np.uint64(7)]
                h8 += d * Xf[c + np.uint64(8)]
                h9 += d * Xf[c + np.uint64(9)]
                h10 += d * Xf[c + np.uint64(10)]
                h11 += d * Xf[c + np.uint64(11)]
                h12 += d * Xf[c + np.uint64(12)]
                h13 += d * Xf[c + np.uint64(13)]
                h14 += d * Xf[c + np.uint64(14)]
                h15 += d * Xf[c + np.uint64(15)]
                c = np.uint64(indices[p + np.uint64(1)]) * um + ug
                d = data[p + np.uint64(1)]
                e0 += d * Xf[c]
                e1 += d * Xf[c + np.uint64(1)]
                e2 += d * Xf[c + np.uint64(2)]
                e3 += d * Xf[c + np.uint64(3)]
                e4 += d * Xf[c + np.uint64(4)]
                e5 += d * Xf[c + np.uint64(5)]
                e6 += d * Xf[c + np.uint64(6)]
                e7 += d * Xf[c + np.uint64(7)]
                e8 += d * Xf[c + np.uint64(8)]
                e9 += d * Xf[c + np.uint64(9)]
                e10 += d * Xf[c + np.uint64(10)]
                e11 += d * Xf[c + np.uint64(11)]
                e12 += d * Xf[c + np.uint64(12)]
                e13 += d * Xf[c + np.uint64(13)]
                e14 += d * Xf[c + np.uint64(14)]
                e15 += d * Xf[c + np.uint64(15)]
                p += np.uint64(2)
            if p < end:
                c = np.uint64(indices[p]) * um + ug
                d = data[p]
                h0 += d * Xf[c]
                h1 += d * Xf[c + np.uint64(1)]
                h2 += d * Xf[c + np.uint64(2)]
                h3 += d * Xf[c + np.uint64(3)]
                h4 += d * Xf[c + np.uint64(4)]
                h5 += d * Xf[c + np.uint64(5)]
                h6 += d * Xf[c + np.uint64(6)]
                h7 += d * Xf[c + np.uint64(7)]
                h8 += d * Xf[c + np.uint64(8)]
                h9 += d * Xf[c + np.uint64(9)]
                h10 += d * Xf[c + np.uint64(10)]
                h11 += d * Xf[c + np.uint64(11)]
                h12 += d * Xf[c + np.uint64(12)]
                h13 += d * Xf[c + np.uint64(13)]
                h14 += d * Xf[c + np.uint64(14)]
                h15 += d * Xf[c + np.uint64(15)]
            out[o, g], out[o, g + 1] = h0 + e0, h1 + e1
            out[o, g + 2], out[o, g + 3] = h2 + e2, h3 + e3
            out[o, g + 4], out[o, g + 5] = h4 + e4, h5 + e5
            out[o, g + 6], out[o, g + 7] = h6 + e6, h7 + e7
            out[o, g + 8], out[o, g + 9] = h8 + e8, h9 + e9
            out[o, g + 10], out[o, g + 11] = h10 + e10, h11 + e11
            out[o, g + 12], out[o, g + 13] = h12 + e12, h13 + e13
            out[o, g + 14], out[o, g + 15] = h14 + e14, h15 + e15
            g += 16
        if g < m:
            # two sets of accumulators (even and odd non-zeros), added at the end: two
            # chains of dependent additions instead of one (1.3x faster here)
            ug = np.uint64(g)
            h0 = h1 = h2 = h3 = h4 = h5 = h6 = h7 = zero
            e0 = e1 = e2 = e3 = e4 = e5 = e6 = e7 = zero
            p = np.uint64(indptr[i])
            end = np.uint64(indptr[i + 1])
            while p + np.uint64(1) < end:
                c = np.uint64(indices[p]) * um + ug
                d = data[p]
                h0 += d * Xf[c]
                h1 += d * Xf[c + np.uint64(1)]
                h2 += d * Xf[c + np.uint64(2)]
                h3 += d * Xf[c + np.uint64(3)]
                h4 += d * Xf[c + np.uint64(4)]
                h5 += d * Xf[c + np.uint64(5)]
                h6 += d * Xf[c + np.uint64(6)]
                h7 += d * Xf[c + np.uint64(7)]
                c = np.uint64(indices[p + np.uint64(1)]) * um + ug
                d = data[p + np.uint64(1)]
                e0 += d * Xf[c]
                e1 += d * Xf[c + np.uint64(1)]
                e2 += d * Xf[c + np.uint64(2)]
                e3 += d * Xf[c + np.uint64(3)]
                e4 += d * Xf[c + np.uint64(4)]
                e5 += d * Xf[c + np.uint64(5)]
                e6 += d * Xf[c + np.uint64(6)]
                e7 += d * Xf[c + np.uint64(7)]
                p += np.uint64(2)
            if p < end:
                c = np.uint64(indices[p]) * um + ug
                d = data[p]
                h0 += d * Xf[c]
                h1 += d * Xf[c + np.uint64(1)]
                h2 += d * Xf[c + np.uint64(2)]
                h3 += d * Xf[c + np.uint64(3)]
                h4 += d * Xf[c + np.uint64(4)]
                h5 += d * Xf[c + np.uint64(5)]
                h6 += d * Xf[c + np.uint64(6)]
                h7 += d * Xf[c + np.uint64(7)]
            out[o, g], out[o, g + 1] = h0 + e0, h1 + e1
            out[o, g + 2], out[o, g + 3] = h2 + e2, h3 + e3
            out[o, g + 4], out[o, g + 5] = h4 + e4, h5 + e5
            out[o, g + 6], out[o, g + 7] = h6 + e6, h7 + e7


#: Rows per tile of :func:`_gather_gram`: the tile's products are still in the L1 cache when
#: their Gram sums are taken (256 rows x 16 columns: 16 KiB).
_GRAM_TILE = 256


@_jit
def _gather_gram(indptr, indices, data, a, b, Xf, out, G):
    """out[i] = v_i X for rows a..b (:func:`_gather`, row0 = 0) and G (m, m) float64 += the
    rows' out^T out: summed in out's dtype over a tile of rows while the tile is in cache, the
    tiles' sums in float64 (the NNDSVD start's B = V Q and B^T B in one pass)."""
    m = out.shape[1]
    T = np.zeros((m, m), dtype=out.dtype)
    for t0 in range(a, b, _GRAM_TILE):
        t1 = min(t0 + _GRAM_TILE, b)
        _gather(indptr, indices, data, t0, t1, Xf, out, 0)
        T[:] = 0
        if m % 16 == 0:
            # 16 columns of the row in registers, then one vector update per row of T
            for i in range(t0, t1):
                for cb in range(0, m, 16):
                    x0 = out[i, cb + 0]
                    x1 = out[i, cb + 1]
                    x2 = out[i, cb + 2]
                    x3 = out[i, cb + 3]
                    x4 = out[i, cb + 4]
                    x5 = out[i, cb + 5]
                    x6 = out[i, cb + 6]
                    x7 = out[i, cb + 7]
                    x8 = out[i, cb + 8]
                    x9 = out[i, cb + 9]
                    x10 = out[i, cb + 10]
                    x11 = out[i, cb + 11]
                    x12 = out[i, cb + 12]
                    x13 = out[i, cb + 13]
                    x14 = out[i, cb + 14]
                    x15 = out[i, cb + 15]
                    for r in range(m):
                        xr = out[i, r]
                        T[r, cb + 0] += xr * x0
                        T[r, cb + 1] += xr * x1
                        T[r, cb + 2] += xr * x2
                        T[r, cb + 3] += xr * x3
                        T[r, cb + 4] += xr * x4
                        T[r, cb + 5] += xr * x5
                        T[r, cb + 6] += xr * x6
                        T[r, cb + 7] += xr * x7
                        T[r, cb + 8] += xr * x8
                        T[r, cb + 9] += xr * x9
                        T[r, cb + 10] += xr * x10
                        T[r, cb + 11] += xr * x11
                        T[r, cb + 12] += xr * x12
                        T[r, cb + 13] += xr * x13
                        T[r, cb + 14] += xr * x14
                        T[r, cb + 15] += xr * x15
        else:
            for i in range(t0, t1):
                for r in range(m):
                    for c in range(m):
                        T[r, c] += out[i, r] * out[i, c]
        for r in range(m):
            for c in range(m):
                G[r, c] += T[r, c]


@_jit
def _scatter(indptr, indices, data, a, b, Y, outf, row0):
    """outf += V^T Y over rows a..b (row i of V meets row i - row0 of Y); Y (., m),
    outf = (C, m) flattened, m a multiple of 8."""
    m = Y.shape[1]
    um = np.uint64(m)
    for i in range(a, b):
        r = i - row0
        g = 0
        while g + 16 <= m:
            ug = np.uint64(g)
            w0, w1, w2, w3 = Y[r, g], Y[r, g + 1], Y[r, g + 2], Y[r, g + 3]
            w4, w5, w6, w7 = Y[r, g + 4], Y[r, g + 5], Y[r, g + 6], Y[r, g + 7]
            w8, w9, w10, w11 = Y[r, g + 8], Y[r, g + 9], Y[r, g + 10], Y[r, g + 11]
            w12, w13, w14, w15 = Y[r, g + 12], Y[r, g + 13], Y[r, g + 14], Y[r, g + 15]
            for p in range(np.uint64(indptr[i]), np.uint64(indptr[i + 1])):
                c = np.uint64(indices[p]) * um + ug
                d = data[p]
                outf[c] += d * w0
                outf[c + np.uint64(1)] += d * w1
                outf[c + np.uint64(2)] += d * w2
                outf[c + np.uint64(3)] += d * w3
                outf[c + np.uint64(4)] += d * w4
                outf[c + np.uint64(5)] += d * w5
                outf[c + np.uint64(6)] += d * w6
                outf[c + np.uint64(7)] += d * w7
                outf[c + np.uint64(8)] += d * w8
                outf[c + np.uint64(9)] += d * w9
                outf[c + np.uint64(10)] += d * w10
                outf[c + np.uint64(11)] += d * w11
                outf[c + np.uint64(12)] += d * w12
                outf[c + np.uint64(13)] += d * w13
                outf[c + np.uint64(14)] += d * w14
                outf[c + np.uint64(15)] += d * w15
            g += 16
        if g < m:
            ug = np.uint64(g)
            w0, w1, w2, w3 = Y[r, g], Y[r, g + 1], Y[r, g + 2], Y[r, g + 3]
            w4, w5, w6, w7 = Y[r, g + 4], Y[r, g + 5], Y[r, g + 6], Y[r, g + 7]
            for p in range(np.uint64(indptr[i]), np.uint64(indptr[i + 1])):
                c = np.uint64(indices[p]) * um + ug
                d = data[p]
                outf[c] += d * w0
                outf[c + np.uint64(1)] += d * w1
                outf[c + np.uint64(2)] += d * w2
                outf[c + np.uint64(3)] += d * w3
                outf[c + np.uint64(4)] += d * w4
                outf[c + np.uint64(5)] += d * w5
                outf[c + np.uint64(6)] += d * w6
                outf[c + np.uint64(7)] += d * w7


@_jit
def _sketch(indptr, indices, data, a, b, Of, Zf, m):
    """Zf += V^T (V Omega) over rows a..b, reading each row once: per row and block of 16
    columns, v Omega in registers, then scattered back while the row is in cache. Omega, Z
    (C, m) flattened, m a multiple of 16. Returns (sum, sum of squares, min) of the rows'
    stored values, taken along in the first block (float64; see :func:`_moments`).

    The loops repeat :func:`_gather` and :func:`_scatter` on purpose: calling them per tile
    (as :func:`_w_pass` does) made the start ~10% slower, as v Omega then goes through memory;
    and the moments ride along with the first block's scatter (one read of V fewer). In the
    scatter's loop, not the product's: their float64 chains of dependent additions set the
    pace of the product's loop, while the scatter's waits on memory anyway (with the product's
    two accumulator sets, the sketch of 2500 images on one thread: 36 -> 32 ms)."""
    um = np.uint64(m)
    zero = Zf.dtype.type(0.0)
    total = 0.0
    sq = 0.0
    low = np.inf
    for i in range(a, b):
        start = np.uint64(indptr[i])
        end = np.uint64(indptr[i + 1])
        for g in range(0, m, 16):
            ug = np.uint64(g)
            h0 = h1 = h2 = h3 = h4 = h5 = h6 = h7 = zero
            h8 = h9 = h10 = h11 = h12 = h13 = h14 = h15 = zero
            e0 = e1 = e2 = e3 = e4 = e5 = e6 = e7 = zero
            e8 = e9 = e10 = e11 = e12 = e13 = e14 = e15 = zero
            p = start
            while p + np.uint64(1) < end:
                c = np.uint64(indices[p]) * um + ug
                d = data[p]
                h0 += d * Of[c]
                h1 += d * Of[c + np.uint64(1)]
                h2 += d * Of[c + np.uint64(2)]
                h3 += d * Of[c + np.uint64(3)]
                h4 += d * Of[c + np.uint64(4)]
                h5 += d * Of[c + np.uint64(5)]
                h6 += d * Of[c + np.uint64(6)]
                h7 += d * Of[c + np.uint64(7)]
                h8 += d * Of[c + np.uint64(8)]
                h9 += d * Of[c + np.uint64(9)]
                h10 += d * Of[c + np.uint64(10)]
                h11 += d * Of[c + np.uint64(11)]
                h12 += d * Of[c + np.uint64(12)]
                h13 += d * Of[c + np.uint64(13)]
                h14 += d * Of[c + np.uint64(14)]
                h15 += d * Of[c + np.uint64(15)]
                c = np.uint64(indices[p + np.uint64(1)]) * um + ug
                d = data[p + np.uint64(1)]
                e0 += d * Of[c]
                e1 += d * Of[c + np.uint64(1)]
                e2 += d * Of[c + np.uint64(2)]
                e3 += d * Of[c + np.uint64(3)]
                e4 += d * Of[c + np.uint64(4)]
                e5 += d * Of[c + np.uint64(5)]
                e6 += d * Of[c + np.uint64(6)]
                e7 += d * Of[c + np.uint64(7)]
                e8 += d * Of[c + np.uint64(8)]
                e9 += d * Of[c + np.uint64(9)]
                e10 += d * Of[c + np.uint64(10)]
                e11 += d * Of[c + np.uint64(11)]
                e12 += d * Of[c + np.uint64(12)]
                e13 += d * Of[c + np.uint64(13)]
                e14 += d * Of[c + np.uint64(14)]
                e15 += d * Of[c + np.uint64(15)]
                p += np.uint64(2)
            if p < end:
                c = np.uint64(indices[p]) * um + ug
                d = data[p]
                h0 += d * Of[c]
                h1 += d * Of[c + np.uint64(1)]
                h2 += d * Of[c + np.uint64(2)]
                h3 += d * Of[c + np.uint64(3)]
                h4 += d * Of[c + np.uint64(4)]
                h5 += d * Of[c + np.uint64(5)]
                h6 += d * Of[c + np.uint64(6)]
                h7 += d * Of[c + np.uint64(7)]
                h8 += d * Of[c + np.uint64(8)]
                h9 += d * Of[c + np.uint64(9)]
                h10 += d * Of[c + np.uint64(10)]
                h11 += d * Of[c + np.uint64(11)]
                h12 += d * Of[c + np.uint64(12)]
                h13 += d * Of[c + np.uint64(13)]
                h14 += d * Of[c + np.uint64(14)]
                h15 += d * Of[c + np.uint64(15)]
            h0, h1, h2, h3 = h0 + e0, h1 + e1, h2 + e2, h3 + e3
            h4, h5, h6, h7 = h4 + e4, h5 + e5, h6 + e6, h7 + e7
            h8, h9, h10, h11 = h8 + e8, h9 + e9, h10 + e10, h11 + e11
            h12, h13, h14, h15 = h12 + e12, h13 + e13, h14 + e14, h15 + e15
            t = 0.0
            s = 0.0
            lo = np.inf
            for p in range(start, end):
                c = np.uint64(indices[p]) * um + ug
                d = data[p]
                if g == 0:
                    v = np.float64(d)
                    t += v
                    s += v * v
                    if v < lo or v != v:  # a NaN sticks (no later value compares below it)
                        lo = v
                Zf[c] += d * h0
                Zf[c + np.uint64(1)] += d * h1
                Zf[c + np.uint64(2)] += d * h2
                Zf[c + np.uint64(3)] += d * h3
                Zf[c + np.uint64(4)] += d * h4
                Zf[c + np.uint64(5)] += d * h5
                Zf[c + np.uint64(6)] += d * h6
                Zf[c + np.uint64(7)] += d * h7
                Zf[c + np.uint64(8)] += d * h8
                Zf[c + np.uint64(9)] += d * h9
                Zf[c + np.uint64(10)] += d * h10
                Zf[c + np.uint64(11)] += d * h11
                Zf[c + np.uint64(12)] += d * h12
                Zf[c + np.uint64(13)] += d * h13
                Zf[c + np.uint64(14)] += d * h14
                Zf[c + np.uint64(15)] += d * h15
            if g == 0:
                total += t
                sq += s
                if lo < low or lo != lo:
                    low = lo
    return total, sq, low


@_jit
def _moments(data, lo, hi):
    """(sum, sum of squares, min) of data[lo:hi], accumulated in float64."""
    total = 0.0
    sq = 0.0
    low = np.inf
    for p in range(np.uint64(lo), np.uint64(hi)):
        v = np.float64(data[p])
        total += v
        sq += v * v
        if v < low or v != v:  # a NaN sticks (no later value compares below it)
            low = v
    return total, sq, low


@_jit(fastmath={"reassoc"})
def _part_sq_norms(Ut, a, b, out):
    """out[j] = (||max(u_j, 0)||^2, ||u_j||^2) over columns a..b of Ut (k, n): float64 sums,
    vectorised (any order within the vector)."""
    for j in range(Ut.shape[0]):
        pos = 0.0
        tot = 0.0
        row = Ut[j]
        for i in range(np.uint64(a), np.uint64(b)):
            v = np.float64(row[i])
            sq = v * v
            tot += sq
            pos += sq if v > 0.0 else 0.0
        out[j, 0] = pos
        out[j, 1] = tot


@_jit(fastmath={"reassoc"})
def _dense_moments(data, lo, hi):
    """(sum, sum of squares, count of negatives) of data[lo:hi], float64 sums, vectorised
    (any order within the vector; a NaN makes the sums NaN). A count instead of the minimum:
    LLVM does not vectorise a floating-point minimum, and the count is 5x faster."""
    total = 0.0
    sq = 0.0
    negatives = 0
    for p in range(np.uint64(lo), np.uint64(hi)):
        v = np.float64(data[p])
        total += v
        sq += v * v
        negatives += v < 0.0
    return total, sq, negatives


@_jit
def _nndsvd_w(Ut, mode, scale, eps, fill, Wt, a, b):
    """Wt[j, a:b] = part_j(Ut[j, a:b]) * scale[j], entries below eps set to fill; part: |x|
    (mode 0), max(x, 0) (mode 1), max(-x, 0) (mode -1). float32 throughout, as NumPy does it."""
    for j in range(Ut.shape[0]):
        sc = scale[j]
        u = Ut[j]
        w = Wt[j]
        if mode[j] == 0:
            for i in range(np.uint64(a), np.uint64(b)):
                v = abs(u[i]) * sc
                w[i] = v if v >= eps else fill
        else:
            sg = Ut.dtype.type(mode[j])
            zero = Ut.dtype.type(0.0)
            for i in range(np.uint64(a), np.uint64(b)):
                x = u[i] * sg
                v = (x if x > zero else zero) * sc
                w[i] = v if v >= eps else fill


# Typed entry points: the argument order of the compiled functions lives here only.


def w_pass(V: Any, a: int, b: int, W: Any, Ht: Any, HHt: Any, rule: int, accumulate: bool,
           WtV_T: Any, WtW: Any) -> tuple[float, float]:
    """Rows a..b of one W half-iteration (see the module doc).

    W (n, KW) float32, KW a multiple of :data:`WIDE`, is updated in place by ``rule``;
    Ht (C, KW) float32 holds H^T (padding columns zero); HHt (k, k) float64. With
    ``accumulate``, WtV_T (C, KW) float32 gains the rows' V^T W (new W); WtW (k, k) float64
    always gains their W^T W (new W). Returns the cross terms <W_old, V H^T> and
    <W_new, V H^T> over the rows (float64).
    """
    old, new = _w_pass(V.indptr, V.indices, V.data, a, b, W, Ht.ravel(), HHt, rule, accumulate,
                    WtV_T.ravel(), WtW)
    return float(old), float(new)


def _padded(X: Any) -> Any:
    """X (r, m) C-contiguous with m rounded up to a multiple of 8 (zero columns added)."""
    m = X.shape[1]
    mw = -(-m // WIDE) * WIDE
    if mw == m:
        return np.ascontiguousarray(X)
    out = np.zeros((X.shape[0], mw), dtype=X.dtype)
    out[:, :m] = X
    return out


def gather(V: Any, a: int, b: int, X: Any, out: Any) -> None:
    """out[a:b] = V[a:b] X; X (C, m) and out (n, m) of one dtype, m a multiple of 8 (see
    :func:`_padded`)."""
    _gather(V.indptr, V.indices, V.data, a, b, X.ravel(), out, 0)


def gather_gram(V: Any, a: int, b: int, X: Any, out: Any, G: Any) -> None:
    """out[a:b] = V[a:b] X (as :func:`gather`) and G += out[a:b]^T out[a:b]; G (m, m)
    float64, m = out's width."""
    _gather_gram(V.indptr, V.indices, V.data, a, b, X.ravel(), out, G)


def scatter(V: Any, a: int, b: int, Y: Any, out: Any) -> None:
    """out += V[a:b]^T Y[a:b]; Y (n, m), out (C, m) C-contiguous of Y's dtype, m a multiple
    of 8."""
    _scatter(V.indptr, V.indices, V.data, a, b, Y, out.ravel(), 0)


def sketch(V: Any, a: int, b: int, Omega: Any, Z: Any) -> tuple[float, float, float]:
    """Z += V[a:b]^T V[a:b] Omega; Omega and Z (C, m) C-contiguous, one dtype, m a multiple
    of 16 (:data:`SKETCH_BLOCK`). Returns the rows' moments, as :func:`moments` does."""
    m = Omega.shape[1]
    if m % SKETCH_BLOCK or Z.shape != Omega.shape:
        raise ValueError(f"sketch needs Omega and Z of one shape, m a multiple of "
                         f"{SKETCH_BLOCK}; got {Omega.shape} and {Z.shape}")
    total, sq, low = _sketch(V.indptr, V.indices, V.data, a, b, Omega.ravel(), Z.ravel(), m)
    return float(total), float(sq), float(low)


def moments(V: Any, a: int, b: int) -> tuple[float, float, float]:
    """(sum, sum of squares, min) of the stored values of rows a..b (float64; min inf when
    there are none, NaN when one is NaN)."""
    total, sq, low = _moments(V.data, int(V.indptr[a]), int(V.indptr[b]))
    return float(total), float(sq), float(low)


def dense_moments(X: Any, a: int, b: int) -> tuple[float, float, int]:
    """(sum, sum of squares, number of negative values) of rows a..b of a C-contiguous dense
    X (n, C) float32/float64: one vectorised read (a NaN makes both sums NaN)."""
    C = X.shape[1]
    total, sq, negatives = _dense_moments(X.reshape(-1), a * C, b * C)
    return float(total), float(sq), int(negatives)


def part_sq_norms(Ut: Any, a: int, b: int) -> Any:
    """(k, 2) float64: per row j of Ut (k, n), over columns a..b, the squared norm of its
    positive part and its squared norm."""
    out = np.zeros((Ut.shape[0], 2))
    _part_sq_norms(Ut, a, b, out)
    return out


def nndsvd_w(Ut: Any, mode: Any, scale: Any, eps: float, fill: float, Wt: Any,
             a: int = 0, b: int | None = None) -> None:
    """Columns a..b (default: all) of the NNDSVD start's W^T in one sweep
    (:func:`_nndsvd_w`): Ut, Wt (k, n) float32 C-contiguous; mode (k,) int64 in {0, 1, -1};
    scale (k,) float32."""
    dt = Ut.dtype.type
    _nndsvd_w(Ut, mode, scale, dt(eps), dt(fill), Wt, a, Ut.shape[1] if b is None else b)


@compiled.register_warmer
def _warm_up() -> None:
    import scipy.sparse as sp  # noqa: PLC0415

    V = sp.csr_matrix(np.eye(4, 8, dtype=np.float32))
    W = np.zeros((4, WIDE), np.float32)
    Ht = np.zeros((8, WIDE), np.float32)
    Z = np.zeros((8, WIDE), np.float32)
    w_pass(V, 0, 4, W, Ht, np.eye(1), HALS, True, Z, np.zeros((1, 1)))
    gather(V, 0, 4, Ht, W)
    gather_gram(V, 0, 4, Ht, W, np.zeros((WIDE, WIDE)))
    scatter(V, 0, 4, W, Z)
    Omega = np.zeros((8, SKETCH_BLOCK), np.float32)
    sketch(V, 0, 4, Omega, np.zeros_like(Omega))
    nndsvd_w(W.T.copy(), np.zeros(WIDE, np.int64), np.ones(WIDE, np.float32), 1e-6, 0.0,
             np.empty((WIDE, 4), np.float32))
    moments(V, 0, 4)
    dense_moments(W, 0, 4)
    part_sq_norms(W.T.copy(), 0, 4)

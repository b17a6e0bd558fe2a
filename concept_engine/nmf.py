"""Non-negative matrix factorisation V ~= W H for Deep Feature Factorization.

V (n, C) holds one row per spatial position of every image (n = N * h * w) and one column per
channel of the CNN layer; W (n, k) are the heatmaps and H (k, C) the concept bases.

Two solvers share one loop and one interface (:func:`nmf_fit`):

* ``'mu'`` - Lee & Seung multiplicative updates for the Frobenius loss, exactly as the DFF
  paper and the seed project: H <- H * (W^T V) / (W^T W H), then W <- W * (V H^T) / (W H H^T),
  with a denominator that is exactly zero replaced by 1e-7.
* ``'hals'`` - hierarchical alternating least squares (Cichocki & Phan 2009; Gillis & Glineur
  2012): each row of H, then each column of W, is set to its exact non-negative least-squares
  optimum given the others, in the fixed order 0..k-1 (deterministic, no shuffling). It costs the
  same two passes over V per iteration as MU but converges in far fewer iterations.

Both solvers need V only through the products W^T V (k, C) and V H^T (n, k), so each iteration
reads V twice and never forms V - WH. The error is
``||V - WH||^2 = ||V||^2 - 2 <W, V H^T> + <W^T W, H H^T>`` with ||V||^2 computed once; the
inner products are reduced in float64 and the result is clamped at 0 before the square root.

V may be held in float16 (half the memory) with float32 compute: the GEMMs then upcast V in row
chunks of bounded size. V may also be a SciPy CSR matrix on the host (activations after ReLU are
mostly zeros): the compiled kernels of :mod:`concept_engine.csr_kernels` then run a whole
iteration in one read of the non-zeros (the W update fused with W^T V), on row ranges in
parallel; without Numba, SciPy's products on row blocks. See benchmarks/bench_nmf.py.

The working copy of W is kept transposed, ``Wt`` (k, n), C-contiguous, so the per-component
updates of HALS touch contiguous rows, and ``H @ V.T`` maps to a single transposed GEMM.

Every function takes arrays of one namespace (NumPy or CuPy, see :mod:`concept_engine.backend`)
and returns arrays of the same namespace. Random initialisations are drawn on the host from a
seeded NumPy generator and copied to the device once, so a seed gives the same start on every
backend.
"""

from __future__ import annotations

import concurrent.futures
import functools
import math
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Literal

import numpy as np

from concept_engine import compiled, csr_kernels
from concept_engine.backend import get_namespace, hals_sweep, is_sparse, to_device

__all__ = [
    "ConvergenceWarning",
    "NMF",
    "NMFResult",
    "nmf_fit",
    "nmf_fit_many",
    "nmf_init",
    "nmf_transform",
    "prepare_v",
    "reconstruction_error",
]

Solver = Literal["mu", "hals"]
Init = Literal["nndsvd", "nndsvda", "nndsvdar", "random", "seed", "ls"]

#: The seed replaces denominators that are exactly zero by this value (MU only).
MU_ZERO_DENOMINATOR = 1e-7
#: Bytes of float32 scratch per row chunk when V is held in float16 or sparse.
CHUNK_BYTES = 64 * 2**20
#: ``prepare_v(sparse='auto')`` converts host V to CSR at or below this fraction of non-zeros.
SPARSE_MAX_DENSITY = 0.3
#: NNDSVD zeroes entries below this (as in Boutsidis & Gallopoulos and scikit-learn).
_NNDSVD_EPS = 1e-6
#: Host CSR products run as this many row blocks, one thread each. SciPy fallback: two blocks
#: per core (on the 2-core benchmark machine 4 beat 2 and 8: the smaller blocks' outputs stay in
#: cache). The compiled kernels use one range per core (capped by this). ``DFF_NMF_THREADS``
#: overrides; 1 = one range, on the calling thread.
SPARSE_THREADS = int(os.environ.get("DFF_NMF_THREADS", "0")) or min(16, 2 * (os.cpu_count() or 1))
#: A CSR V is split into row blocks only above this many non-zeros (handing a block to a
#: worker thread costs tens of microseconds).
_SPARSE_BLOCK_MIN_NNZ = 1 << 18


@functools.lru_cache(maxsize=1)
def _block_pool() -> concurrent.futures.ThreadPoolExecutor:
    """The worker threads of the host CSR row-block products (created on first use, shared by
    every fit in the process; idle threads cost nothing)."""
    return concurrent.futures.ThreadPoolExecutor(max_workers=max(1, SPARSE_THREADS - 1),
                                                 thread_name_prefix="dff-nmf")
#: Set in the threads of :func:`nmf_fit_many`: their fits are the parallel units (SciPy
#: products on one block; kernel ranges on this thread while the cores are all busy).
_LOCAL = threading.local()


class _FitCount:
    """How many fits of :func:`nmf_fit_many` run now (all batches of the process)."""

    def __init__(self) -> None:
        self.running = 0
        self._lock = threading.Lock()

    def add(self, n: int) -> None:
        with self._lock:
            self.running += n


_FITS = _FitCount()


@functools.lru_cache(maxsize=1)
def _fit_pool() -> concurrent.futures.ThreadPoolExecutor:
    """Threads that run whole fits side by side (:func:`nmf_fit_many`)."""
    return concurrent.futures.ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1),
                                                 thread_name_prefix="dff-fit")


#: Extra columns of the randomised range finder of the NNDSVD start (see _top_singular), at
#: least; the sketch is rounded up to the kernels' block of 16 columns. Fewer (k + 2) did as
#: well on the real ant activations, but on bench_nmf's synthetic V (16 latent parts of
#: similar size) the fit from them needed 50 iterations instead of 30 and ended 0.4% higher.
_SKETCH_OVERSAMPLE = 10
_SKETCH_SEED = 0

_SOLVERS = ("mu", "hals")
_NNDSVD_INITS = ("nndsvd", "nndsvda", "nndsvdar")
_INITS = (*_NNDSVD_INITS, "random", "seed", "ls")


class ConvergenceWarning(UserWarning):
    """The solver stopped at ``max_iter`` before the tolerance was met."""


@dataclass(frozen=True)
class NMFResult:
    """Outcome of one factorisation.

    Attributes:
        W: (n, k) heatmaps / coefficients, same namespace as V, float32 (float64 if V is).
        H: (k, C) bases.
        n_iter: iterations run.
        error: Frobenius norm ||V - W H|| at the returned W, H.
        converged: True if the tolerance test stopped the loop before ``max_iter``.
    """

    W: Any
    H: Any
    n_iter: int
    error: float
    converged: bool


# --------------------------------------------------------------------------------------------
# V as an operand: the few products the solvers need, for dense, float16-held and sparse V.
# --------------------------------------------------------------------------------------------


class _Operand:
    """Read-only access to V (n, C) through the products the solvers need.

    Dense V in the compute dtype is used directly by BLAS. Dense V held in a narrower dtype
    (float16) and sparse V are processed in row chunks so the float32 scratch stays bounded by
    :data:`CHUNK_BYTES` whatever n is.
    """

    def __init__(self, V: Any, xp: ModuleType) -> None:
        self.V = V
        self.xp = xp
        self.sparse = is_sparse(V)
        self.n, self.C = (int(s) for s in V.shape)
        self.dtype = xp.float64 if V.dtype == xp.float64 else xp.float32
        self.direct = not self.sparse and V.dtype == self.dtype
        self.chunk = max(1, CHUNK_BYTES // (4 * max(self.C, 1)))
        self._sq_norm: float | None = None
        self._mean: float | None = None
        self._min = math.inf
        self._dense_ok: bool | None = None  # V >= 0 and no NaN, from the dense moments
        # host CSR: the compiled kernels (csr_kernels) when Numba is there, else SciPy's
        # products on row blocks
        self.kernels = self.sparse and xp is np and csr_kernels.AVAILABLE
        self._ranges: list[tuple[int, int]] = []
        self._blocks = self._row_blocks() if self.sparse and xp is np else []

    def _row_blocks(self) -> list[tuple[int, int, Any]]:
        """(start, stop, CSR view of those rows) splitting the non-zeros evenly over threads.

        The views share V's data and indices (only the row pointers are re-based), so the
        split costs no copy of V."""
        import scipy.sparse as scipy_sparse  # noqa: PLC0415 - host-only path

        V = self.V.tocsr() if self.V.format != "csr" else self.V
        if self.kernels:
            if not V.has_canonical_format:
                V = V.copy()
                V.sum_duplicates()
            if V.dtype != self.dtype:
                V = V.astype(self.dtype)
        self.V = V
        parts = SPARSE_THREADS if V.nnz >= _SPARSE_BLOCK_MIN_NNZ else 1
        if getattr(_LOCAL, "serial", False) and not self.kernels:
            parts = 1
        if self.kernels:
            # a worker per core is enough here: the kernels keep their partial sums in cache
            parts = min(parts, os.cpu_count() or 1) if parts > 1 else 1
        # integer targets (the first row pointer >= x is the first >= ceil(x)): with float
        # targets NumPy converted all of indptr to float64 first (1.6 ms at 5000 images)
        targets = np.ceil(np.linspace(0, V.nnz, parts + 1)[1:-1]).astype(V.indptr.dtype)
        cuts = np.searchsorted(V.indptr, targets)
        bounds = [0, *sorted(set(int(c) for c in cuts) - {0, self.n}), self.n]
        self._ranges = list(zip(bounds[:-1], bounds[1:], strict=True))
        if parts <= 1 or self.kernels:
            return []
        blocks = []
        for a, b in zip(bounds[:-1], bounds[1:], strict=True):
            lo, hi = int(V.indptr[a]), int(V.indptr[b])
            blocks.append((a, b, scipy_sparse.csr_matrix(
                (V.data[lo:hi], V.indices[lo:hi], V.indptr[a:b + 1] - lo),
                shape=(b - a, self.C))))
        return blocks

    def _parallel(self, fn) -> list[Any]:
        """fn(start, stop, block) on every row block, the first on this thread and the others
        on the process's worker threads (started once: a thread started per product cost more
        than the product itself on small V); results in order."""
        return compiled.run_parts(fn, self._blocks, _block_pool())

    def run_ranges(self, fn) -> list[Any]:
        """fn(start, stop) on every row range of the compiled kernels, in parallel (the first
        on this thread); results in order.

        In a thread of :func:`nmf_fit_many`, while as many fits run as there are ranges (one
        range per core), the ranges run one after another on this thread instead; when fewer
        fits are left (the last fits of a batch), in parallel again. Same ranges, same order
        of the partial sums either way: the result does not depend on which."""
        if getattr(_LOCAL, "serial", False) and _FITS.running >= len(self._ranges):
            return [fn(a, b) for a, b in self._ranges]
        return compiled.run_parts(fn, self._ranges, _block_pool())

    def _k_gather(self, X: Any) -> Any:
        """V X (n, m) by the compiled kernel; X (C, m)."""
        m = X.shape[1]
        Xp = csr_kernels._padded(np.asarray(X, dtype=self.dtype))
        out = np.empty((self.n, Xp.shape[1]), dtype=self.dtype)
        self.run_ranges(lambda a, b: csr_kernels.gather(self.V, a, b, Xp, out))
        return out if out.shape[1] == m else np.ascontiguousarray(out[:, :m])

    def _k_scatter(self, Y: Any) -> Any:
        """V^T Y (C, m) by the compiled kernel; Y (n, m). Blocks add in a fixed order."""
        m = Y.shape[1]
        Yp = csr_kernels._padded(np.asarray(Y, dtype=self.dtype))

        def part(a: int, b: int) -> Any:
            out = np.zeros((self.C, Yp.shape[1]), dtype=self.dtype)
            csr_kernels.scatter(self.V, a, b, Yp, out)
            return out

        parts = self.run_ranges(part)
        total = sum(parts[1:], parts[0])
        return total if total.shape[1] == m else np.ascontiguousarray(total[:, :m])

    def _chunks(self):
        """(start, stop, block) with block = V[start:stop] in the compute dtype.

        The float32 blocks of float16/sparse V are written into one reused buffer: allocating a
        fresh 64 MiB array per chunk costs page faults comparable to the cast itself.
        """
        buf = None
        for start in range(0, self.n, self.chunk):
            stop = min(self.n, start + self.chunk)
            block = self.V[start:stop]
            if self.direct:
                yield start, stop, block
                continue
            if buf is None:
                buf = self.xp.empty((min(self.chunk, self.n), self.C), dtype=self.dtype)
            out = buf[: stop - start]
            if self.sparse and self.xp is np:
                out.fill(0)  # SciPy's toarray(out=) adds into the buffer
                block.toarray(out=out)
            elif self.sparse:
                out[...] = block.toarray()
            else:
                out[...] = block
            yield start, stop, out

    def wt_v(self, Wt: Any) -> Any:
        """W^T V: Wt (k, n) -> (k, C).

        Computed as (V^T W)^T: OpenBLAS runs this transposed form about twice as fast as
        ``Wt @ V`` for k << C (measured in benchmarks/bench_nmf.py's machine class).
        """
        xp = self.xp
        if self.direct:
            return xp.ascontiguousarray((self.V.T @ Wt.T).T)
        if self.kernels:
            return np.ascontiguousarray(self._k_scatter(Wt.T).T)
        if self._blocks:
            # each row block adds its V_b^T W_b (C, k); the blocks run on separate threads
            W = xp.ascontiguousarray(Wt.T)
            parts = self._parallel(lambda a, b, blk: blk.T @ W[a:b])
            return xp.ascontiguousarray(sum(parts[1:], parts[0]).T, dtype=self.dtype)
        if self.sparse:
            # csr.T is csc; csc @ dense is one sweep over the non-zeros.
            return xp.ascontiguousarray((self.V.T @ Wt.T).T, dtype=self.dtype)
        out = xp.zeros((self.C, Wt.shape[0]), dtype=self.dtype)
        for start, stop, block in self._chunks():
            out += block.T @ Wt[:, start:stop].T
        return xp.ascontiguousarray(out.T)

    def h_vt(self, H: Any) -> Any:
        """(V H^T)^T = H V^T: (k, C) -> (k, n)."""
        if self.direct:
            return H @ self.V.T
        if self.kernels:
            return np.ascontiguousarray(self._k_gather(H.T).T)
        if self._blocks:
            out = np.empty((H.shape[0], self.n), dtype=self.dtype)
            Ht = np.ascontiguousarray(H.T)

            def rows(a: int, b: int, blk: Any) -> None:
                out[:, a:b] = (blk @ Ht).T

            self._parallel(rows)
            return out
        if self.sparse:
            return self.xp.ascontiguousarray((self.V @ H.T).T, dtype=self.dtype)
        out = self.xp.empty((H.shape[0], self.n), dtype=self.dtype)
        for start, stop, block in self._chunks():
            out[:, start:stop] = H @ block.T
        return out

    def v_x(self, X: Any) -> Any:
        """V X: (C, m) -> (n, m), C-contiguous (row blocks write their own rows: no
        transposed copies of the n x m result)."""
        X = self.xp.ascontiguousarray(X, dtype=self.dtype)
        if self.kernels:
            return self._k_gather(X)
        if self._blocks:
            out = np.empty((self.n, X.shape[1]), dtype=self.dtype)

            def rows(a: int, b: int, blk: Any) -> None:
                out[a:b] = blk @ X

            self._parallel(rows)
            return out
        if self.direct or self.sparse:
            return self.xp.ascontiguousarray(self.V @ X, dtype=self.dtype)
        return self.xp.ascontiguousarray(self.h_vt(self.xp.ascontiguousarray(X.T)).T)

    def vt_y(self, Y: Any) -> Any:
        """V^T Y: (n, m) -> (C, m)."""
        Y = self.xp.ascontiguousarray(Y, dtype=self.dtype)
        if self.kernels:
            return self._k_scatter(Y)
        if self._blocks:
            parts = self._parallel(lambda a, b, blk: blk.T @ Y[a:b])
            return sum(parts[1:], parts[0])
        if self.direct or self.sparse:
            return self.xp.asarray(self.V.T @ Y, dtype=self.dtype)
        return self.wt_v(self.xp.ascontiguousarray(Y.T)).T

    def _dense_kernel(self) -> bool:
        """Dense host V that the compiled moments can read in place."""
        return (not self.sparse and self.xp is np and csr_kernels.AVAILABLE and self.direct
                and self.V.flags.c_contiguous)

    def _moments(self) -> None:
        xp = self.xp
        if self.kernels:
            self._set_moments(self.run_ranges(lambda a, b: csr_kernels.moments(self.V, a, b)))
            return
        if self._dense_kernel():
            # one vectorised read on every core: float64 sums of float32 values, as below
            # (1.0 s -> ~0.1 s for a 980000 x 512 V), with the sign check along
            parts = compiled.split_run(
                lambda a, b: csr_kernels.dense_moments(self.V, a, b), self.n, 4096)
            total = math.fsum(p[0] for p in parts)
            self._mean = total / max(self.n * self.C, 1)
            self._sq_norm = math.fsum(p[1] for p in parts)
            self._dense_ok = sum(p[2] for p in parts) == 0 and not math.isnan(total)
            return
        if self.sparse:
            data = self.V.data
            total = float(xp.sum(data, dtype=xp.float64))
            sq = float(xp.sum(xp.square(data, dtype=xp.float64)))
        else:
            total = sq = 0.0
            # float64 per chunk: ||V||^2 of ~1e9 float32 terms must not lose digits, and the
            # cast must not allocate an (n, C) float64 copy.
            for start in range(0, self.n, self.chunk):
                block = self.V[start : start + self.chunk]
                total += float(xp.sum(block, dtype=xp.float64))
                sq += float(xp.sum(xp.square(block, dtype=xp.float64)))
        self._mean = total / max(self.n * self.C, 1)
        self._sq_norm = sq

    def _set_moments(self, parts: Sequence[tuple[float, float, float]]) -> None:
        """Moments from the kernels' (sum, sum of squares, min) of the row ranges, in order."""
        self._mean = math.fsum(p[0] for p in parts) / max(self.n * self.C, 1)
        self._sq_norm = math.fsum(p[1] for p in parts)
        lows = [p[2] for p in parts]
        self._min = math.nan if any(math.isnan(v) for v in lows) else min(lows)

    @property
    def sq_norm(self) -> float:
        """||V||_F^2 as a Python float (computed once, in float64)."""
        if self._sq_norm is None:
            self._moments()
        return self._sq_norm  # type: ignore[return-value]

    @property
    def mean(self) -> float:
        """mean(V) as a Python float (computed once, in float64)."""
        if self._mean is None:
            self._moments()
        return self._mean  # type: ignore[return-value]

    def non_negative(self) -> bool:
        """No negative value and no NaN in V (the solvers' input check)."""
        if self._dense_kernel():
            if self._dense_ok is None:
                self._moments()  # the check comes with the moments (one read of V)
            return bool(self._dense_ok)
        return self.min() >= 0

    def min(self) -> float:
        xp = self.xp
        if self.sparse:
            if self.V.nnz == 0:
                return 0.0
            if self.kernels:
                if self._mean is None:
                    self._moments()  # the minimum comes with the moments (one read of values)
                m = self._min
            else:
                m = float(xp.min(self.V.data))
            return min(m, 0.0) if self.V.nnz < self.n * self.C else m
        return float(xp.min(self.V))


# --------------------------------------------------------------------------------------------
# Error and updates (all in the transposed layout Wt (k, n)).
# --------------------------------------------------------------------------------------------


def _error_from_products(sq_norm: float, Wt: Any, HVt: Any, HHt: Any) -> float:
    """||V - WH|| from ||V||^2, Wt (k, n), HVt = H V^T (k, n) and HHt = H H^T (k, k)."""
    xp = get_namespace(Wt, HVt, HHt)
    cross = float(xp.sum(Wt * HVt, dtype=xp.float64))
    WtW = (Wt @ Wt.T).astype(xp.float64)
    quad = float(xp.sum(WtW * HHt.astype(xp.float64)))
    # Cancellation can leave a tiny negative number when the fit is (almost) exact.
    return math.sqrt(max(sq_norm - 2.0 * cross + quad, 0.0))


def reconstruction_error(V: Any, W: Any, H: Any) -> float:
    """Frobenius norm ||V - W H|| without forming V - W H.

    Args:
        V: (n, C) non-negative data (dense, float16/32/64, or SciPy sparse).
        W: (n, k) coefficients.
        H: (k, C) bases.
    """
    xp = get_namespace(V, W, H)
    op = _Operand(V, xp)
    H = xp.asarray(H, dtype=op.dtype)
    Wt = xp.ascontiguousarray(xp.asarray(W, dtype=op.dtype).T)
    return _error_from_products(op.sq_norm, Wt, op.h_vt(H), H @ H.T)


def _mu_ratio(num: Any, den: Any, xp: ModuleType) -> Any:
    # The seed (and the DFF paper's code) guards only exact zeros, not small values. In float32
    # a denominator can be a subnormal where the numerator is not (a channel whose bases all
    # shrank to ~1e-40 from a random start): the ratio overflows to inf, and inf * 0 then makes
    # the factors NaN. Capped at the largest finite value the update stays finite (the capped
    # entry times its tiny factor) and is the seed's wherever it did not overflow.
    den[den == 0] = MU_ZERO_DENOMINATOR
    with np.errstate(over="ignore"):  # the overflow is handled here (CuPy does not warn)
        ratio = num / den
    return xp.minimum(ratio, xp.finfo(ratio.dtype).max, out=ratio)


def _mu_update_H(H: Any, WtV: Any, WtW: Any, xp: ModuleType) -> Any:
    return H * _mu_ratio(WtV, WtW @ H, xp)


def _mu_update_Wt(Wt: Any, HVt: Any, HHt: Any, xp: ModuleType) -> Any:
    # (W H H^T)^T = (H H^T) W^T because H H^T is symmetric.
    return Wt * _mu_ratio(HVt, HHt @ Wt, xp)


def _hals_update_rows(X: Any, AtB: Any, AtA: Any, xp: ModuleType) -> Any:
    """One HALS sweep over the rows of X (k, m) for min ||B - A X|| with X >= 0.

    AtB = A^T B (k, m) and AtA = A^T A (k, k) are fixed during the sweep; row j is set to its
    exact non-negative optimum given the current other rows (Gauss-Seidel, order 0..k-1).
    On a GPU the whole sweep is one kernel launch (:func:`backend.hals_sweep`, same arithmetic
    per column); this row-by-row form is the host's and the fallback.
    """
    if xp is not np:
        swept = hals_sweep(X, AtB, AtA)
        if swept is not None:
            return swept
    diag = [float(d) for d in xp.diag(AtA)]  # k scalars to the host, once per sweep
    for j, d in enumerate(diag):
        if d <= 0.0:
            # Component j is identically zero on the other side: nothing to solve for.
            continue
        row = X[j] + (AtB[j] - AtA[j] @ X) / d
        X[j] = xp.maximum(row, 0)
    return X


def _solve(
    op: _Operand,
    Wt: Any,
    H: Any,
    *,
    solver: str,
    update_H: bool,
    max_iter: int,
    tol: float,
    check_every: int,
) -> NMFResult:
    """The shared loop. Wt (k, n) and H (k, C) are updated in place or replaced."""
    if op.kernels and update_H:
        return _solve_fused(op, Wt, H, solver=solver, max_iter=max_iter, tol=tol,
                            check_every=check_every)
    xp = op.xp
    HHt = H @ H.T
    HVt = op.h_vt(H)
    err_init = _error_from_products(op.sq_norm, Wt, HVt, HHt)
    prev_err = err_init
    converged = False
    n_iter = 0
    for n_iter in range(1, max_iter + 1):  # noqa: B007 - n_iter is read after the loop
        if solver == "mu":
            # The seed's order: H, then W.
            if update_H:
                H = _mu_update_H(H, op.wt_v(Wt), Wt @ Wt.T, xp)
                HHt = H @ H.T
                HVt = op.h_vt(H)
            Wt = _mu_update_Wt(Wt, HVt, HHt, xp)
        else:
            # HALS: W, then H (as scikit-learn's cd). From an NNDSVD start, W-first leaves the
            # plateau that H-first crosses slowly: on real conv5_4 features of 243 photos at
            # k=4 it reached the optimum in ~25 iterations instead of ~150. Same passes over V.
            Wt = _hals_update_rows(Wt, HVt, HHt, xp)
            if update_H:
                H = _hals_update_rows(H, op.wt_v(Wt), Wt @ Wt.T, xp)
                HHt = H @ H.T
                HVt = op.h_vt(H)
        # As in the seed and scikit-learn: every `check_every` iterations, stop when the error
        # fell by less than tol (relative to the initial error) since the last check. The error
        # costs no pass over V: HVt already holds V H^T for the current H.
        if tol > 0 and n_iter % check_every == 0:
            err = _error_from_products(op.sq_norm, Wt, HVt, HHt)
            if err_init == 0.0 or (prev_err - err) / err_init < tol:
                converged = True
                break
            prev_err = err
    error = _error_from_products(op.sq_norm, Wt, HVt, HHt)
    W = xp.ascontiguousarray(Wt.T)
    return NMFResult(W=W, H=H, n_iter=n_iter, error=error, converged=converged)


def _solve_fused(
    op: _Operand, Wt: Any, H: Any, *, solver: str, max_iter: int, tol: float, check_every: int
) -> NMFResult:
    """:func:`_solve` on a host CSR V with the compiled kernels: one read of V per iteration.

    The W half-iteration and the W^T V, W^T W that the H half needs are one pass
    (:func:`csr_kernels.w_pass`). The pass also returns <W, V H^T> for the incoming and the
    outgoing W, which is all the error needs: MU (H, then W) gets the error of the state it
    just reached; HALS (W, then H) gets, during iteration n, the error of the state after
    iteration n - 1, so W is copied before a pass that will test convergence and restored
    when the test stops the loop. The iterates, the stopping iteration and the error are
    those of :func:`_solve` (up to float rounding).
    """
    k, C, dt = int(H.shape[0]), op.C, op.dtype
    kw = -(-k // csr_kernels.WIDE) * csr_kernels.WIDE
    W = np.zeros((op.n, kw), dtype=dt)
    W[:, :k] = Wt.T
    Ht = np.zeros((C, kw), dtype=dt)
    rule = csr_kernels.HALS if solver == "hals" else csr_kernels.MU

    def set_h(H: Any) -> Any:
        Ht[:, :k] = H.T
        return (H @ H.T).astype(np.float64)

    def sweep(rule: int) -> tuple[float, float, Any, Any]:
        def block(a: int, b: int) -> tuple[tuple[float, float], Any, Any]:
            wtv = np.zeros((C, kw), dtype=dt)
            wtw = np.zeros((k, k), dtype=np.float64)
            cross = csr_kernels.w_pass(op.V, a, b, W, Ht, HHt, rule, True, wtv, wtw)
            return cross, wtv, wtw

        parts = op.run_ranges(block)
        old = sum(p[0][0] for p in parts)
        new = sum(p[0][1] for p in parts)
        WtV = parts[0][1]
        WtW = parts[0][2]
        for p in parts[1:]:
            WtV += p[1]
            WtW += p[2]
        return old, new, np.ascontiguousarray(WtV[:, :k].T), WtW

    def error(cross: float, WtW: Any, HHt: Any) -> float:
        return math.sqrt(max(op.sq_norm - 2.0 * cross + float(np.sum(WtW * HHt)), 0.0))

    HHt = set_h(H)
    converged = False
    n_iter = 0
    if solver == "mu":
        _, cross, WtV, WtW = sweep(csr_kernels.NONE)
        err_init = prev_err = err = error(cross, WtW, HHt)
        for n_iter in range(1, max_iter + 1):  # noqa: B007 - n_iter is read after the loop
            H = _mu_update_H(H, WtV, WtW.astype(dt), np)
            HHt = set_h(H)
            _, cross, WtV, WtW = sweep(rule)
            err = error(cross, WtW, HHt)
            if tol > 0 and n_iter % check_every == 0:
                if err_init == 0.0 or (prev_err - err) / err_init < tol:
                    converged = True
                    break
                prev_err = err
    else:
        WtW = (Wt @ Wt.T).astype(np.float64)
        err_init = prev_err = err = 0.0
        for n in range(1, max_iter + 2):
            # the state after iteration n - 1 is tested during iteration n
            test = tol > 0 and n - 1 >= 1 and (n - 1) % check_every == 0
            last = n == max_iter + 1
            saved = W.copy() if test and not last else None
            cross, _, WtV, WtW_new = sweep(csr_kernels.NONE if last else rule)
            err = error(cross, WtW, HHt)
            if n == 1:
                err_init = prev_err = err
            if test and (err_init == 0.0 or (prev_err - err) / err_init < tol):
                converged = True
                if saved is not None:
                    W = saved
                n_iter = n - 1
                break
            if test:
                prev_err = err
            if last:
                n_iter = max_iter
                break
            WtW = WtW_new
            H = _hals_update_rows(H, WtV, WtW.astype(dt), np)
            HHt = set_h(H)
    return NMFResult(W=np.ascontiguousarray(W[:, :k]), H=H, n_iter=n_iter, error=err,
                     converged=converged)


# --------------------------------------------------------------------------------------------
# Initialisation.
# --------------------------------------------------------------------------------------------


def _random_init(op: _Operand, k: int, seed: int, init: str) -> tuple[Any, Any]:
    """Wt (k, n) and H (k, C) = |N(0, 1)| * sqrt(mean(V) / k), drawn on the host.

    ``'random'`` follows scikit-learn's ``init='random'`` stream (``RandomState(seed)``, H drawn
    before W), so it starts where ``sklearn.decomposition.NMF(init='random')`` starts.
    ``'seed'`` is the research prototype's initialisation: the same formula, W drawn before H,
    from ``numpy.random.default_rng(seed)``. (The prototype drew from torch's generator; torch is
    not a dependency of the engine, so only the distribution and the scaling are reproduced.)
    """
    xp = op.xp
    dt = np.float64 if op.dtype == xp.float64 else np.float32
    avg = math.sqrt(op.mean / k)
    if init == "random":
        rng = np.random.RandomState(seed)
        H = np.multiply(rng.standard_normal(size=(k, op.C)).astype(dt), avg)
        W = np.multiply(rng.standard_normal(size=(op.n, k)).astype(dt), avg)
    else:
        gen = np.random.default_rng(seed)
        W = avg * np.abs(gen.standard_normal(size=(op.n, k)))
        H = avg * np.abs(gen.standard_normal(size=(k, op.C)))
    Wt = np.ascontiguousarray(np.abs(W).T, dtype=dt)
    H = np.abs(H).astype(dt)
    return to_device(Wt, xp), to_device(H, xp)


def _sketch_width(k: int, C: int) -> int:
    """Columns of the range finder's sketch: k + oversampling, rounded up to the kernels'
    block of 16 (the extra columns are computed anyway, so they are random, not zero)."""
    block = csr_kernels.SKETCH_BLOCK
    return min(C, -(-(k + _SKETCH_OVERSAMPLE) // block) * block)


def _top_singular(op: _Operand, k: int) -> tuple[list[float], Any, Any]:
    """The k leading singular triplets of V: (s (k floats), V_k (k, C), U_k^T (k, n)).

    A randomised range finder with one power step (Halko, Martinsson & Tropp 2011), from a
    fixed sketch (seed 0) of m >= k + 10 columns (:func:`_sketch_width`): Z = V^T V Omega spans
    the dominant right subspace, Q = orth(Z), then the exact SVD of V Q (Rayleigh-Ritz). On a
    host CSR V that is two reads of the non-zeros (Z in one fused sweep that also takes V's
    moments, then V Q), instead of forming the Gram matrix V^T V (C x C: n C^2 flops, ~4.5 s
    at 5000 images). The sketch is fixed, so the start does not depend on the fit's seed.
    s and V_k are float64, U_k^T (k, n) is in the compute dtype.
    """
    xp = op.xp
    m = _sketch_width(k, op.C)
    omega = to_device(np.random.default_rng(_SKETCH_SEED).standard_normal((op.C, m)), xp)
    if op.kernels:
        # two reads of V: V^T V Omega in one (with the moments), then V Q; m is padded with
        # zero columns to the kernels' block only when C < m
        block = csr_kernels.SKETCH_BLOCK
        mw = -(-m // block) * block
        Omega = np.zeros((op.C, mw), dtype=op.dtype)
        Omega[:, :m] = omega

        def sketch(a: int, b: int) -> Any:
            Zb = np.zeros((op.C, mw), dtype=op.dtype)
            return Zb, csr_kernels.sketch(op.V, a, b, Omega, Zb)

        parts = op.run_ranges(sketch)
        Z = sum((p[0] for p in parts[1:]), parts[0][0])[:, :m].astype(np.float64)
        if op._mean is None:
            op._set_moments([p[1] for p in parts])
        _check_non_negative(op)  # nmf_fit leaves the check of an NNDSVD fit on CSR to here
        Q, _ = np.linalg.qr(Z)
        Qc = csr_kernels._padded(np.asarray(Q, dtype=op.dtype))
        Bw = np.empty((op.n, Qc.shape[1]), dtype=op.dtype)

        def gather_gram(a: int, b: int) -> Any:
            Gb = np.zeros((Qc.shape[1], Qc.shape[1]))
            csr_kernels.gather_gram(op.V, a, b, Qc, Bw, Gb)
            return Gb

        # B = V Q and B^T B in one sweep (B^T B in NumPy took 9 ms at N=5000: its small BLAS
        # calls, one per 1024 rows, ran one thread at a time)
        parts = op.run_ranges(gather_gram)
        G = sum(parts[1:], parts[0])[:m, :m]
        B = Bw[:, :m]
    else:
        Z = op.vt_y(op.v_x(omega.astype(op.dtype))).astype(xp.float64)  # (C, m)
        Q, _ = xp.linalg.qr(Z)
        B = op.v_x(Q.astype(op.dtype))  # (n, m) = V Q, compute dtype (n x m is V-sized)
        G = (B.T @ B).astype(xp.float64)
    evals, evecs = xp.linalg.eigh(G)  # B^T B = Q^T V^T V Q
    order = xp.arange(m - 1, m - 1 - k, -1)
    S = xp.sqrt(xp.maximum(evals[order], 0.0))
    E = evecs[:, order]  # (m, k)
    Vk = xp.ascontiguousarray((Q @ E).T)  # (k, C) float64
    S_host = [float(v) for v in S]
    # the sign of a singular pair is arbitrary: fix it (largest |entry| of v_j positive) so that
    # every backend and layout picks the same one; U^T = diag(sign / s) E^T B^T in one product
    signs = []
    for j in range(k):
        idx = int(xp.argmax(xp.abs(Vk[j])))
        signs.append(-1.0 if float(Vk[j, idx]) < 0 else 1.0)
        Vk[j] *= signs[j]
    coef = [sg / v if v > 0 else 0.0 for sg, v in zip(signs, S_host, strict=True)]
    Et = xp.ascontiguousarray((E * to_device(np.array(coef), xp)[None, :]).T.astype(op.dtype))
    if op.kernels:
        Ut = np.empty((k, op.n), dtype=op.dtype)
        # on the engine's threads, in BLAS calls small enough to stay on the calling thread:
        # after a threaded call OpenBLAS's idle workers spin for a while and took the cores
        # from the next kernel sweep (the sketch ran 60-80 ms instead of 40 at N=5000)
        step = _small_blas_rows(k, m)

        def project(a: int, b: int) -> None:
            for s in range(a, b, step):
                e = min(s + step, b)
                np.matmul(Et, B[s:e].T, out=Ut[:, s:e])

        op.run_ranges(project)
    else:
        Ut = Et @ B.T  # (k, n), C-contiguous
    return S_host, Vk, Ut


def _small_blas_rows(*widths: int) -> int:
    """Rows per BLAS call small enough that OpenBLAS runs the call on the calling thread (it
    threads a GEMM only above 4 * 65536 multiply-adds)."""
    return max(64, (1 << 18) // max(1, math.prod(widths)))


def _nndsvd_init(op: _Operand, k: int, seed: int, variant: str) -> tuple[Any, Any]:
    """NNDSVD (Boutsidis & Gallopoulos 2008) from a truncated SVD (:func:`_top_singular`).

    The SVD's sketch is fixed, not drawn from ``seed``, so ``'nndsvd'`` and ``'nndsvda'`` do
    not depend on the seed.
    ``'nndsvda'`` fills the zeros with mean(V) (what MU needs, as zeros never move under it);
    ``'nndsvdar'`` with |N(0, 1)| * mean(V) / 100 drawn from ``RandomState(seed)``.
    """
    xp = op.xp
    if k > op.C:
        raise ValueError(f"NNDSVD needs k <= C ({k} > {op.C}); use init='random'")
    S_host, Vk, Ut = _top_singular(op, k)
    # W^T (k, n) is built in the compute dtype (it is as large as k columns of V), on whole
    # (k, n) arrays: the positive parts, then the norms of every row's positive and negative
    # parts at once (||x_n||^2 = ||x||^2 - ||x_p||^2, sums in float64); H (k, C) is float64.
    compiled_w = xp is np and csr_kernels.AVAILABLE and Ut.dtype == np.float32
    if compiled_w:
        # one read of U^T on the engine's threads (a positive-part copy and two einsum
        # passes took ~6 ms at N=5000)
        def norms_of(a: int, b: int) -> Any:
            return csr_kernels.part_sq_norms(Ut, a, b)

        parts = op.run_ranges(norms_of) if op._ranges else [norms_of(0, op.n)]
        norms = sum(parts[1:], parts[0])
        pos2, all2 = [float(v) for v in norms[:, 0]], [float(v) for v in norms[:, 1]]
        Wt = np.empty_like(Ut)
    else:
        Wt = xp.maximum(Ut, 0)
        pos2 = _row_sq_norms(Wt, xp)
        all2 = _row_sq_norms(Ut, xp)
    H = xp.zeros((k, op.C), dtype=xp.float64)
    H[0] = math.sqrt(S_host[0]) * xp.abs(Vk[0])
    # per row of W^T: which part of u_j (0: |u_0|, 1: positive, -1: negative) and its scale
    modes, scales = [0], [math.sqrt(S_host[0])]
    for j in range(1, k):
        y = Vk[j]
        y_p, y_n = xp.maximum(y, 0), xp.abs(xp.minimum(y, 0))
        xpn = math.sqrt(pos2[j])
        xnn = math.sqrt(max(all2[j] - pos2[j], 0.0))
        ypn, ynn = float(xp.linalg.norm(y_p)), float(xp.linalg.norm(y_n))
        m_p, m_n = xpn * ypn, xnn * ynn
        # Of the two non-negative rank-one parts of u v^T keep the dominant one.
        if m_p > m_n:
            modes.append(1)
            scales.append(math.sqrt(S_host[j] * m_p) / xpn if m_p > 0 else 0.0)
            H[j] = (math.sqrt(S_host[j] * m_p) / ypn) * y_p if m_p > 0 else 0.0
        else:
            modes.append(-1)
            scales.append(math.sqrt(S_host[j] * m_n) / xnn if m_n > 0 else 0.0)
            H[j] = (math.sqrt(S_host[j] * m_n) / ynn) * y_n if m_n > 0 else 0.0
    # entries below eps: mean(V) for 'nndsvda' (what MU needs, as zeros never move under it),
    # zero otherwise
    fill = op.mean if variant == "nndsvda" else 0.0
    if compiled_w:
        # one compiled sweep instead of ~3 NumPy passes per row (the masked fill alone took
        # ~20 ms at N=5000)
        mode_a = np.array(modes, dtype=np.int64)
        scale_a = np.array(scales, dtype=np.float32)

        def fill_w(a: int, b: int) -> None:
            csr_kernels.nndsvd_w(Ut, mode_a, scale_a, _NNDSVD_EPS, fill, Wt, a, b)

        if op._ranges:
            op.run_ranges(fill_w)
        else:
            fill_w(0, op.n)
    else:
        for j in range(k):
            if modes[j] == 0:
                xp.abs(Ut[j], out=Wt[j])
            elif modes[j] < 0:
                xp.negative(xp.minimum(Ut[j], 0, out=Wt[j]), out=Wt[j])
            Wt[j] *= scales[j]
        xp.putmask(Wt, Wt < _NNDSVD_EPS, fill)
    xp.putmask(H, H < _NNDSVD_EPS, fill)
    if variant == "nndsvdar":
        avg = op.mean
        rng = np.random.RandomState(seed)
        for X in (Wt, H):
            zeros = X == 0
            count = int(xp.sum(zeros))
            small = np.abs(avg * rng.standard_normal(size=count) / 100)
            X[zeros] = to_device(small, xp)
    return Wt, H.astype(op.dtype)


def _row_sq_norms(X: Any, xp: ModuleType) -> list[float]:
    """||x_j||^2 of every row of X (k, n), as Python floats (float64 sums over chunks of
    float32 products)."""
    out = xp.zeros(X.shape[0], dtype=xp.float64)
    step = 1 << 16
    for start in range(0, X.shape[1], step):
        block = X[:, start : start + step]
        out += xp.einsum("ij,ij->i", block, block)
    return [float(v) for v in out.tolist()]


def _ls_init_Wt(op: _Operand, H: Any, solver: str) -> Any:
    """Wt (k, n) for a fixed H: the unconstrained least-squares solution, clipped at zero.

    A good deterministic start for inference. MU cannot move an entry away from zero, so for MU
    the clipped entries restart from a small positive value instead.
    """
    xp = op.xp
    HHt = (H @ H.T).astype(xp.float64)
    HVt = op.h_vt(H).astype(xp.float64)
    # A tiny ridge keeps the solve defined when two bases coincide or one is zero.
    ridge = 1e-10 * float(xp.trace(HHt)) + 1e-30
    Wt = xp.linalg.solve(HHt + ridge * xp.eye(HHt.shape[0]), HVt)
    Wt = xp.maximum(Wt, 0)
    if solver == "mu":
        positive = Wt[Wt > 0]
        fill = 1e-3 * float(xp.mean(positive)) if positive.size else 1e-3
        Wt[Wt == 0] = fill
    return xp.ascontiguousarray(Wt.astype(op.dtype))


def nmf_init(V: Any, k: int, *, init: str = "nndsvda", seed: int = 0) -> tuple[Any, Any]:
    """Initial factors for V (n, C): W (n, k) and H (k, C), in V's namespace, compute dtype.

    Args:
        V: (n, C) non-negative data (NumPy/CuPy, float16/32/64, or SciPy CSR).
        k: number of components.
        init: 'nndsvd' | 'nndsvda' | 'nndsvdar' | 'random' | 'seed' (see :func:`nmf_fit`).
        seed: seed of every random choice.
    """
    xp = get_namespace(V)
    op = _Operand(V, xp)
    Wt, H = _initialise(op, k, init, seed)
    return xp.ascontiguousarray(Wt.T), H


def _check_non_negative(op: _Operand) -> None:
    if not op.non_negative():  # also catches NaN
        raise ValueError("V must be non-negative and finite")


def _initialise(op: _Operand, k: int, init: str, seed: int) -> tuple[Any, Any]:
    if init in ("random", "seed"):
        return _random_init(op, k, seed, init)
    if init in _NNDSVD_INITS:
        return _nndsvd_init(op, k, seed, init)
    raise ValueError(f"init {init!r} needs a fixed H (use it through nmf_transform)")


# --------------------------------------------------------------------------------------------
# Public solvers.
# --------------------------------------------------------------------------------------------


def _check_params(solver: str, init: str, max_iter: int, tol: float, check_every: int) -> None:
    if solver not in _SOLVERS:
        raise ValueError(f"solver must be one of {_SOLVERS}, got {solver!r}")
    if init not in _INITS:
        raise ValueError(f"init must be one of {_INITS}, got {init!r}")
    for name, value in (("max_iter", max_iter), ("check_every", check_every)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if not tol >= 0:  # NaN too
        raise ValueError(f"tol must be >= 0, got {tol}")


def nmf_fit(
    V: Any,
    k: int,
    *,
    solver: Solver = "hals",
    init: Init = "nndsvda",
    max_iter: int = 200,
    tol: float = 1e-4,
    seed: int = 0,
    W: Any = None,
    H: Any = None,
    update_H: bool = True,
    check_every: int = 10,
) -> NMFResult:
    """Factorise V (n, C) >= 0 into W (n, k) H (k, C) minimising ||V - W H||_F.

    Args:
        V: (n, C) non-negative array, NumPy or CuPy; float32 (compute in float32), float64
            (compute in float64) or float16 (held in half precision, computed in float32 in row
            chunks); or a SciPy CSR matrix on the host.
        k: number of components (concepts).
        solver: 'hals' (default, fast convergence) or 'mu' (Lee-Seung, as the seed).
        init: start when W/H are not given. 'nndsvda' (default; deterministic NNDSVD with zeros
            filled by mean(V)), 'nndsvd' (zeros kept; poor with MU), 'nndsvdar' (zeros filled
            with small seeded noise), 'random' (scikit-learn's random init stream), 'seed' (the
            prototype's |N(0,1)| * sqrt(mean(V)/k), W then H, from default_rng(seed)). With
            ``update_H=False`` and no W, 'random'/'seed' draw W and the others start W from the
            clipped least-squares solution ('ls').
        max_iter: iteration budget (one iteration = one H update and one W update).
        tol: stop when, over the last ``check_every`` iterations, the error fell by less than
            ``tol`` times the initial error (the seed's / scikit-learn's MU test). 0 disables it.
        seed: seed of every random choice.
        W: (n, k) initial W (used as given; copied). Requires H when ``update_H`` is True.
        H: (k, C) initial H, or the fixed bases when ``update_H`` is False.
        update_H: False to keep H fixed and solve for W only (inference on new images).
        check_every: iterations between convergence tests (10 as in the seed).

    Returns:
        NMFResult with W (n, k), H (k, C), n_iter, error = ||V - WH||_F, converged.
    """
    _check_params(solver, init, max_iter, tol, check_every)
    xp = get_namespace(V, W, H)
    if V.ndim != 2:
        raise ValueError(f"V must be 2-D (n, C), got shape {V.shape}")
    op = _Operand(V, xp)
    if not (op.kernels and W is None and H is None and init in _NNDSVD_INITS):
        _check_non_negative(op)  # else the start's first read of V takes the moments and checks
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if not update_H and H is None:
        raise ValueError("update_H=False needs the fixed bases H")
    if H is not None:
        H = xp.array(H, dtype=op.dtype)  # a copy: the loop writes into it
        if H.shape != (k, op.C):
            raise ValueError(f"H must have shape {(k, op.C)}, got {H.shape}")
    if W is not None:
        W = xp.asarray(W, dtype=op.dtype)
        if W.shape != (op.n, k):
            raise ValueError(f"W must have shape {(op.n, k)}, got {W.shape}")
        Wt = xp.ascontiguousarray(W.T).copy()
        if H is None:
            raise ValueError("a given W needs a given H too")
    elif H is not None:
        if init in ("random", "seed"):
            Wt, _ = _random_init(op, k, seed, init)
        else:
            Wt = _ls_init_Wt(op, H, solver)
    else:
        Wt, H = _initialise(op, k, init, seed)
    return _solve(
        op,
        Wt,
        H,
        solver=solver,
        update_H=update_H,
        max_iter=max_iter,
        tol=tol,
        check_every=check_every,
    )


def nmf_fit_many(
    jobs: Sequence[tuple[Any, int, dict[str, Any]]],
    done: Callable[[int], None] | None = None,
) -> list[NMFResult]:
    """``[nmf_fit(V, k, **kwargs) for V, k, kwargs in jobs]``, side by side where that pays.

    Fits of host CSR V with the compiled kernels run on one thread per core, each running its
    row ranges on its own thread: for the many small fits of a k sweep (tens of thousands of
    rows) this beats splitting every product over the cores, whose per-product hand-offs cost
    ~0.1 ms against ~1 ms of work. Once fewer fits than cores are left, their ranges spread
    over the cores again (see :meth:`_Operand.run_ranges`), so the batch's last fit does not
    run on one core while the others wait. Other jobs run one after another. Every fit is the
    same deterministic computation (that of :func:`nmf_fit`) whichever threads run it;
    ``done(i)`` is called in job order.
    """
    parallel = (len(jobs) > 1 and (os.cpu_count() or 1) > 1
                and all(is_sparse(V) and csr_kernels.AVAILABLE for V, _, _ in jobs))
    if not parallel:
        out = []
        for i, (V, k, kw) in enumerate(jobs):
            out.append(nmf_fit(V, k, **kw))
            if done is not None:
                done(i)
        return out

    def run(V: Any, k: int, kw: dict[str, Any]) -> NMFResult:
        _LOCAL.serial = True
        _FITS.add(1)
        try:
            return nmf_fit(V, k, **kw)
        finally:
            _FITS.add(-1)
            _LOCAL.serial = False

    # the costliest first (most non-zeros, then the largest k), so that the last fits to
    # finish are short ones and the cores are not left waiting on one long fit
    order = sorted(range(len(jobs)), key=lambda i: (-_nnz(jobs[i][0]), -jobs[i][1], i))
    futures: list[Any] = [None] * len(jobs)
    for i in order:
        futures[i] = _fit_pool().submit(run, *jobs[i])
    results = []
    for i, f in enumerate(futures):
        results.append(f.result())
        if done is not None:
            done(i)
    return results


def _nnz(V: Any) -> int:
    return int(V.nnz) if is_sparse(V) else int(V.size)


def nmf_transform(
    V: Any,
    H: Any,
    *,
    solver: Solver = "hals",
    init: Init = "ls",
    max_iter: int = 200,
    tol: float = 1e-4,
    seed: int = 0,
    check_every: int = 10,
) -> Any:
    """W (n, k) >= 0 minimising ||V - W H|| for fixed bases H (k, C): inference on new images.

    V is read once (V H^T); every iteration then works on (n, k) arrays only. ``init='seed'`` or
    ``'random'`` start from the prototype's random W; the default starts from the clipped
    least-squares solution, which HALS refines in a few iterations.
    """
    k = int(H.shape[0])
    return nmf_fit(
        V,
        k,
        solver=solver,
        init=init,
        max_iter=max_iter,
        tol=tol,
        seed=seed,
        H=H,
        update_H=False,
        check_every=check_every,
    ).W


def prepare_v(
    V: Any,
    *,
    hold_dtype: str | None = None,
    sparse: bool | Literal["auto"] = "auto",
    max_density: float = SPARSE_MAX_DENSITY,
) -> Any:
    """V (n, C) in the form the solvers run fastest on, without changing the result.

    * Host (NumPy) V with at most ``max_density`` non-zeros becomes a SciPy CSR float32 matrix
      when ``sparse`` is 'auto' (or always when True): ReLU activations are ~93% zeros and the
      sparse products were 3-5x faster per iteration than dense BLAS on the benchmark machine
      (benchmarks/bench_nmf.py), and CSR also holds ~7x less memory. Device (CuPy) V stays
      dense: cuBLAS on dense V is the fast path there.
    * Otherwise, ``hold_dtype`` ('float16' | 'float32') casts dense V; float16 halves the memory
      held, compute stays float32 (in bounded row chunks; slower on CPU, see the benchmark).
    """
    if hold_dtype not in (None, "float16", "float32"):
        raise ValueError(f"hold_dtype must be 'float16', 'float32' or None, got {hold_dtype!r}")
    if sparse not in (True, False, "auto"):
        raise ValueError(f"sparse must be True, False or 'auto', got {sparse!r}")
    if is_sparse(V):
        return V
    xp = get_namespace(V)
    if xp is np and sparse is not False and V.ndim == 2:
        density = np.count_nonzero(V) / max(V.size, 1)
        if sparse is True or density <= max_density:
            import scipy.sparse as scipy_sparse  # noqa: PLC0415 - host-only path

            return scipy_sparse.csr_matrix(
                V, dtype=np.float64 if V.dtype == np.float64 else np.float32
            )
    if hold_dtype is None:
        return V
    return xp.asarray(V, dtype=getattr(xp, hold_dtype))


# --------------------------------------------------------------------------------------------
# Estimator.
# --------------------------------------------------------------------------------------------


class NotFittedError(RuntimeError, ValueError, AttributeError):
    """The estimator is used before ``fit`` (a RuntimeError, and a ValueError/AttributeError
    like scikit-learn's NotFittedError, so code written for either catches it)."""


class NMF:
    """Estimator wrapper over :func:`nmf_fit` / :func:`nmf_transform`, following the
    scikit-learn estimator contract without importing scikit-learn: ``__init__`` stores its
    arguments verbatim (validated in ``fit``), ``get_params``/``set_params`` (so
    ``sklearn.base.clone`` and grid searches work), ``fit(X, y=None)``, ``transform``,
    ``fit_transform``, ``n_features_in_`` and a repr listing the non-default parameters.

    ``n_components=None`` keeps every feature (k = C), as scikit-learn's ``None`` does.

    Fitted attributes: ``components_`` (k, C) = H, ``reconstruction_err_`` (Frobenius norm),
    ``n_iter_``, ``converged_``, ``n_features_in_``. A :class:`ConvergenceWarning` is issued
    when ``max_iter`` is reached with ``tol > 0``.

    V goes through :func:`prepare_v` first: with ``sparse='auto'`` (default) host V with at most
    30% non-zeros is fitted as CSR (same result, faster on CPU); otherwise ``hold_dtype``
    ('float16' | 'float32' | None) casts it, e.g. 'float16' halves the memory held for V while
    compute stays in float32.
    """

    def __init__(
        self,
        n_components: int | None = None,
        *,
        solver: Solver = "hals",
        init: Init = "nndsvda",
        max_iter: int = 200,
        tol: float = 1e-4,
        random_state: int | None = 0,
        hold_dtype: str | None = None,
        sparse: bool | Literal["auto"] = "auto",
        check_every: int = 10,
    ) -> None:
        self.n_components = n_components
        self.solver = solver
        self.init = init
        self.max_iter = max_iter
        self.tol = tol
        self.random_state = random_state
        self.hold_dtype = hold_dtype
        self.sparse = sparse
        self.check_every = check_every

    # ------------------------------------------------------------------ the estimator contract
    @classmethod
    def _param_names(cls) -> list[str]:
        import inspect  # noqa: PLC0415 - only needed here

        sig = inspect.signature(cls.__init__)
        return sorted(n for n, p in sig.parameters.items()
                      if n != "self" and p.kind != p.VAR_KEYWORD)

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """The constructor parameters, as given (``deep`` is accepted for compatibility:
        there are no nested estimators)."""
        return {name: getattr(self, name) for name in self._param_names()}

    def set_params(self, **params: Any) -> NMF:
        """Set constructor parameters (unknown names raise ValueError); returns self."""
        valid = self._param_names()
        for name, value in params.items():
            if name not in valid:
                raise ValueError(f"invalid parameter {name!r} for NMF; valid: {valid}")
            setattr(self, name, value)
        return self

    def __repr__(self) -> str:
        import inspect  # noqa: PLC0415 - only needed here

        defaults = {n: p.default for n, p in inspect.signature(type(self).__init__)
                    .parameters.items() if n != "self"}
        shown = []
        for name in self._param_names():
            value = getattr(self, name)
            default = defaults.get(name, inspect.Parameter.empty)
            same = value is default or (type(value) is type(default) and value == default)
            if not same:
                shown.append(f"{name}={value!r}")
        return f"{type(self).__name__}({', '.join(shown)})"

    def __sklearn_tags__(self) -> Any:
        # Only scikit-learn calls this, so importing it here adds no runtime dependency.
        from sklearn.utils import InputTags, Tags, TargetTags, TransformerTags  # noqa: PLC0415

        return Tags(estimator_type=None, target_tags=TargetTags(required=False),
                    transformer_tags=TransformerTags(preserves_dtype=["float64", "float32"]),
                    input_tags=InputTags(sparse=True, positive_only=True))

    # ------------------------------------------------------------------ checks
    def _check_input(self, V: Any, *, reset: bool) -> Any:
        """V as a 2-D float array (NumPy, CuPy) or CSR matrix; errors worded as scikit-learn's
        ``check_array`` words them, since callers and its estimator checks match on them."""
        if is_sparse(V):
            X = V.tocsr() if hasattr(V, "tocsr") else V
            if X.dtype not in (np.float32, np.float64):
                X = X.astype(np.float64)
            values = X.data
        elif get_namespace(V) is not np:
            X = values = V
        else:
            X = np.asarray(V)
            if X.dtype.kind == "c":
                raise ValueError("Complex data not supported")
            if X.dtype not in (np.float32, np.float64, np.float16):
                X = X.astype(np.float64)  # objects that are not numbers raise TypeError
            values = X
        if X.ndim != 2:
            raise ValueError(f"Expected a 2D array (n_samples, n_features), got shape "
                             f"{X.shape}. Reshape your data either using X.reshape(-1, 1) if "
                             "it has a single feature or X.reshape(1, -1) if it is one sample.")
        if X.shape[0] < 1:
            raise ValueError(f"Found array with 0 sample(s) (shape={X.shape}) while a minimum "
                             "of 1 is required.")
        if X.shape[1] < 1:
            raise ValueError(f"Found array with 0 feature(s) (shape={X.shape}) while a minimum "
                             "of 1 is required.")
        xp = get_namespace(values)
        if bool(xp.isnan(values).any()):
            raise ValueError("Input X contains NaN.")
        if bool(xp.isinf(values).any()):
            raise ValueError("Input X contains infinity.")
        if values.size and float(values.min()) < 0:
            raise ValueError("Negative values in data passed to NMF (input X)")
        if reset:
            self.n_features_in_ = int(X.shape[1])
        elif X.shape[1] != self.n_features_in_:
            raise ValueError(f"X has {X.shape[1]} features, but NMF is expecting "
                             f"{self.n_features_in_} features as input")
        return X

    def _k(self, n_features: int) -> int:
        k = n_features if self.n_components is None else self.n_components
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"n_components must be a positive int or None, got {k!r}")
        return int(k)

    def _seed(self) -> int:
        seed = 0 if self.random_state is None else self.random_state
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"random_state must be a non-negative int or None, got {seed!r}")
        return int(seed)

    def _hold(self, V: Any) -> Any:
        return prepare_v(V, hold_dtype=self.hold_dtype, sparse=self.sparse)

    def _warn_if_needed(self, result: NMFResult) -> None:
        if not result.converged and self.tol > 0:
            import warnings  # noqa: PLC0415 - only needed on this path

            warnings.warn(
                f"NMF ({self.solver}) reached max_iter={self.max_iter} before tol={self.tol}",
                ConvergenceWarning,
                stacklevel=3,
            )

    # ------------------------------------------------------------------ fit / transform
    def fit_transform(self, V: Any, y: Any = None) -> Any:
        """Fit to V (n, C) and return W (n, k). ``y`` is ignored."""
        V = self._check_input(V, reset=True)
        k = self._k(V.shape[1])
        result = nmf_fit(
            self._hold(V),
            k,
            solver=self.solver,
            init=self.init,
            max_iter=self.max_iter,
            tol=self.tol,
            seed=self._seed(),
            check_every=self.check_every,
        )
        self.components_ = result.H
        self.reconstruction_err_ = result.error
        self.n_iter_ = result.n_iter
        self.converged_ = result.converged
        self._warn_if_needed(result)
        return result.W

    def fit(self, V: Any, y: Any = None) -> NMF:
        """Fit to V (n, C); returns self. ``y`` is ignored."""
        self.fit_transform(V)
        return self

    def transform(self, V: Any) -> Any:
        """W (n, k) for new data V (n, C) with the fitted bases held fixed."""
        if not hasattr(self, "components_"):
            raise NotFittedError("NMF instance is not fitted yet; call fit first")
        V = self._check_input(V, reset=False)
        result = nmf_fit(
            self._hold(V),
            int(self.components_.shape[0]),
            solver=self.solver,
            # The seed's inference starts from its random W; other inits start from least squares.
            init=self.init if self.init in ("random", "seed") else "ls",
            max_iter=self.max_iter,
            tol=self.tol,
            seed=self._seed(),
            H=self.components_,
            update_H=False,
            check_every=self.check_every,
        )
        self._warn_if_needed(result)
        return result.W

"""Array backend: NumPy on the host, CuPy on a CUDA device.

The numeric code of the concept engine is written once over an array namespace ``xp`` that it
obtains from its inputs with :func:`get_namespace`. This module is the only place that imports
CuPy, so a CPU-only installation never needs it, and the only place that copies between host
and device (:func:`to_host`, :func:`to_device`); the compute modules call these at their I/O
boundaries only.

SciPy sparse matrices are host arrays: :func:`get_namespace` maps them to NumPy.

``DFF_GPU=0`` in the environment keeps every computation on the host even where CuPy sees a
device (``DFF_GPU=1``, the default, uses it when present).

It also holds the one CUDA kernel of the engine, :func:`hals_sweep` (``DFF_CUPY_FUSED=0``
switches it off).
"""

from __future__ import annotations

import functools
import logging
import os
from types import ModuleType
from typing import Any

import numpy as np
import scipy.sparse as sp

log = logging.getLogger(__name__)

__all__ = [
    "compute_namespace",
    "get_namespace",
    "gpu_available",
    "hals_sweep",
    "is_sparse",
    "to_device",
    "to_host",
]


@functools.cache
def _cupy() -> ModuleType | None:
    """CuPy if it is installed and sees at least one CUDA device (and ``DFF_GPU`` is not
    ``0``), else None (cached)."""
    if os.environ.get("DFF_GPU", "1").strip() == "0":
        return None
    try:
        import cupy  # noqa: PLC0415 - the one place CuPy is imported

        if cupy.cuda.runtime.getDeviceCount() < 1:
            return None
        return cupy
    except Exception:  # noqa: BLE001 - a missing driver/runtime raises many kinds of errors
        return None


def gpu_available() -> bool:
    """True when CuPy is importable and a CUDA device is visible."""
    return _cupy() is not None


def compute_namespace(prefer_gpu: bool = True) -> ModuleType:
    """Where new computations should run: CuPy when a CUDA device is usable (and preferred),
    else NumPy. Pipelines call this once and move their input there with :func:`to_device`."""
    cp = _cupy() if prefer_gpu else None
    return cp if cp is not None else np


def _is_cupy_array(a: Any) -> bool:
    # Checked by type name first so that NumPy-only processes never try to import CuPy.
    mod = type(a).__module__
    return mod.startswith("cupy") or mod.startswith("cupyx")


def is_sparse(a: Any) -> bool:
    """True for a SciPy sparse matrix/array (host) or a CuPy sparse matrix (device)."""
    if sp.issparse(a):
        return True
    return _is_cupy_array(a) and type(a).__module__.startswith("cupyx.scipy.sparse")


def get_namespace(*arrays: Any) -> ModuleType:
    """The array module (``numpy`` or ``cupy``) of the given arrays.

    ``None`` entries and Python scalars are ignored. Mixing host and device arrays is an error:
    silently copying would hide a transfer in the middle of a computation.

    Raises:
        TypeError: if some arrays live on the device and others on the host.
    """
    kinds = set()
    for a in arrays:
        if a is None or isinstance(a, (int, float, complex, bool)):
            continue
        kinds.add("cupy" if _is_cupy_array(a) else "numpy")
    if len(kinds) > 1:
        raise TypeError("mixed NumPy and CuPy arrays; move them with to_device/to_host first")
    if kinds == {"cupy"}:
        found = _cupy()
        if found is None:  # pragma: no cover - a CuPy array exists, so CuPy imports
            import cupy

            return cupy
        return found
    return np


def to_host(a: Any) -> Any:
    """A NumPy array (or SciPy sparse matrix) with the contents of ``a``; no copy if on host."""
    if a is None:
        return None
    if _is_cupy_array(a):
        return a.get()
    if sp.issparse(a):
        return a
    return np.asarray(a)


def to_device(a: Any, xp: ModuleType) -> Any:
    """``a`` as an array of namespace ``xp`` (a copy only when it changes memory space)."""
    if a is None:
        return None
    if xp is np:
        return to_host(a)
    if sp.issparse(a):
        import cupyx.scipy.sparse as csp  # noqa: PLC0415 - CuPy stays confined to this module

        return csp.csr_matrix(a.tocsr())
    return xp.asarray(a)


# One HALS sweep over the rows of X (k, m), one thread per column: row j of column c becomes
# max(0, X[j,c] + (AtB[j,c] - sum_l AtA[j,l] X[l,c]) / AtA[j,j]) for j = 0..k-1 in order,
# each with the rows before it already updated - exactly the row-by-row Gauss-Seidel sweep
# (nmf._hals_update_rows), as column c of one row depends only on column c of the others. The
# row-by-row form launches ~5 kernels per row and reads X k times; this launches one and reads
# X once. NaN stays NaN (as numpy.maximum), a non-positive AtA[j,j] leaves row j as it is.
_HALS_SWEEP_SOURCE = r"""
template <typename T>
__device__ void hals_sweep(T* X, const T* AtB, const T* AtA, const int k, const long long m) {
    const long long c = (long long)blockDim.x * blockIdx.x + threadIdx.x;
    if (c >= m) return;
    for (int j = 0; j < k; ++j) {
        const T d = AtA[j * k + j];
        if (d <= (T)0) continue;
        T s = (T)0;
        for (int l = 0; l < k; ++l) s += AtA[j * k + l] * X[(long long)l * m + c];
        const T v = X[(long long)j * m + c] + (AtB[(long long)j * m + c] - s) / d;
        X[(long long)j * m + c] = (v > (T)0 || v != v) ? v : (T)0;
    }
}
extern "C" __global__ void hals_sweep_f32(float* X, const float* AtB, const float* AtA,
                                          const int k, const long long m) {
    hals_sweep<float>(X, AtB, AtA, k, m);
}
extern "C" __global__ void hals_sweep_f64(double* X, const double* AtB, const double* AtA,
                                          const int k, const long long m) {
    hals_sweep<double>(X, AtB, AtA, k, m);
}
"""
_THREADS = 256


def _launch_hals_sweep(kernels: dict[str, Any], X: Any, AtB: Any, AtA: Any) -> Any:
    k, m = (int(v) for v in X.shape)
    blocks = max(1, (m + _THREADS - 1) // _THREADS)
    kernels[X.dtype.char]((blocks,), (_THREADS,), (X, AtB, AtA, np.int32(k), np.int64(m)))
    return X


def _hals_sweep_reference(X: Any, AtB: Any, AtA: Any, xp: ModuleType) -> Any:
    """The row-by-row sweep (the same as nmf._hals_update_rows), for the self-check."""
    for j, d in enumerate(float(v) for v in xp.diag(AtA)):
        if d > 0.0:
            X[j] = xp.maximum(X[j] + (AtB[j] - AtA[j] @ X) / d, 0)
    return X


@functools.cache
def _hals_kernels() -> dict[str, Any] | None:
    """The compiled sweep kernels by dtype char ('f', 'd'), checked once against the row-by-row
    sweep on a small random problem; None (callers loop over rows) without CuPy, with
    ``DFF_CUPY_FUSED=0``, or when compiling or the check fails (logged)."""
    cp = _cupy()
    if cp is None or os.environ.get("DFF_CUPY_FUSED", "1").strip() == "0":
        return None
    try:
        module = cp.RawModule(code=_HALS_SWEEP_SOURCE)
        kernels = {"f": module.get_function("hals_sweep_f32"),
                   "d": module.get_function("hals_sweep_f64")}
        rng = np.random.default_rng(0)
        for dtype in ("float32", "float64"):
            A: np.ndarray = rng.random((700, 5)).astype(dtype)
            B: np.ndarray = rng.random((700, 333)).astype(dtype)
            X0 = rng.random((5, 333)).astype(dtype)
            AtA, AtB = cp.asarray(A.T @ A), cp.asarray(A.T @ B)
            got = _launch_hals_sweep(kernels, cp.asarray(X0), AtB, AtA)
            want = _hals_sweep_reference(cp.asarray(X0), AtB, AtA, cp)
            tol = 1e-4 if dtype == "float32" else 1e-10
            if not bool(cp.allclose(got, want, rtol=tol, atol=tol)):
                raise RuntimeError(f"self-check failed ({dtype})")
        return kernels
    except Exception as exc:  # noqa: BLE001 - compile/driver errors come in many types
        log.warning("fused HALS kernel unavailable, sweeping row by row: %s", exc)
        return None


def hals_sweep(X: Any, AtB: Any, AtA: Any) -> Any | None:
    """One HALS sweep over the rows of the CuPy array X (k, m) for min ||B - A X||, X >= 0,
    given AtB = A^T B (k, m) and AtA = A^T A (k, k), in one kernel launch: returns the updated
    X (X itself when C-contiguous), or None where the kernel is unavailable or the arrays are
    not all float32 or all float64 CuPy arrays (the caller then sweeps row by row)."""
    if not (_is_cupy_array(X) and _is_cupy_array(AtB) and _is_cupy_array(AtA)):
        return None
    if X.dtype.char not in "fd" or AtB.dtype != X.dtype or AtA.dtype != X.dtype:
        return None
    if X.ndim != 2 or AtB.shape != X.shape or AtA.shape != (X.shape[0], X.shape[0]):
        return None
    kernels = _hals_kernels()
    if kernels is None:
        return None
    cp = _cupy()
    assert cp is not None  # kernels exist only with CuPy
    return _launch_hals_sweep(kernels, cp.ascontiguousarray(X), cp.ascontiguousarray(AtB),
                              cp.ascontiguousarray(AtA))

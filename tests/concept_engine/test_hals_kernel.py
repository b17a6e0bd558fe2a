"""The engine's CUDA kernel (backend.hals_sweep), checked without a GPU: its source is compiled
as C++ for the host with the CUDA thread indices emulated (every block and thread in turn - the
threads of the kernel share nothing), and each sweep must equal the row-by-row HALS sweep the
host and the fallback run (nmf._hals_update_rows). The GPU itself runs it in the gpu tests."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from concept_engine import backend
from concept_engine.nmf import _hals_update_rows

HARNESS = r"""
#include <cstdint>
struct Dim { long long x; };
static Dim blockDim, blockIdx, threadIdx;
#define __global__
#define __device__
%s
template <typename T, typename K>
static void grid(K kernel, T* X, const T* AtB, const T* AtA, int k, long long m, int threads) {
    blockDim.x = threads;
    const long long blocks = (m + threads - 1) / threads;
    for (long long b = 0; b < blocks; ++b) {
        blockIdx.x = b;
        for (int t = 0; t < threads; ++t) { threadIdx.x = t; kernel(X, AtB, AtA, k, m); }
    }
}
extern "C" void run_f32(float* X, const float* AtB, const float* AtA, int k, long long m,
                        int threads) { grid(hals_sweep_f32, X, AtB, AtA, k, m, threads); }
extern "C" void run_f64(double* X, const double* AtB, const double* AtA, int k, long long m,
                        int threads) { grid(hals_sweep_f64, X, AtB, AtA, k, m, threads); }
"""


@pytest.fixture(scope="module")
def host_kernel(tmp_path_factory) -> ctypes.CDLL:
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler (bash .ci/setup --test installs g++)")
    folder: Path = tmp_path_factory.mktemp("kernel")
    (folder / "k.cpp").write_text(HARNESS % backend._HALS_SWEEP_SOURCE)
    subprocess.run([cxx, "-O1", "-shared", "-fPIC", "-o", str(folder / "k.so"),
                    str(folder / "k.cpp")], check=True, capture_output=True)
    return ctypes.CDLL(str(folder / "k.so"))


def sweep_on_host(lib: ctypes.CDLL, X: np.ndarray, AtB: np.ndarray, AtA: np.ndarray,
                  threads: int = 256) -> np.ndarray:
    X = np.ascontiguousarray(X).copy()
    fn = lib.run_f32 if X.dtype == np.float32 else lib.run_f64
    ptr = ctypes.c_void_p
    fn(ptr(X.ctypes.data), ptr(np.ascontiguousarray(AtB).ctypes.data),
       ptr(np.ascontiguousarray(AtA).ctypes.data), ctypes.c_int(X.shape[0]),
       ctypes.c_longlong(X.shape[1]), ctypes.c_int(threads))
    return X


def problem(k: int, m: int, dtype, seed: int = 0):
    rng = np.random.default_rng(seed)
    A = rng.random((300, k)).astype(dtype)
    B = rng.random((300, m)).astype(dtype)
    return rng.random((k, m)).astype(dtype), (A.T @ B).astype(dtype), (A.T @ A).astype(dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("k,m", [(1, 5), (4, 256), (6, 1000), (9, 513)])
def test_kernel_is_the_row_by_row_sweep(host_kernel, dtype, k, m):
    X, AtB, AtA = problem(k, m, dtype, seed=k * m)
    want = _hals_update_rows(X.copy(), AtB, AtA, np)
    got = sweep_on_host(host_kernel, X, AtB, AtA)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol)
    assert (got >= 0).all()
    # the grid covers every column whatever the block size (m not a multiple of it)
    np.testing.assert_allclose(sweep_on_host(host_kernel, X, AtB, AtA, threads=7), got,
                               rtol=tol, atol=tol)


def test_kernel_keeps_a_zero_component_and_nan(host_kernel):
    X, AtB, AtA = problem(3, 40, np.float32)
    AtA[1, :] = AtA[:, 1] = 0  # component 1 is zero on the other side: row 1 stays as it is
    X[2, 5] = np.nan
    AtB[2, 5] = np.nan
    want = _hals_update_rows(X.copy(), AtB, AtA, np)
    got = sweep_on_host(host_kernel, X, AtB, AtA)
    np.testing.assert_array_equal(got[1], X[1])
    assert np.isnan(got[2, 5]) and np.isnan(want[2, 5])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_host_arrays_never_take_the_kernel():
    X, AtB, AtA = problem(3, 10, np.float32)
    assert backend.hals_sweep(X, AtB, AtA) is None


@pytest.mark.gpu
def test_gpu_kernel_matches_the_row_by_row_sweep():
    assert backend.gpu_available()
    import cupy  # noqa: PLC0415 - only in the GPU test

    assert backend._hals_kernels() is not None  # compiled and self-checked
    for dtype in (np.float32, np.float64):
        X, AtB, AtA = problem(6, 100_003, dtype)
        want = _hals_update_rows(X.copy(), AtB, AtA, np)
        got = backend.hals_sweep(cupy.asarray(X), cupy.asarray(AtB), cupy.asarray(AtA))
        assert got is not None
        tol = 1e-4 if dtype == np.float32 else 1e-10
        np.testing.assert_allclose(cupy.asnumpy(got), want, rtol=tol, atol=tol)

"""Benchmark the concept engine's NMF against the seed's algorithm and scikit-learn.

One run, one V, the same k and iteration budget for every solver:

* ``seed-torch``: the research prototype's algorithm reimplemented faithfully in torch (CPU):
  Lee-Seung MU, H then W, zero denominators -> 1e-7, and every 10 iterations the error from the
  DENSE residual V - WH, stopping when (previous - error) / initial error < tol. (W H H^T is
  computed as W (H H^T), the cheap order, so the baseline is not handicapped.)
* ``ours-mu-seed``: our MU from the same start (init='seed'): it must track the seed's errors.
* ``ours-mu``, ``ours-hals``: our solvers from the deterministic NNDSVDa start, V dense float32;
  ``ours-hals-f16``: V held in float16 (float32 compute in row chunks);
  ``ours-hals-csr`` / ``ours-mu-csr``: V as a SciPy CSR matrix (activations are ~93% zeros),
  run by the compiled kernels (one read of the non-zeros per iteration; concept_engine/
  csr_kernels.py); ``ours-hals-csr-scipy``: the same with the kernels off (SciPy's products
  on threaded row blocks, the fallback without Numba).
* ``ours-hals-cupy``: HALS on a CUDA device (CuPy, V dense float32 moved there once; the
  time includes no host-device copy; skipped without a GPU);
* ``ours-hals-csr1``: the CSR run on one thread (one row range), to show what the threads buy;
* ``sklearn-mu`` / ``sklearn-cd``: scikit-learn's NMF from the SAME NNDSVDa start
  (init='custom'), so errors compare like for like.

The final error of every solver is re-measured the same way (||V - WH|| in float64 reductions).
Per-iteration time is compared with the time to read V once from memory (a NumPy sum over V):
a dense MU/HALS iteration reads V twice; the CSR kernels read the (7x smaller) non-zeros once.

Usage::

    .venv/bin/python benchmarks/bench_nmf.py                      # N=5000 synthetic (minutes)
    .venv/bin/python benchmarks/bench_nmf.py --n-images 500 --iters 20
    .venv/bin/python benchmarks/bench_nmf.py --features feats.h5 [--dataset activations/conv5_4]

``--features`` reads the ``dff extract`` HDF5 layout: a dataset (N, C, h, w) (float16/32), rows
of images whose ``errors`` entry is non-empty are skipped; V = (N*h*w, C), image by image, (y, x).
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
import tracemalloc
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import concept_engine.nmf as nmf_module  # noqa: E402
from benchmarks.sysinfo import cpu_description  # noqa: E402
from concept_engine import csr_kernels  # noqa: E402
from concept_engine.nmf import nmf_fit, nmf_init, reconstruction_error  # noqa: E402


@dataclass
class Row:
    name: str
    n_iter: int
    seconds: float
    error: float
    peak_mb: float | None = None
    note: str = ""


def synthetic_v(n_images: int, C: int = 512, density: float = 0.07, seed: int = 0) -> np.ndarray:
    """(n_images*196, C) float32, ~``density`` non-zeros: ReLU of low-rank parts plus noise.

    Generated in row chunks (no (n, C) temporaries beyond V itself); seeded.
    """
    rng = np.random.default_rng(seed)
    n = n_images * 196
    rank = 16
    A = rng.gamma(0.5, 1.0, (n, rank)).astype(np.float32)
    B = rng.gamma(0.3, 1.0, (rank, C)).astype(np.float32)
    V = np.empty((n, C), dtype=np.float32)
    step = 65536
    for start in range(0, n, step):
        block = A[start : start + step] @ B
        block += 2.0 * rng.standard_normal(block.shape, dtype=np.float32)
        V[start : start + step] = block
    sample = V[rng.integers(0, n, min(n, 20000))]
    cut = np.float32(np.quantile(sample, 1.0 - density))
    for start in range(0, n, step):
        block = V[start : start + step]
        np.subtract(block, cut, out=block)
        np.maximum(block, 0, out=block)
    return V


def load_features(path: str, dataset: str) -> tuple[np.ndarray, int]:
    """V (N*h*w, C) float32 from a ``dff extract`` HDF5 file; returns (V, N)."""
    import h5py  # noqa: PLC0415 - only for --features

    with h5py.File(path, "r") as h5:
        acts = h5[dataset][...]
        ok = np.ones(acts.shape[0], dtype=bool)
        if "errors" in h5:
            ok = np.array([not e for e in h5["errors"].asstr()[...]])
    acts = acts[ok]
    N, C, h, w = acts.shape
    V = np.ascontiguousarray(acts.transpose(0, 2, 3, 1).reshape(N * h * w, C), dtype=np.float32)
    return V, N


def seed_torch(V: np.ndarray, W0: np.ndarray, H0: np.ndarray, max_iter: int, tol: float):
    """The seed's MU loop in torch, dense-residual convergence check every 10 iterations."""
    import torch  # noqa: PLC0415 - benchmark-only dependency

    Vt = torch.from_numpy(V)
    W = torch.from_numpy(W0.copy())
    H = torch.from_numpy(H0.copy())
    eps = 1e-7
    error_at_init = torch.linalg.norm(Vt - W @ H).item()
    previous = error_at_init
    n_iter = 0
    for n_iter in range(1, max_iter + 1):  # noqa: B007
        num = W.T @ Vt
        den = (W.T @ W) @ H
        den[den == 0] = eps
        H = H * num / den
        num = Vt @ H.T
        den = W @ (H @ H.T)
        den[den == 0] = eps
        W = W * num / den
        if tol > 0 and n_iter % 10 == 0:
            error = torch.linalg.norm(Vt - W @ H).item()
            if (previous - error) / error_at_init < tol:
                break
            previous = error
    return W.numpy(), H.numpy(), n_iter


def read_time(V: np.ndarray, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        np.sum(V)
        best = min(best, time.perf_counter() - t)
    return best


def timed(fn: Callable[[], tuple], track: bool) -> tuple[tuple, float, float | None]:
    gc.collect()
    if track:
        tracemalloc.start()
    t = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - t
    peak = None
    if track:
        peak = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
    return out, seconds, peak


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n-images", type=int, default=5000)
    p.add_argument("--k", type=int, default=6)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--tol", type=float, default=1e-4)
    p.add_argument("--density", type=float, default=0.07)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--features", help="dff extract HDF5 file to take V from (default: synthetic)")
    p.add_argument("--dataset", default="activations/conv5_4")
    p.add_argument(
        "--runs",
        default="seed-torch,ours-mu-seed,ours-mu,ours-hals,ours-hals-csr,ours-hals-csr-scipy,"
        "ours-hals-csr1,ours-mu-csr,sklearn-mu,sklearn-cd",
        help="comma-separated subset of runs (also: ours-hals-f16, ours-hals-cupy)",
    )
    p.add_argument("--json", help="also write the rows as JSON to this file")
    p.add_argument(
        "--track-memory",
        action="store_true",
        help="record peak NumPy allocations with tracemalloc (slows the fits: timings invalid)",
    )
    args = p.parse_args(argv)
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    track = args.track_memory

    t = time.perf_counter()
    if args.features:
        V, N = load_features(args.features, args.dataset)
        source = f"{args.features}:{args.dataset}"
    else:
        V, N = synthetic_v(args.n_images, density=args.density, seed=args.seed), args.n_images
        source = "synthetic"
    gen_s = time.perf_counter() - t
    k, iters, tol = args.k, args.iters, args.tol
    zeros = float(np.mean(V == 0))
    t_read = read_time(V)
    try:
        import torch  # noqa: PLC0415

        torch_threads = torch.get_num_threads()
    except ImportError:
        torch = None
        torch_threads = 0
    print(
        f"V {V.shape[0]} x {V.shape[1]} float32 ({V.nbytes / 2**30:.2f} GiB, {zeros:.1%} zeros) "
        f"from {source} [{gen_s:.1f} s]; N={N}, k={k}, max_iter={iters}, tol={tol}; "
        f"cpus={os.cpu_count()}, torch threads={torch_threads}"
    )
    print(f"one read of V (numpy sum): {t_read * 1e3:.1f} ms")
    print(cpu_description())

    Vcsr = V16 = None
    if any(r.endswith("-csr") for r in runs):
        t = time.perf_counter()
        Vcsr = sp.csr_matrix(V)
        print(
            f"CSR conversion {time.perf_counter() - t:.1f} s, "
            f"{(Vcsr.data.nbytes + Vcsr.indices.nbytes) / 2**20:.0f} MiB"
        )
    if "ours-hals-f16" in runs:
        V16 = V.astype(np.float16)

    csr_init_s = None
    if Vcsr is not None:
        # the compiled kernels load (or compile, on a machine's first run) once per process:
        # timed on its own, then the start is the best of 3 - before the dense starts, whose
        # threaded BLAS calls leave OpenBLAS's workers spinning for a while (measured: the
        # next CSR starts took 105-270 ms instead of 90 for about half a second)
        t = time.perf_counter()
        tiny = sp.csr_matrix(np.eye(16, 8, dtype=np.float32))
        nmf_fit(tiny, 2, max_iter=2, tol=0)
        print(f"compiled CSR kernels: {'on' if csr_kernels.AVAILABLE else 'off (SciPy)'}, "
              f"load/compile {time.perf_counter() - t:.2f} s (once per process)")
        csr_init_s = min(
            timed(lambda: nmf_init(Vcsr, k, init="nndsvda", seed=args.seed), False)[1]
            for _ in range(3))
    (Ws, Hs), seed_init_s, _ = timed(lambda: nmf_init(V, k, init="seed", seed=args.seed), False)
    (Wn, Hn), nndsvd_s, _ = timed(lambda: nmf_init(V, k, init="nndsvda", seed=args.seed), False)
    print(f"init: seed {seed_init_s:.2f} s, nndsvda (randomised SVD) dense V {nndsvd_s:.2f} s"
          + ("" if csr_init_s is None else f", CSR V {csr_init_s:.2f} s"))

    rows: list[Row] = []

    def ours(name: str, data, solver: str, W0, H0, note: str = "") -> None:
        res, sec, peak = timed(
            lambda: (nmf_fit(data, k, solver=solver, W=W0, H=H0, max_iter=iters, tol=tol),),
            track,
        )
        r = res[0]
        rows.append(Row(name, r.n_iter, sec, reconstruction_error(V, r.W, r.H), peak, note))

    for name in runs:
        if name == "seed-torch":
            if torch is None:
                continue
            (W, H, n_it), sec, _ = timed(lambda: seed_torch(V, Ws, Hs, iters, tol), False)
            rows.append(Row(name, n_it, sec, reconstruction_error(V, W, H), None, "init=seed"))
        elif name == "ours-mu-seed":
            ours(name, V, "mu", Ws, Hs, "init=seed")
        elif name == "ours-mu":
            ours(name, V, "mu", Wn, Hn, "nndsvda")
        elif name == "ours-hals":
            ours(name, V, "hals", Wn, Hn, "nndsvda")
        elif name == "ours-hals-f16":
            ours(name, V16, "hals", Wn, Hn, "nndsvda, V float16")
        elif name == "ours-hals-csr":
            ours(name, Vcsr, "hals", Wn, Hn, "nndsvda, V CSR")
        elif name == "ours-hals-cupy":
            from concept_engine.backend import compute_namespace, to_device, to_host  # noqa: PLC0415

            cp = compute_namespace()
            if cp is np:
                print("  skip ours-hals-cupy: no CUDA device")
                continue
            Vd, Wd, Hd = (to_device(a, cp) for a in (V, Wn, Hn))
            nmf_fit(Vd, k, solver="hals", W=Wd, H=Hd, max_iter=2, tol=0)  # warm-up (kernels)
            cp.cuda.Device().synchronize()

            def gpu_fit(Vd=Vd, Wd=Wd, Hd=Hd, cp=cp):
                r = nmf_fit(Vd, k, solver="hals", W=Wd, H=Hd, max_iter=iters, tol=tol)
                cp.cuda.Device().synchronize()
                return r

            r, sec, _ = timed(lambda: (gpu_fit(),), False)
            r = r[0]
            rows.append(Row(name, r.n_iter, sec,
                            reconstruction_error(V, to_host(r.W), to_host(r.H)), None,
                            "nndsvda, V on the GPU"))
            del Vd
        elif name == "ours-hals-csr1":
            threads = nmf_module.SPARSE_THREADS
            nmf_module.SPARSE_THREADS = 1
            try:
                ours(name, Vcsr, "hals", Wn, Hn, "nndsvda, V CSR, 1 thread")
            finally:
                nmf_module.SPARSE_THREADS = threads
        elif name == "ours-hals-csr-scipy":
            available = csr_kernels.AVAILABLE
            csr_kernels.AVAILABLE = False
            try:
                ours(name, Vcsr, "hals", Wn, Hn, "nndsvda, V CSR, SciPy products")
            finally:
                csr_kernels.AVAILABLE = available
        elif name == "ours-mu-csr":
            ours(name, Vcsr, "mu", Wn, Hn, "nndsvda, V CSR")
        elif name.startswith("sklearn-"):
            from sklearn.decomposition import NMF as SkNMF  # noqa: PLC0415
            from sklearn.exceptions import ConvergenceWarning  # noqa: PLC0415

            est = SkNMF(k, init="custom", solver=name.split("-")[1], max_iter=iters, tol=tol)

            def fit(est=est):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", ConvergenceWarning)
                    W = est.fit_transform(V, W=Wn.copy(), H=Hn.copy())
                return W, est.components_, est.n_iter_

            (W, H, n_it), sec, peak = timed(fit, track)
            rows.append(Row(name, n_it, sec, reconstruction_error(V, W, H), peak, "nndsvda"))
        else:
            raise SystemExit(f"unknown run {name!r}")
        last = rows[-1]
        print(
            f"  done {last.name}: {last.n_iter} it, {last.seconds:.2f} s, err {last.error:.6g}",
            flush=True,
        )

    base = next((r for r in rows if r.name == "seed-torch"), rows[0])
    print()
    print(
        f"| run | start | iters | fit s | ms/iter | iter / read(V) | error | error / "
        f"{base.name} | speed-up vs {base.name} (per iter) | peak numpy MiB |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        per = r.seconds / max(r.n_iter, 1)
        speed = (base.seconds / max(base.n_iter, 1)) / per
        peak = "" if r.peak_mb is None else f"{r.peak_mb:.0f}"
        print(
            f"| {r.name} | {r.note} | {r.n_iter} | {r.seconds:.2f} | {per * 1e3:.0f} | "
            f"{per / t_read:.1f} | {r.error:.6g} | {r.error / base.error:.5f} | "
            f"{speed:.2f}x | {peak} |"
        )
    if args.json:
        import json  # noqa: PLC0415

        Path(args.json).write_text(json.dumps({
            "N": N, "k": k, "read_ms": t_read * 1e3, "nndsvda_s": nndsvd_s,
            "csr_init_s": csr_init_s, "cpu": cpu_description(),
            "rows": [{"name": r.name, "n_iter": r.n_iter, "seconds": r.seconds,
                      "ms_per_iter": 1e3 * r.seconds / max(r.n_iter, 1), "error": r.error}
                     for r in rows]}, indent=1))
    csr = next((r for r in rows if r.name == "ours-hals-csr"), None)
    if csr is not None and csr_init_s is not None:
        per = csr.seconds / max(csr.n_iter, 1)
        print(f"\nCSR HALS: {per * 1e3:.0f} ms/iteration = {per / t_read:.2f} x one dense read of "
              f"V; NNDSVDa start on CSR {csr_init_s * 1e3:.0f} ms = {csr_init_s / per:.1f} "
              "iterations")
    print(
        f"\nfit s excludes the shared inits (seed {seed_init_s:.2f} s, nndsvda {nndsvd_s:.2f} s);"
        f" read(V) = {t_read * 1e3:.1f} ms; seed-torch includes its dense-residual checks."
        + (
            " peak = NumPy allocations during the fit (tracemalloc; timings slowed)."
            if track
            else ""
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

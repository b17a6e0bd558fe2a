"""The k sweep as `dff discover` runs it (select_k, the default options), on the host and on
the GPU, at several class sizes: where the GPU starts to pay (``DFF_GPU_MIN_ROWS``).

    python benchmarks/bench_ksweep.py --images 25,50,100,200,400 [--features F.h5] [--json J]

V per size: ``--features`` (a ``dff extract`` HDF5 file; its images tiled to the size) or
``bench_nmf.synthetic_v`` (ReLU of low-rank parts plus noise, ~7% non-zeros, 196 rows an
image). On the host V is a SciPy CSR matrix and the fits run side by side on the cores, as
discovery stacks and runs them; on the GPU (where CuPy sees one) V is dense on the device, as
discovery moves it there. Each size is timed once per side after one untimed warm-up sweep
(kernel compiles), same V, same seed. Prints rows, host s, GPU s, GPU / host and whether both
chose the same k, and the smallest size from which the GPU was faster (what DFF_GPU_MIN_ROWS
should be); ``--json`` writes the rows.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_nmf import load_features, synthetic_v  # noqa: E402
from benchmarks.sysinfo import cpu_description  # noqa: E402


def make_v(n_images: int, base: np.ndarray | None, base_n: int, hw: int) -> np.ndarray:
    """(n_images * hw, C) float32: ``base``'s images repeated (a tiny multiplicative jitter per
    copy, so that copies are not identical rows), or synthetic."""
    if base is None:
        return synthetic_v(n_images, seed=n_images)
    rng = np.random.default_rng(n_images)
    parts, left = [], n_images
    while left > 0:
        take = min(left, base_n)
        part = base[: take * hw]
        if len(parts):
            part = part * rng.uniform(0.98, 1.02, (take * hw, 1)).astype(np.float32)
        parts.append(part)
        left -= take
    return np.ascontiguousarray(np.concatenate(parts), dtype=np.float32)


def sweep(V, n_images: int, hw: tuple[int, int]) -> tuple[float, int]:
    from concept_engine.discovery import DiscoveryOptions
    from concept_engine.kselect import select_k

    o = DiscoveryOptions()
    ks = [k for k in range(o.k_min, o.k_max + 1) if k <= n_images]
    t0 = time.perf_counter()
    sel = select_k(V, n_images, hw, ks=ks, criterion=o.k_criterion, seed=o.seed,
                   solver=o.solver, init=o.init, max_iter=o.max_iter, tol=o.tol)
    return time.perf_counter() - t0, int(sel.k)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", default="25,50,100,200,400",
                    help="class sizes, comma-separated (default: %(default)s)")
    ap.add_argument("--features", help="dff extract HDF5 file (default: synthetic V)")
    ap.add_argument("--dataset", default="activations/conv5_4")
    ap.add_argument("--json", type=Path, help="also write the rows to this file")
    args = ap.parse_args(argv)

    import scipy.sparse as sparse

    from concept_engine.backend import compute_namespace, to_device
    from concept_engine.nmf import prepare_v

    base, base_n, hw = None, 0, 196
    side = (14, 14)
    if args.features:
        base, base_n = load_features(args.features, args.dataset)
        hw = base.shape[0] // base_n
        side = (int(round(hw ** 0.5)), hw // int(round(hw ** 0.5)))
    # in `dff discover` the Extractor has set the CUDA context's sync mode before CuPy runs
    # (feature_server.cuda: block by default, DFF_CUDA_SYNC); the same here
    from feature_server.cuda import set_sync_mode, sync_mode

    sync = f"{sync_mode()}: {set_sync_mode()}"
    cp = compute_namespace()
    gpu = cp is not np
    print(cpu_description())
    print(f"V: {'features of ' + args.features if base is not None else 'synthetic'}; GPU: "
          f"{'CuPy ' + cp.__version__ + ', CUDA sync ' + sync if gpu else 'none (host rows only)'}")
    sizes = [int(s) for s in args.images.split(",") if s]
    rows = []
    warmed = False
    for n in sizes:
        V = make_v(n, base, base_n, hw)
        host_v = sparse.csr_matrix(V)
        if not warmed:  # Numba / NVRTC compiles, not timed
            sweep(host_v[: min(n, 8) * hw], min(n, 8), side)
            if gpu:
                sweep(prepare_v(to_device(V[: min(n, 8) * hw], cp)), min(n, 8), side)
            warmed = True
        host_s, host_k = sweep(host_v, n, side)
        row = {"images": n, "rows": int(V.shape[0]), "host_s": host_s, "host_k": host_k}
        if gpu:
            dev_v = prepare_v(to_device(V, cp))
            cp.cuda.Device().synchronize()
            gpu_s, gpu_k = sweep(dev_v, n, side)
            row.update(gpu_s=gpu_s, gpu_k=gpu_k, gpu_over_host=gpu_s / host_s)
            del dev_v
        rows.append(row)
        ratio = (f"{row['gpu_s']:8.2f} s  {row['gpu_over_host']:5.2f}x  same k: "
                 f"{'yes' if row['gpu_k'] == host_k else 'NO'}" if gpu else "")
        print(f"{n:5d} images {row['rows']:8d} rows  host {host_s:7.2f} s (k={host_k})  "
              f"{ratio}", flush=True)
    if gpu:
        faster = [r for r in rows if r["gpu_over_host"] < 1.0]
        first = next((r for r in rows if all(s["gpu_over_host"] < 1.0 for s in rows
                                             if s["images"] >= r["images"])), None)
        print("GPU faster from: " + (f"{first['images']} images ({first['rows']} rows): "
                                     f"DFF_GPU_MIN_ROWS={first['rows']}" if first
                                     else "none of these sizes")
              + f" ({len(faster)} of {len(rows)} sizes faster)")
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu_description(), "gpu": gpu,
                                         "features": args.features, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

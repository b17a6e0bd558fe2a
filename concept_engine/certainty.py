"""Concept certainty, exactly as the seed defines its "discovery confidence", but NaN-free.

For image i and concept j: take the raw heatmap W_maps[i, j] (h, w), upsample it bilinearly to
224 x 224, normalise it by its own maximum, and average the RAW upsampled values over the pixels
whose normalised value is >= 0.1.

Upsampling is implemented over ``xp`` (NumPy or CuPy) as two small interpolation matrices,
``up = R_y @ map @ R_x^T``, with the semantics of ``torch.nn.functional.interpolate(mode=
'bilinear', align_corners=False)`` (half-pixel centres, source coordinates clamped to the edge),
which is what the seed used; for upsampling this equals ``cv2.resize(..., INTER_LINEAR)`` to
float32 rounding (both are checked in tests/concept_engine/test_certainty.py). Working on the
device avoids a host round trip per map, and the matrix form is two batched GEMMs.

On the host, with Numba (:mod:`concept_engine.compiled`), a compiled kernel does the same per
map without materialising the upsampled map: the rows are upsampled once along x (each output
pixel mixes two source pixels), then each output row is formed from two of them, twice - once
for the maximum, once for the selected pixels; the maps are shared out over the cores. ~6x
faster than the matrix form plus NumPy reductions on one core (which hold and re-read every
224 x 224 map five times); same values up to float32 rounding (a test compares the two).

Where the seed divides by zero this returns 0: an all-zero (or non-positive) map has no
normalised values and certainty 0; an empty pixel set (impossible once the max is positive, as
the max pixel always qualifies) also gives 0.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from concept_engine import compiled
from concept_engine.backend import get_namespace, to_device

__all__ = [
    "SEED_SIZE",
    "SEED_THRESHOLD",
    "bilinear_matrix",
    "concept_certainty",
    "upsample_bilinear",
]

#: The seed upsamples every heatmap to the network input size before measuring certainty.
SEED_SIZE = (224, 224)
#: Pixels whose max-normalised value is at least this count towards the certainty.
SEED_THRESHOLD = 0.1
#: float32 bytes of upsampled maps held at once (small enough to stay in cache across the five
#: reductions: 64 MiB took 1.4x as long on the 2-core benchmark machine).
_CHUNK_BYTES = 4 * 2**20


def _bilinear_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                          np.ndarray]:
    """(i0, i1, w0, w1): output pixel d = w0[d] * x[i0[d]] + w1[d] * x[i1[d]] (float64
    weights), the two non-zeros of row d of :func:`bilinear_matrix`.

    align_corners=False: output pixel d samples source coordinate (d + 0.5) * in/out - 0.5,
    clamped to [0, in_size - 1] as torch and OpenCV do at the borders.
    """
    if in_size < 1 or out_size < 1:
        raise ValueError(f"sizes must be positive, got {in_size} -> {out_size}")
    dst = np.arange(out_size, dtype=np.float64)
    src = np.maximum((dst + 0.5) * (in_size / out_size) - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    lam = src - i0
    return i0, i1, 1.0 - lam, lam


def bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out_size, in_size) float64 matrix R with ``R @ x`` = bilinear resampling of x (in_size,)
    (see :func:`_bilinear_taps`)."""
    i0, i1, w0, w1 = _bilinear_taps(in_size, out_size)
    R = np.zeros((out_size, in_size), dtype=np.float64)
    rows = np.arange(out_size)
    np.add.at(R, (rows, i0), w0)
    np.add.at(R, (rows, i1), w1)
    return R


def upsample_bilinear(maps: Any, size: tuple[int, int]) -> Any:
    """Bilinear (align_corners=False) upsampling of maps (m, h, w) to (m, H, W), size = (H, W).

    Same namespace as ``maps``; float32 out. The two interpolation matrices are built on the host
    (a few KiB) and copied to the device once per call.
    """
    xp = get_namespace(maps)
    m, h, w = maps.shape
    Ry = to_device(bilinear_matrix(h, int(size[0])).astype(np.float32), xp)  # (H, h)
    RxT = to_device(bilinear_matrix(w, int(size[1])).T.astype(np.float32), xp)  # (w, W)
    return xp.matmul(xp.matmul(Ry, maps.astype(xp.float32, copy=False)), RxT)


def concept_certainty(
    W_maps: Any,
    upsample_to: tuple[int, int] | None = SEED_SIZE,
    *,
    threshold: float = SEED_THRESHOLD,
) -> Any:
    """Certainty (N, k) of each concept in each image, as the seed computes it.

    Args:
        W_maps: (N, k, h, w) raw heatmaps at feature resolution (non-negative), NumPy or CuPy.
        upsample_to: (H, W) to upsample to first (the seed: 224 x 224); None measures the maps at
            feature resolution.
        threshold: pixels with ``up / max(up) >= threshold`` are averaged (the seed: 0.1).

    Returns:
        (N, k) float32 in the namespace of ``W_maps``: mean of the raw upsampled map over the
        selected pixels; 0 where the map is all zero (never NaN).
    """
    xp = get_namespace(W_maps)
    if W_maps.ndim != 4:
        raise ValueError(f"W_maps must be (N, k, h, w), got shape {W_maps.shape}")
    N, k, h, w = (int(s) for s in W_maps.shape)
    maps = W_maps.reshape(N * k, h, w)
    H, W = (h, w) if upsample_to is None else (int(upsample_to[0]), int(upsample_to[1]))
    if xp is np and compiled.AVAILABLE and bool(np.isfinite(maps).all()):
        # (the kernel's sums assume finite maps; others take the NumPy path below)
        taps = []
        for n_in, n_out in ((h, H), (w, W)):
            i0, i1, w0, w1 = _bilinear_taps(n_in, n_out)
            taps += [i0, i1, w0.astype(np.float32), w1.astype(np.float32)]
        flat = np.ascontiguousarray(maps, dtype=np.float32)
        out_host = np.zeros(N * k, dtype=np.float32)
        thr = np.float32(threshold)
        compiled.split_run(lambda a, b: _certainty_kernel(flat[a:b], *taps, thr, out_host[a:b]),
                           N * k, min_items=16)
        return out_host.reshape(N, k)
    out = xp.zeros(N * k, dtype=xp.float32)
    step = max(1, _CHUNK_BYTES // (4 * H * W))
    for start in range(0, N * k, step):
        block = maps[start : start + step].astype(xp.float32)
        up = block if upsample_to is None else upsample_bilinear(block, (H, W))
        peak = xp.max(up, axis=(1, 2))  # (m,)
        positive = peak > 0
        # Divide as the seed does (then compare), with 1 standing in for a zero max so that an
        # all-zero map yields no selected pixel instead of NaN.
        norm = up / xp.where(positive, peak, 1)[:, None, None]
        mask = norm >= threshold
        count = xp.sum(mask, axis=(1, 2))
        total = xp.sum(xp.where(mask, up, 0), axis=(1, 2), dtype=xp.float64)
        ok = positive & (count > 0)
        out[start : start + step] = xp.where(ok, total / xp.maximum(count, 1), 0).astype(xp.float32)
    return out.reshape(N, k)


# Sums and maxima may be reordered (vectorised); no other arithmetic is changed, so each
# pixel's value and its "divide, then compare" test are those of a plain loop.
@compiled.jit(fastmath={"reassoc", "nsz", "nnan", "ninf"})
def _certainty_kernel(maps, yi0, yi1, yw0, yw1, xi0, xi1, xw0, xw1, threshold, out):
    """out[m] = certainty of maps[m] (h, w) upsampled to (len(yi0), len(xi0)); see the module
    doc. float32 pixels, float64 sum of the selected ones. Maps must be finite."""
    n_maps, h, _ = maps.shape
    H = yi0.shape[0]
    W = xi0.shape[0]
    rows = np.empty((h, W), dtype=np.float32)  # the map upsampled along x
    line = np.empty(W, dtype=np.float32)
    zero = np.float32(0.0)
    for m in range(n_maps):
        for r in range(h):
            for x in range(W):
                rows[r, x] = xw0[x] * maps[m, r, xi0[x]] + xw1[x] * maps[m, r, xi1[x]]
        peak = zero
        for y in range(H):
            a, b = yw0[y], yw1[y]
            r0, r1 = yi0[y], yi1[y]
            for x in range(W):
                v = a * rows[r0, x] + b * rows[r1, x]
                peak = v if v > peak else peak
        if not peak > zero:
            out[m] = 0.0
            continue
        count = 0
        total = 0.0
        for y in range(H):
            a, b = yw0[y], yw1[y]
            r0, r1 = yi0[y], yi1[y]
            for x in range(W):
                line[x] = a * rows[r0, x] + b * rows[r1, x]
            for x in range(W):
                v = line[x]
                keep = v / peak >= threshold  # divide, then compare, as the seed does
                count += 1 if keep else 0
                total += np.float64(v) if keep else 0.0
        out[m] = np.float32(total / count) if count > 0 else 0.0


@compiled.register_warmer
def _warm_up() -> None:
    concept_certainty(np.ones((1, 1, 2, 2), dtype=np.float32), (4, 4))

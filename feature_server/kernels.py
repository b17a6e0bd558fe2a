"""The feature server's compiled kernels (Numba: no GIL, cached on disk).

* :func:`count_rows` / :func:`fill_rows`: a dense (C, P) activation plane, float32 or float16
  (a half-IO session's) read as its bits, as CSR rows over its P positions
  (:mod:`feature_server.sparse`).
* :func:`half_to_float`: IEEE float16 -> float32, exact for every one of the 65536 halves
  (NaN payloads included; tested exhaustively). NumPy's own cast runs ~3x slower, and the
  server widens float16 prepared inputs for models that take float32 (:mod:`.extractor`).
* :func:`float_to_half`: float32 -> float16 with NumPy's rounding, exactly (checked on all 2^32
  float32 bit patterns), ~3x faster: what a half-IO model's inputs and a float16 wire cost.
* :func:`all_finite`: the finiteness check of a prepared input, read from its bits.

Compiled code is cached in ``NUMBA_CACHE_DIR`` (by default ``~/.cache/dff/numba``, the concept
engine's cache, see ``concept_engine.compiled``; ``/tmp/numba`` in the images). Without Numba,
or with ``DFF_KERNELS=0``, :data:`AVAILABLE` is False and callers take their NumPy paths (same
results). This module imports nothing of the concept engine: the feature server stands alone.
"""

from __future__ import annotations

import os
from types import ModuleType
from typing import Any

import numpy as np

__all__ = ["AVAILABLE", "all_finite", "count_rows", "fill_rows", "float_to_half",
           "half_to_float"]

os.environ.setdefault("NUMBA_CACHE_DIR", os.path.join(
    os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
    "dff", "numba"))

numba: ModuleType | None
try:
    import numba
except ImportError:  # pragma: no cover - exercised only where numba is not installed
    numba = None

#: True when the compiled kernels are used (Numba importable and not switched off).
AVAILABLE = numba is not None and os.environ.get("DFF_KERNELS", "1") != "0"


def _compile(fn: Any) -> Any:
    if numba is None:
        return fn
    try:
        return numba.njit(nogil=True, cache=True, boundscheck=False)(fn)
    except Exception:  # noqa: BLE001 - an unusable cache directory must not break the import
        return numba.njit(nogil=True, boundscheck=False)(fn)


def _count_rows(bits: np.ndarray, mask: Any, indptr: np.ndarray) -> int:
    """indptr[p] = non-zeros before position p (p = 0..P); returns the total. ``bits``: the
    (C, P) plane's float bit patterns (uint32 for float32, uint16 for float16); ``mask``: every
    bit but the sign (non-zero then reads as for floats: -0.0 is zero, NaN is not)."""
    c, p_count = bits.shape
    n = 0
    for p in range(p_count):
        indptr[p] = n
        for ch in range(c):
            n += (bits[ch, p] & mask) != 0
    indptr[p_count] = n
    return n


def _fill_rows(bits: np.ndarray, mask: Any, indptr: np.ndarray, indices: np.ndarray,
               values: np.ndarray) -> None:
    """Each position's non-zero channels and values (their bits, as ``bits``), in order, at
    indptr[p]."""
    c, p_count = bits.shape
    for p in range(p_count):
        n = indptr[p]
        for ch in range(c):
            v = bits[ch, p]
            if (v & mask) != 0:
                indices[n] = ch
                values[n] = v
                n += 1


def _all_finite_bits(bits: np.ndarray, exponent: Any) -> bool:
    """True when no float bit pattern (uint16 for float16, uint32 for float32) has the
    all-ones ``exponent`` (inf or NaN)."""
    bad = 0
    for i in range(bits.size):
        bad |= (bits[i] & exponent) == exponent
    return bad == 0


def _half_bits_to_float_bits(src: np.ndarray, dst: np.ndarray) -> None:
    """src: uint16 IEEE half bit patterns; dst: uint32, the float32 bit patterns of the same
    values (sign, exponent rebiased 15 -> 127, mantissa shifted; subnormal halves normalised,
    inf and NaN kept with their payload)."""
    for i in range(src.size):
        h = np.uint32(src[i])
        sign = (h & np.uint32(0x8000)) << np.uint32(16)
        exponent = (h >> np.uint32(10)) & np.uint32(0x1F)
        mantissa = h & np.uint32(0x3FF)
        if exponent == 0:
            if mantissa == 0:
                dst[i] = sign
            else:
                e = np.uint32(113)  # 127 - 15 + 1: the exponent of 2^-14, then normalise
                while (mantissa & np.uint32(0x400)) == 0:
                    mantissa <<= np.uint32(1)
                    e -= np.uint32(1)
                dst[i] = sign | (e << np.uint32(23)) | ((mantissa & np.uint32(0x3FF))
                                                        << np.uint32(13))
        elif exponent == 31:
            dst[i] = sign | np.uint32(0x7F800000) | (mantissa << np.uint32(13))
        else:
            dst[i] = sign | ((exponent + np.uint32(112)) << np.uint32(23)) | (
                mantissa << np.uint32(13))


def _float_bits_to_half_bits(src: np.ndarray, dst: np.ndarray) -> None:
    """src: uint32 IEEE float32 bit patterns; dst: uint16, the float16 bit patterns NumPy's
    cast gives: rounded to nearest, ties to even; beyond the largest half an infinity; NaN kept
    NaN with the top of its payload (checked against NumPy on all 2^32 patterns)."""
    for i in range(src.size):
        f = src[i]
        sign = (f >> np.uint32(16)) & np.uint32(0x8000)
        a = f & np.uint32(0x7FFFFFFF)
        if a >= np.uint32(0x47800000):  # at least 2^16: infinity, or NaN
            if a > np.uint32(0x7F800000):
                m = (a & np.uint32(0x007FFFFF)) >> np.uint32(13)
                if m == 0:
                    m = np.uint32(1)  # a payload in the dropped bits only: still NaN
                dst[i] = np.uint16(sign | np.uint32(0x7C00) | m)
            else:
                dst[i] = np.uint16(sign | np.uint32(0x7C00))
        elif a < np.uint32(0x38800000):  # below 2^-14: a subnormal half, or zero
            if a < np.uint32(0x33000000):  # at most half the smallest subnormal: zero
                dst[i] = np.uint16(sign)
            else:
                m = (a & np.uint32(0x007FFFFF)) | np.uint32(0x00800000)
                shift = np.uint32(126) - (a >> np.uint32(23))  # 14..24 bits dropped
                half = m >> shift
                rest = m & ((np.uint32(1) << shift) - np.uint32(1))
                tie = np.uint32(1) << (shift - np.uint32(1))
                if rest > tie or (rest == tie and (half & np.uint32(1)) != 0):
                    half += np.uint32(1)
                dst[i] = np.uint16(sign | half)
        else:  # a normal half: exponent rebiased, 13 bits dropped (a carry may reach inf)
            h = (a - np.uint32(0x38000000)) >> np.uint32(13)
            rest = a & np.uint32(0x1FFF)
            if rest > np.uint32(0x1000) or (rest == np.uint32(0x1000)
                                            and (h & np.uint32(1)) != 0):
                h += np.uint32(1)
            dst[i] = np.uint16(sign | h)


count_rows = _compile(_count_rows)
fill_rows = _compile(_fill_rows)
_half_bits = _compile(_half_bits_to_float_bits)
_float_bits = _compile(_float_bits_to_half_bits)
_finite_bits = _compile(_all_finite_bits)
#: the all-ones exponent of each float type, as its bits' type
_EXPONENTS = {np.dtype(np.float16): np.uint16(0x7C00), np.dtype(np.float32): np.uint32(0x7F800000)}


def all_finite(array: np.ndarray) -> bool:
    """Whether every value of a float array is finite, read from its bits: no temporary array
    (NumPy's isfinite(x).all() allocates one of bools, and on float16 takes ~190 us for one
    3 x 224 x 224 input; this takes ~7 us)."""
    exponent = _EXPONENTS.get(array.dtype)
    if exponent is None or not AVAILABLE:
        return bool(np.isfinite(array).all())
    bits = np.ascontiguousarray(array).view(type(exponent)).reshape(-1)
    return bool(_finite_bits(bits, exponent))


def half_to_float(array: np.ndarray) -> np.ndarray:
    """A float16 array as a new float32 array of the same shape and exactly the same values."""
    half = np.ascontiguousarray(array, dtype=np.float16)
    if not AVAILABLE:
        return half.astype(np.float32)
    out = np.empty(half.shape, np.float32)
    _half_bits(half.view(np.uint16).reshape(-1), out.view(np.uint32).reshape(-1))
    return out


def float_to_half(array: np.ndarray) -> np.ndarray:
    """A float32 array (other dtypes are cast to float32 first) as a new float16 array with
    exactly NumPy's rounding (``astype(np.float16)``), ~3x faster: 73 us against 232 us for a
    3 x 224 x 224 input."""
    single = np.ascontiguousarray(array, dtype=np.float32)
    if not AVAILABLE:
        with np.errstate(over="ignore"):
            return single.astype(np.float16)
    out = np.empty(single.shape, np.float16)
    _float_bits(single.view(np.uint32).reshape(-1), out.view(np.uint16).reshape(-1))
    return out

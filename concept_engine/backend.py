"""Array backend: NumPy on the host, CuPy on a CUDA device.

The numeric code of the concept engine is written once over an array namespace ``xp`` that it
obtains from its inputs with :func:`get_namespace`. This module is the only place that imports
CuPy, so a CPU-only installation never needs it, and the only place that copies between host
and device (:func:`to_host`, :func:`to_device`); the compute modules call these at their I/O
boundaries only.

SciPy sparse matrices are host arrays: :func:`get_namespace` maps them to NumPy.

``DFF_GPU=0`` in the environment keeps every computation on the host even where CuPy sees a
device (``DFF_GPU=1``, the default, uses it when present).
"""

from __future__ import annotations

import functools
import os
from types import ModuleType
from typing import Any

import numpy as np
import scipy.sparse as sp

__all__ = [
    "compute_namespace",
    "get_namespace",
    "gpu_available",
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

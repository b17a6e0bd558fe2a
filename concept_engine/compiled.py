"""Numba, set up once for the engine's compiled kernels (:mod:`concept_engine.csr_kernels`).

* Compiled code is cached on disk: ``NUMBA_CACHE_DIR``, by default ``$XDG_CACHE_HOME/dff/numba``
  or ``~/.cache/dff/numba`` (the container images point it at ``/tmp/numba``). Only the first
  process on a machine compiles (~5 s for all kernels); later ones load them (~0.3 s), and
  :func:`warm_up` does that on a background thread while features are extracted.
* LLVM's SLP vectoriser is switched on (Numba leaves it off): it is what turns the kernels'
  8-column register blocks into single vector operations (measured: ~2x on the CSR sweeps).
* Numba is optional. Without it, or with ``DFF_KERNELS=0``, :data:`AVAILABLE` is False and
  every caller takes its NumPy/SciPy path (same results up to float rounding).
"""

from __future__ import annotations

import concurrent.futures
import functools
import logging
import os
import threading
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

__all__ = ["AVAILABLE", "jit", "run_parts", "split_run", "warm_up"]

log = logging.getLogger(__name__)


def _default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "dff", "numba")


os.environ.setdefault("NUMBA_CACHE_DIR", _default_cache_dir())
os.environ.setdefault("NUMBA_SLP_VECTORIZE", "1")

numba: ModuleType | None
try:
    import numba
    import numba.core.config as _numba_config

    if os.environ["NUMBA_SLP_VECTORIZE"] != "0":
        _numba_config.SLP_VECTORIZE = 1  # type: ignore[attr-defined]  # configured earlier
except ImportError:  # pragma: no cover - exercised only where numba is not installed
    numba = None

#: True when the compiled kernels are used (Numba importable and not switched off).
AVAILABLE = numba is not None and os.environ.get("DFF_KERNELS", "1") != "0"

_WARMERS: list[Callable[[], None]] = []
_warm_lock = threading.Lock()
_warm_thread: threading.Thread | None = None


def jit(fn: Any = None, **options: Any) -> Any:
    """``numba.njit`` (no GIL, cached, no bounds checks, plus ``options``); the plain function
    without Numba. Use as ``@jit`` or ``@jit(fastmath={"reassoc"})``."""
    if fn is None:
        return lambda f: jit(f, **options)
    if numba is None:
        return fn
    try:
        return numba.njit(nogil=True, cache=True, boundscheck=False, **options)(fn)
    except Exception:  # noqa: BLE001 - an unusable cache directory must not break the import
        return numba.njit(nogil=True, boundscheck=False, **options)(fn)


@functools.cache
def _pool() -> concurrent.futures.ThreadPoolExecutor:
    return concurrent.futures.ThreadPoolExecutor(max_workers=max(1, (os.cpu_count() or 1) - 1),
                                                 thread_name_prefix="dff-kernel")


def run_parts(fn: Callable[..., Any], parts: Sequence[tuple[Any, ...]],
              pool: concurrent.futures.Executor | None = None) -> list[Any]:
    """``[fn(*p) for p in parts]`` with the first part on this thread and the others on
    ``pool`` (default: a shared one of cores - 1 threads), results in order. fn must release
    the GIL (a ``nogil`` kernel, NumPy, SciPy) for the parts to overlap."""
    if len(parts) == 1:
        return [fn(*parts[0])]
    pool = pool if pool is not None else _pool()
    rest = [pool.submit(fn, *p) for p in parts[1:]]
    first = fn(*parts[0])
    return [first, *(f.result() for f in rest)]


def split_run(fn: Callable[[int, int], Any], n: int, min_items: int = 1) -> list[Any]:
    """fn(start, stop) over range(n) cut into one contiguous part per core (parts of at least
    min_items), with :func:`run_parts`; the parts' results in order."""
    count = max(1, min(os.cpu_count() or 1, n // max(min_items, 1)))
    cuts = [n * i // count for i in range(count + 1)]
    return run_parts(fn, list(zip(cuts[:-1], cuts[1:], strict=True)))


def register_warmer(fn: Callable[[], None]) -> Callable[[], None]:
    """Mark fn (no arguments; calls kernels on tiny inputs) to be run by :func:`warm_up`."""
    _WARMERS.append(fn)
    return fn


def _warm_all() -> None:
    # importing the kernel modules registers their warmers
    import concept_engine.certainty  # noqa: F401, PLC0415
    import concept_engine.csr_kernels  # noqa: F401, PLC0415

    for fn in list(_WARMERS):
        try:
            fn()
        except Exception:  # noqa: BLE001 - a warm-up failure only costs the time it saves
            log.debug("kernel warm-up failed", exc_info=True)


def warm_up(background: bool = True) -> threading.Thread | None:
    """Load (or compile) every kernel now, once per process, by default on a daemon thread,
    so that the first fit does not wait for it. Returns the thread (None when there is
    nothing to do or ``background`` is False)."""
    global _warm_thread
    if not AVAILABLE:
        return None
    with _warm_lock:
        if _warm_thread is not None:
            return None
        _warm_thread = threading.Thread(target=_warm_all, name="dff-kernel-warm-up",
                                        daemon=True)
        if background:
            _warm_thread.start()
            return _warm_thread
    _warm_all()
    return None

"""How a feature-server process waits for its GPU: the CUDA primary context's scheduling flag,
set through the driver API before ONNX Runtime (or CuPy) creates that context.

CUDA's default (``auto``) spins a core while a thread waits for the device whenever the process
has fewer contexts than the machine has cores - always, for a server. A feature server waits for
every batch (IO binding copies the activations back synchronously), and with several worker
processes on one GPU (``--workers N``) the device runs their batches in turn, so each worker
would spin through the others' batches too, taking the cores their decoding, batching and
serialisation need. ``block`` (the default here) makes the waiting thread sleep until the device
is done: a few microseconds more per batch of ~10 ms, and the core is free meanwhile.

``DFF_CUDA_SYNC`` = ``block`` (default), ``spin``, ``yield`` or ``auto`` (CUDA's own choice);
``DFF_LIBCUDA`` names the driver library (default ``libcuda.so.1``; tests point it at a stand-in).
Nothing happens where there is no CUDA driver."""

from __future__ import annotations

import ctypes
import logging
import os
import threading

from dff_protos.errors import InvalidInput

log = logging.getLogger(__name__)

#: CUctx_flags' scheduling values (cuda.h): CU_CTX_SCHED_AUTO, _SPIN, _YIELD, _BLOCKING_SYNC
SCHED_FLAGS = {"auto": 0x00, "spin": 0x01, "yield": 0x02, "block": 0x04}
SCHED_MASK = 0x07

_lock = threading.Lock()
_done: dict[str, str] = {}  # mode -> outcome, once per process


def sync_mode() -> str:
    mode = os.environ.get("DFF_CUDA_SYNC", "block").strip().lower() or "block"
    if mode not in SCHED_FLAGS:
        raise InvalidInput(f"DFF_CUDA_SYNC={mode!r}: one of {sorted(SCHED_FLAGS)}")
    return mode


def set_sync_mode(mode: str | None = None) -> str:
    """Give every visible device's primary context the scheduling flag of ``mode`` (default
    :func:`sync_mode`); once per process. Returns what happened, in words (logged)."""
    mode = mode or sync_mode()
    if mode not in SCHED_FLAGS:
        raise InvalidInput(f"CUDA sync mode {mode!r}: one of {sorted(SCHED_FLAGS)}")
    with _lock:
        if mode not in _done:
            _done[mode] = _apply(mode)
            log.info("CUDA sync mode %s: %s", mode, _done[mode])
        return _done[mode]


def load_driver() -> tuple[ctypes.CDLL | None, str]:
    """The CUDA driver library, initialised; or None and why not."""
    try:
        lib = ctypes.CDLL(os.environ.get("DFF_LIBCUDA") or "libcuda.so.1")
    except OSError:
        return None, "no CUDA driver here"
    rc = lib.cuInit(ctypes.c_uint(0))
    if rc != 0:
        return None, f"cuInit failed (CUresult {rc})"
    return lib, ""


def _apply(mode: str) -> str:
    lib, why = load_driver()
    if lib is None:
        return why
    c_int, c_uint, ref = ctypes.c_int, ctypes.c_uint, ctypes.byref
    count = c_int(0)
    rc = lib.cuDeviceGetCount(ref(count))
    if rc != 0:
        return f"cuDeviceGetCount failed (CUresult {rc})"
    # the _v2 entry point (CUDA >= 11) may change the flags of an active primary context too
    set_flags = getattr(lib, "cuDevicePrimaryCtxSetFlags_v2", None) \
        or lib.cuDevicePrimaryCtxSetFlags
    done = []
    for ordinal in range(count.value):
        device, flags, active = c_int(0), c_uint(0), c_int(0)
        rc = lib.cuDeviceGet(ref(device), c_int(ordinal))
        if rc == 0:
            rc = lib.cuDevicePrimaryCtxGetState(device, ref(flags), ref(active))
        if rc == 0:
            rc = set_flags(device, c_uint((flags.value & ~SCHED_MASK) | SCHED_FLAGS[mode]))
        done.append(f"device {ordinal} " + ("set" if rc == 0 else f"failed (CUresult {rc})"))
    return ", ".join(done) or "no CUDA device"

"""Page-locked ("pinned") host memory for the batches a GPU session copies in and out.

A copy between the GPU and ordinary (pageable) host memory goes through the driver's staging
buffers, one chunk at a time, and holds the calling thread meanwhile; between the GPU and
page-locked memory it is one DMA transfer at the bus's pace. On the H200, fp16 VGG-19 cut at
conv5_4 ran 6826 img/s with its input already on the device and 2357 img/s with the copies from
and to pageable memory: the copies took most of each batch's time.

:class:`PinnedPool` hands out NumPy arrays over blocks allocated with the CUDA driver API
(``cuMemHostAlloc``, portable: pinned for every context of the process) and takes each block
back when the last array over it is gone, for the next batch. ONNX Runtime is given those
arrays by pointer (IO binding), so it copies the batch from, and the activations into, the
pinned blocks directly; nothing else changes (the same bytes, the same values).

Blocks are kept by size class (powers of two); their total is capped (``DFF_PINNED_MB``,
default 1024 MiB per process). A block of a new size that would pass the cap first frees unlent
blocks of other sizes; past the cap even so, or when the driver refuses, an array is ordinary
memory: slower copies, same results.
``DFF_PINNED=0`` turns the pool off (the A/B switch of the device check); ``=1`` turns it on
where the provider is not a GPU one too (tests, with a stand-in driver: ``DFF_LIBCUDA``)."""

from __future__ import annotations

import ctypes
import logging
import os
import queue
import threading
import weakref

import numpy as np

from feature_server.cuda import load_driver

log = logging.getLogger(__name__)

#: cuMemHostAlloc's CU_MEMHOSTALLOC_PORTABLE: pinned for every CUDA context, not one
PORTABLE = 0x01
MIN_BLOCK = 1 << 16
DEFAULT_LIMIT_MB = 1024


class _Block:
    """One pinned allocation (kept by the pool, handed out again and again)."""

    __slots__ = ("ptr", "nbytes")

    def __init__(self, ptr: int, nbytes: int) -> None:
        self.ptr, self.nbytes = ptr, nbytes


class _Lease:
    """One hand-out of a block: the arrays over it reach it through ``.base`` and keep it
    alive; when the last of them is gone, the block goes back to the pool."""

    __slots__ = ("block", "pool", "__weakref__")

    def __init__(self, block: _Block, pool: PinnedPool) -> None:
        self.block, self.pool = block, pool

    @property
    def __array_interface__(self) -> dict:
        return {"shape": (self.block.nbytes,), "typestr": "|u1",
                "data": (self.block.ptr, False), "version": 3}


class PinnedPool:
    """Pinned host arrays from the CUDA driver ``lib``, pooled; see the module's text."""

    def __init__(self, lib: ctypes.CDLL, limit_bytes: int, device: int = 0) -> None:
        self._lib = lib
        self.limit_bytes = limit_bytes
        self._lock = threading.Lock()
        self._free: dict[int, list[_Block]] = {}
        # blocks given back by finalisers, which may run in any thread at any allocation
        # (cyclic GC), also while this pool's lock is held: a SimpleQueue's put is reentrant
        self._returned: queue.SimpleQueue[_Block] = queue.SimpleQueue()
        self._ctx = ctypes.c_void_p()
        dev = ctypes.c_int(0)
        rc = lib.cuDeviceGet(ctypes.byref(dev), ctypes.c_int(device))
        if rc == 0:
            rc = lib.cuDevicePrimaryCtxRetain(ctypes.byref(self._ctx), dev)
        if rc != 0:
            raise OSError(f"no primary context on device {device} (CUresult {rc})")
        self.pinned_bytes = 0   # allocated from the driver (in use or free)
        self.allocations = 0    # blocks allocated
        self.reuses = 0         # arrays served from a returned block
        self.fallbacks = 0      # arrays in ordinary memory (cap reached or driver refused)
        self.evictions = 0      # unlent blocks freed to make room for another size

    # ------------------------------------------------------------------ arrays
    def empty(self, shape: tuple[int, ...], dtype: np.dtype | type) -> np.ndarray:
        """An uninitialised C-contiguous array, pinned when a block is to be had."""
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        block = self._take(nbytes)
        if block is None:
            return np.empty(shape, dtype)
        lease = _Lease(block, self)
        # the block comes back when the last array over this lease is gone (in any thread)
        weakref.finalize(lease, self._give_back, block)
        raw = np.asarray(lease)  # a uint8 array whose base is the lease
        return raw[:nbytes].view(dtype).reshape(shape)

    def owns(self, array: np.ndarray) -> bool:
        """Whether ``array`` lies in one of this pool's blocks."""
        base: object = array
        while isinstance(base, np.ndarray):
            base = base.base
        return isinstance(base, _Lease) and base.pool is self

    def stats(self) -> dict[str, int]:
        with self._lock:
            self._drain()
            free = sum(b.nbytes for blocks in self._free.values() for b in blocks)
            return {"pinned_bytes": self.pinned_bytes, "free_bytes": free,
                    "allocations": self.allocations, "reuses": self.reuses,
                    "fallbacks": self.fallbacks, "evictions": self.evictions}

    # ------------------------------------------------------------------ blocks
    def _take(self, nbytes: int) -> _Block | None:
        size = max(MIN_BLOCK, 1 << max(0, nbytes - 1).bit_length())
        with self._lock:
            self._drain()
            blocks = self._free.get(size)
            if blocks:
                self.reuses += 1
                return blocks.pop()
            if self.pinned_bytes + size > self.limit_bytes:
                self._evict(self.pinned_bytes + size - self.limit_bytes)
            made = (self._allocate(size) if self.pinned_bytes + size <= self.limit_bytes
                    else None)
            if made is None:
                self.fallbacks += 1
            return made

    def _in_context(self, function: str, *args: object) -> int:
        """A driver call with the device's primary context current (the call's CUresult, or
        the push's when it fails)."""
        rc = self._lib.cuCtxPushCurrent_v2(self._ctx)
        if rc != 0:
            return rc
        try:
            return getattr(self._lib, function)(*args)
        finally:
            self._lib.cuCtxPopCurrent_v2(ctypes.byref(ctypes.c_void_p()))

    def _allocate(self, size: int) -> _Block | None:
        ptr = ctypes.c_void_p()
        rc = self._in_context("cuMemHostAlloc", ctypes.byref(ptr), ctypes.c_size_t(size),
                              ctypes.c_uint(PORTABLE))
        if rc != 0 or not ptr.value:
            log.warning("pinned host memory: cuMemHostAlloc of %d bytes failed (CUresult %d); "
                        "ordinary memory from now on", size, rc)
            self.limit_bytes = self.pinned_bytes  # no further tries
            return None
        self.pinned_bytes += size
        self.allocations += 1
        return _Block(ptr.value, size)

    def _evict(self, nbytes: int) -> None:
        """Free unlent blocks of other sizes, largest first, until ``nbytes`` are freed or
        none is left (batch sizes change: a size class no batch uses any more would hold the
        cap's room for good)."""
        free = sorted((b for blocks in self._free.values() for b in blocks),
                      key=lambda b: -b.nbytes)
        freed = 0
        for block in free:
            if freed >= nbytes:
                break
            if self._in_context("cuMemFreeHost", ctypes.c_void_p(block.ptr)) != 0:
                return
            self._free[block.nbytes].remove(block)
            self.pinned_bytes -= block.nbytes
            self.evictions += 1
            freed += block.nbytes

    def _give_back(self, block: _Block) -> None:
        self._returned.put(block)

    def _drain(self) -> None:
        """Blocks given back since, onto their free lists (the lock held)."""
        while True:
            try:
                block = self._returned.get_nowait()
            except queue.Empty:
                return
            self._free.setdefault(block.nbytes, []).append(block)


_pool_lock = threading.Lock()
_pool: dict[str, PinnedPool | None] = {}


def pool(gpu_provider: bool) -> PinnedPool | None:
    """This process's pool, or None: off (``DFF_PINNED=0``), not a GPU provider (unless
    ``DFF_PINNED=1``), or no CUDA driver or device."""
    setting = os.environ.get("DFF_PINNED", "").strip()
    if setting == "0" or (setting != "1" and not gpu_provider):
        return None
    with _pool_lock:
        if "pool" not in _pool:
            _pool["pool"] = _make()
        return _pool["pool"]


def _make() -> PinnedPool | None:
    lib, why = load_driver()
    if lib is None:
        log.info("pinned host memory: %s; ordinary memory", why)
        return None
    try:
        limit = int(float(os.environ.get("DFF_PINNED_MB", DEFAULT_LIMIT_MB)) * (1 << 20))
    except ValueError:
        log.warning("DFF_PINNED_MB=%r is not a number; %d MiB", os.environ["DFF_PINNED_MB"],
                    DEFAULT_LIMIT_MB)
        limit = DEFAULT_LIMIT_MB << 20
    try:
        made = PinnedPool(lib, limit)
    except (OSError, AttributeError) as exc:
        log.info("pinned host memory: %s; ordinary memory", exc)
        return None
    log.info("pinned host memory: up to %d MiB per process", limit >> 20)
    return made

"""feature_server.pinned: batches and activations of a GPU session in page-locked host memory.

Without a GPU the driver is a stand-in compiled here, whose "pinned" blocks are ordinary aligned
allocations and which insists, as CUDA does, on a current context for each allocation. With it
the IO-binding path runs on the CPU provider exactly as on a GPU (pointers bound, shapes learnt
on the first run); the gpu test runs it on CUDA against the real driver."""

from __future__ import annotations

import gc
import logging

import numpy as np
import pytest

from feature_server import pinned
from feature_server.batching import MicroBatcher
from feature_server.extractor import ExtractOptions, Extractor
from feature_server.pinned import MIN_BLOCK, PinnedPool
from tests.cuda_stand_in import compile_stand_in
from tests.feature_server.test_half_io import photos

STAND_IN = r"""
#include <cstdlib>
extern "C" {
static int allocs_ = 0, frees_ = 0, current_ = 0;
static long limit_ = -1, given_ = 0;
static void* const CTX = (void*)0x1234;
int cuInit(unsigned f) { return f == 0 ? 0 : 1; }
int cuDeviceGet(int* d, int ordinal) { if (ordinal > 0) return 101; *d = 10; return 0; }
int cuDevicePrimaryCtxRetain(void** ctx, int dev) { *ctx = CTX; return dev == 10 ? 0 : 101; }
int cuCtxPushCurrent_v2(void* ctx) { if (ctx != CTX) return 201; current_++; return 0; }
int cuCtxPopCurrent_v2(void** ctx) { current_--; *ctx = CTX; return 0; }
int cuMemHostAlloc(void** p, size_t n, unsigned flags) {
    if (current_ != 1) return 201;  /* CUDA_ERROR_INVALID_CONTEXT */
    if (flags != 1) return 1;       /* only portable blocks are asked for */
    if (limit_ >= 0 && given_ + (long)n > limit_) return 2;  /* CUDA_ERROR_OUT_OF_MEMORY */
    *p = aligned_alloc(4096, n); given_ += n; allocs_++; return 0; }
int cuMemFreeHost(void* p) { if (current_ != 1) return 201; free(p); frees_++; return 0; }
int stub_frees() { return frees_; }
int stub_allocs() { return allocs_; }
int stub_current() { return current_; }
void stub_limit(long n) { limit_ = n; }
}
"""


@pytest.fixture
def driver(tmp_path, monkeypatch):
    lib = compile_stand_in(STAND_IN, tmp_path, monkeypatch)
    monkeypatch.setattr(pinned, "_pool", {})
    return lib


def test_blocks_are_lent_while_any_view_lives_and_then_reused(driver):
    pool = PinnedPool(driver, 64 << 20)
    a = pool.empty((3, 5), np.float32)
    a[:] = np.arange(15, dtype=np.float32).reshape(3, 5)
    assert pool.owns(a) and a.flags.c_contiguous and a.ctypes.data % 4096 == 0
    view = a[1:]
    assert pool.owns(view)
    del a
    gc.collect()
    b = pool.empty((2, 2), np.float32)  # the first block is still lent (the view)
    assert pool.stats()["allocations"] == 2 and driver.stub_allocs() == 2
    np.testing.assert_array_equal(view, np.arange(5, 15, dtype=np.float32).reshape(2, 5))
    del view, b
    gc.collect()
    c = pool.empty((7,), np.float16)
    d = pool.empty(((1 << 20) + 1,), np.uint8)  # a larger size class: a new block
    stats = pool.stats()
    assert (stats["allocations"], stats["reuses"]) == (3, 1)
    assert stats["pinned_bytes"] == 2 * MIN_BLOCK + (2 << 20)
    assert pool.owns(c) and pool.owns(d) and not pool.owns(np.empty(3))
    assert driver.stub_current() == 0  # every push was popped


def test_a_new_size_past_the_cap_frees_unlent_blocks_of_other_sizes(driver):
    pool = PinnedPool(driver, 5 * MIN_BLOCK)
    small = [pool.empty((MIN_BLOCK // 4,), np.float32) for _ in range(3)]  # 3 x 64 KiB
    del small[1:]
    gc.collect()  # two unlent 64 KiB blocks, one lent
    large = pool.empty((MIN_BLOCK // 2 + 1,), np.float32)  # 256 KiB: 128 KiB to free
    stats = pool.stats()
    assert pool.owns(large) and pool.owns(small[0]) and driver.stub_frees() == 2
    assert (stats["evictions"], stats["fallbacks"]) == (2, 0)
    assert stats["pinned_bytes"] == 5 * MIN_BLOCK  # the lent 64 KiB and the 256 KiB
    # the lent block is never freed: past the cap with nothing unlent, ordinary memory
    assert not pool.owns(pool.empty((MIN_BLOCK,), np.float32))
    assert driver.stub_current() == 0


def test_a_block_given_back_while_the_pool_is_busy_does_not_wait(driver):
    """A finaliser may run in the thread that holds the pool's lock (cyclic GC at any
    allocation inside it): giving the block back must not wait for that lock."""
    import threading

    pool = PinnedPool(driver, 64 << 20)
    done = threading.Event()

    def inside_the_lock() -> None:
        a = pool.empty((10,), np.float32)
        with pool._lock:
            del a  # its finaliser runs here, in this thread
        done.set()

    t = threading.Thread(target=inside_the_lock, daemon=True)
    t.start()
    t.join(timeout=10)
    assert done.is_set(), "giving a block back waited for the pool's own lock"
    b = pool.empty((10,), np.float32)
    assert pool.owns(b) and pool.stats()["reuses"] == 1


def test_past_the_cap_or_a_refusal_arrays_are_ordinary(driver, caplog):
    pool = PinnedPool(driver, 2 * MIN_BLOCK)
    held = [pool.empty((100,), np.float32) for _ in range(2)]
    extra = pool.empty((100,), np.float32)
    assert all(pool.owns(h) for h in held) and not pool.owns(extra)
    extra[:] = 1.0
    assert pool.stats()["fallbacks"] == 1
    driver.stub_limit(0)
    refused = PinnedPool(driver, 64 << 20)
    with caplog.at_level(logging.WARNING, logger="feature_server.pinned"):
        first = refused.empty((10,), np.float32)
    assert not refused.owns(first) and "CUresult 2" in caplog.text
    before = driver.stub_allocs()
    refused.empty((10,), np.float32)  # no further tries after a refusal
    assert driver.stub_allocs() == before and refused.stats()["fallbacks"] == 2


def test_the_switch_and_a_missing_driver(driver, monkeypatch, tmp_path):
    monkeypatch.delenv("DFF_PINNED", raising=False)
    assert pinned.pool(gpu_provider=False) is None
    monkeypatch.setenv("DFF_PINNED", "0")
    assert pinned.pool(gpu_provider=True) is None
    monkeypatch.setenv("DFF_PINNED", "1")
    monkeypatch.setenv("DFF_PINNED_MB", "3")
    made = pinned.pool(gpu_provider=False)
    assert isinstance(made, PinnedPool) and made.limit_bytes == 3 << 20
    assert pinned.pool(gpu_provider=True) is made  # one per process
    monkeypatch.setattr(pinned, "_pool", {})
    monkeypatch.setenv("DFF_LIBCUDA", str(tmp_path / "missing.so"))
    assert pinned.pool(gpu_provider=True) is None


@pytest.fixture
def bound(registry, driver, monkeypatch) -> Extractor:
    """The half-IO fp16 extractor with IO binding and a (stand-in) pinned pool, on the CPU."""
    monkeypatch.setenv("DFF_PINNED", "1")
    ex = Extractor(registry, precisions=("fp16",), batch_size=4, half_io=True)
    assert ex.pinned is not None
    ex.io_binding = True
    return ex


def _conv54(ex: Extractor, items) -> dict[str, np.ndarray]:
    out = {}
    for r in ex.extract(items, ExtractOptions(model="vgg19_fp16", wire_dtype="float16")):
        assert r.error is None, r.error
        out[r.id] = np.array(r.activations["conv5_4"])
    return out


def test_pinned_runs_give_the_same_activations(bound):
    items = photos(6)
    pool = bound.pinned
    assert pool is not None
    first = _conv54(bound, items)    # learns the output shapes (batches of 4 and 2)
    again = _conv54(bound, items)    # then binds pinned arrays by pointer
    bound.pinned = None
    plain = _conv54(bound, items)    # the IO-binding path without the pool
    bound.pinned = pool
    for item_id, _ in items:
        np.testing.assert_array_equal(again[item_id], plain[item_id])
        np.testing.assert_array_equal(first[item_id], plain[item_id])
    # the pointer path: the batch and the activations are the pool's
    x = np.stack([np.random.default_rng(i).random((3, 224, 224), np.float32) for i in range(3)])
    batch = bound.stack("vgg19_fp16", ["conv5_4"], list(x))
    assert pool.owns(batch) and batch.dtype == np.float16
    out = bound.run("vgg19_fp16", batch, ["conv5_4"])
    out2 = bound.run("vgg19_fp16", x, ["conv5_4"])  # float32, not pinned: rounded, staged
    assert pool.owns(out[0]) and out[0].shape == (3, 512, 14, 14)
    np.testing.assert_array_equal(out[0], out2[0])
    assert pool.stats()["reuses"] > 0
    # shapes that turn out wrong (a model whose outputs depend on more than the input's shape)
    # are learnt again from the run that finds it out
    (key,) = [k for k in bound._output_shapes if k[1] == (3, 224, 224)]
    bound._output_shapes[key] = [((512, 7, 7), np.dtype(np.float16))]
    out3 = bound.run("vgg19_fp16", batch, ["conv5_4"])
    np.testing.assert_array_equal(out3[0], out[0])
    assert bound._output_shapes[key] == [((512, 14, 14), np.dtype(np.float16))]


def test_a_pinned_binding_that_fails_where_the_plain_one_runs_turns_it_off(bound, monkeypatch,
                                                                          caplog):
    x = np.random.default_rng(0).random((2, 3, 224, 224), np.float32)
    reference = bound.run("vgg19_fp16", x, ["conv5_4"])[0]

    def refused(*args, **kwargs):
        raise RuntimeError("no such binding here")

    monkeypatch.setattr(bound, "_run_pinned", refused)
    with caplog.at_level(logging.WARNING, logger="feature_server.extractor"):
        got = bound.run("vgg19_fp16", x, ["conv5_4"])[0]
    np.testing.assert_array_equal(got, reference)
    assert bound.pinned is None and "pageable memory from now on" in caplog.text
    # a real error (the plain binding fails too) is raised, and leaves the pool on
    bound.pinned = pool = PinnedPool.__new__(PinnedPool)

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("out of device memory")

    monkeypatch.setattr(bound, "_run_to_host", out_of_memory)
    with pytest.raises(RuntimeError, match="out of device memory"):
        bound.run("vgg19_fp16", x, ["conv5_4"])
    assert bound.pinned is pool


def test_the_batcher_stacks_with_the_extractor(bound):
    x = [np.random.default_rng(i).random((3, 224, 224), np.float32) for i in range(3)]
    reference = bound.run("vgg19_fp16", np.stack(x), ["conv5_4"])[0]
    batcher = MicroBatcher(bound.run, max_batch_size=3, max_wait_s=1.0, stack=bound.stack)
    futures = [batcher.submit("vgg19_fp16", a, ("conv5_4",)) for a in x]
    got = [f.result(timeout=60)["conv5_4"] for f in futures]
    batcher.close()
    assert all(bound.pinned.owns(g) for g in got)
    for i in range(3):
        np.testing.assert_array_equal(got[i], reference[i])


@pytest.mark.gpu
def test_pinned_on_cuda_is_bit_identical(registry, monkeypatch):
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("needs the CUDA execution provider")
    monkeypatch.delenv("DFF_PINNED", raising=False)
    ex = Extractor(registry, providers=["CUDAExecutionProvider", "CPUExecutionProvider"],
                   precisions=("fp16",), batch_size=4)
    pool = ex.pinned
    assert pool is not None and ex.io_binding
    items = photos(6)
    _conv54(ex, items)
    again = _conv54(ex, items)
    ex.pinned = None
    plain = _conv54(ex, items)
    for item_id, _ in items:
        np.testing.assert_array_equal(again[item_id], plain[item_id])
    assert pool.stats()["allocations"] > 0 and pool.stats()["reuses"] > 0


@pytest.mark.slow
def test_served_answers_and_every_block_comes_back(bound):
    """The feature server over the pinned extractor: 4 concurrent clients (sparse and dense,
    float16 and float32 wires), one broken file among them, one stream left half read; the
    answers are the in-process ones and, once the answers are made, every block is back."""
    import threading

    from feature_server.client import FeatureClient
    from feature_server.service import ServerConfig, start_server

    items = photos(6)
    broken = [("broken.jpg", items[0][1][:500])]
    running = start_server(ServerConfig(host="127.0.0.1", port=0, max_batch_size=4,
                                        max_wait_ms=20), bound)
    address = f"127.0.0.1:{running.port}"
    forms = [ExtractOptions(model="vgg19_fp16", wire_dtype=w, sparse=sp)
             for w in ("float32", "float16") for sp in (False, True)]
    want = {}
    pool = bound.pinned
    bound.pinned = None  # the reference answers, pageable
    for i, opts in enumerate(forms):
        want[i] = {r.id: np.asarray(r.activations["conv5_4"]) for r in bound.extract(items, opts)}
    bound.pinned = pool
    got: dict[int, dict] = {}
    errors: list = []

    def client(i: int) -> None:
        try:
            with FeatureClient(address, timeout=120) as c:
                got[i] = {r.id: (r.error, r.activations) for r in
                          c.extract(items[:3] + broken + items[3:], forms[i])}
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    try:
        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(forms))]
        for t in threads:
            t.start()
        with FeatureClient(address, timeout=120) as c:  # read one answer, then walk away
            stream = c.extract(items, forms[0])
            next(stream)
            stream.close()
        for t in threads:
            t.join(timeout=300)
        assert not errors, errors
        for i in range(len(forms)):
            assert "broken.jpg" in str(got[i]["broken.jpg"][0]) or got[i]["broken.jpg"][0]
            for item_id, _ in items:
                error, acts = got[i][item_id]
                assert error is None, error
                np.testing.assert_array_equal(np.asarray(acts["conv5_4"]), want[i][item_id])
    finally:
        running.stop(grace=5)
    got.clear()
    want.clear()
    gc.collect()
    stats = pool.stats()
    assert stats["reuses"] > 0 and stats["fallbacks"] == 0
    assert stats["free_bytes"] == stats["pinned_bytes"], stats  # nothing still lent

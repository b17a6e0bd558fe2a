"""The micro-batcher on its own, with a fake model."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from feature_server.batching import MicroBatcher


def fake_run(calls: list):
    def run(model: str, batch: np.ndarray, outputs: list[str]) -> list[np.ndarray]:
        calls.append((model, batch.shape, tuple(outputs)))
        return [batch.sum(axis=(1, 2, 3)) * (k + 1) for k in range(len(outputs))]
    return run


def test_groups_by_shape_and_caps_batch_size():
    calls: list = []
    batcher = MicroBatcher(fake_run(calls), max_batch_size=4, max_wait_s=0.05)
    futures = [batcher.submit("m", np.full((3, 2, 2), i, np.float32), ("a",)) for i in range(6)]
    futures += [batcher.submit("m", np.ones((3, 4, 4), np.float32), ("a", "b"))]
    results = [f.result(timeout=5) for f in futures]
    batcher.close()
    assert [float(r["a"]) for r in results[:6]] == [12.0 * i for i in range(6)]
    assert float(results[6]["b"]) == 96.0
    assert all(size <= 4 for _, (size, *_), _ in calls)
    assert {shape[1:] for _, shape, _ in calls} == {(3, 2, 2), (3, 4, 4)}
    assert batcher.stats.items == 7 and batcher.stats.max_batch >= 2


def test_concurrent_submitters_share_batches():
    calls: list = []
    batcher = MicroBatcher(fake_run(calls), max_batch_size=8, max_wait_s=0.1)
    out: list = []

    def worker(i: int) -> None:
        out.append(batcher.submit("m", np.full((3, 2, 2), i, np.float32), ("a",)).result(5))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    batcher.close()
    assert len(out) == 8
    assert batcher.stats.batches < 8  # several callers were grouped


def test_errors_reach_every_caller_and_close_drains():
    def run(model, batch, outputs):
        raise RuntimeError("boom")

    batcher = MicroBatcher(run, max_batch_size=2, max_wait_s=0.01)
    f = batcher.submit("m", np.zeros((3, 2, 2), np.float32), ("a",))
    with pytest.raises(RuntimeError, match="boom"):
        f.result(timeout=5)
    slow_calls: list = []
    batcher2 = MicroBatcher(fake_run(slow_calls), max_batch_size=100, max_wait_s=10.0)
    g = batcher2.submit("m", np.zeros((3, 2, 2), np.float32), ("a",))
    t0 = time.monotonic()
    batcher2.close()  # does not wait for max_wait: queued work runs at once
    assert g.done() and time.monotonic() - t0 < 5
    batcher.close()

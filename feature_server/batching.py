"""Micro-batching across concurrent streams: one worker thread groups jobs of the same
(model, input shape) into batches of up to ``max_batch_size``, waiting at most ``max_wait_s``
for a batch to fill. The queue is bounded, so producers block instead of piling work up.
Pure Python (no grpc): the servicer and tests use it directly.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np
from dff_protos.errors import NotReady

log = logging.getLogger(__name__)

# run(model, batch (N, 3, H, W) float32, output names) -> one (N, ...) array per output name
RunFn = Callable[[str, np.ndarray, list[str]], list[np.ndarray]]
# stack(model, output names, inputs (3, H, W) of one shape) -> the batch for run
StackFn = Callable[[str, list[str], list[np.ndarray]], np.ndarray]


@dataclass
class _Job:
    model: str
    array: np.ndarray  # (3, H, W)
    outputs: tuple[str, ...]
    future: Future = field(default_factory=Future)
    queued_at: float = field(default_factory=time.monotonic)

    @property
    def key(self) -> Hashable:
        return (self.model, self.array.shape)


@dataclass
class BatcherStats:
    batches: int = 0
    items: int = 0
    max_batch: int = 0


class MicroBatcher:
    """Groups single inputs into batches and runs them on ``run`` in one worker thread.

    ``submit`` returns a Future of ``{output name: (...) array}`` for that one input.
    """

    def __init__(self, run: RunFn, *, max_batch_size: int = 8, max_wait_s: float = 0.005,
                 max_queue: int = 256, on_batch: Callable[[int], None] | None = None,
                 stack: StackFn | None = None) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        self._run = run
        # the Extractor's stack puts a GPU batch in pinned memory; np.stack by default
        self._stack: StackFn = stack or (lambda model, outputs, arrays: np.stack(arrays))
        self._on_batch = on_batch  # called with each batch's size (metrics)
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self._queue: queue.Queue[_Job | None] = queue.Queue(maxsize=max_queue)
        self._closed = False
        self.stats = BatcherStats()
        self._thread = threading.Thread(target=self._loop, name="micro-batcher", daemon=True)
        self._thread.start()

    def submit(self, model: str, array: np.ndarray, outputs: tuple[str, ...]
               ) -> Future[dict[str, np.ndarray]]:
        """Queue one (3, H, W) input; blocks while the queue is full (back-pressure)."""
        if self._closed:
            raise NotReady("the batcher is shut down")
        job = _Job(model, array, tuple(outputs))
        self._queue.put(job)
        return job.future

    def close(self, timeout: float | None = None) -> None:
        """Run what is queued, then stop the worker."""
        if not self._closed:
            self._closed = True
            self._queue.put(None)
        self._thread.join(timeout)

    # ------------------------------------------------------------------ worker
    def _loop(self) -> None:
        pending: dict[Hashable, list[_Job]] = {}
        stopping = False
        while True:
            incoming: list[_Job | None] = []
            if not stopping:
                if pending:
                    oldest = min(jobs[0].queued_at for jobs in pending.values())
                    wait = max(0.0, oldest + self.max_wait_s - time.monotonic())
                else:
                    wait = None
                try:
                    incoming.append(self._queue.get(timeout=wait))
                except queue.Empty:
                    pass
            # take everything already waiting, so work queued during a batch is grouped
            while True:
                try:
                    incoming.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            for job in incoming:
                if job is None:
                    stopping = True
                else:
                    pending.setdefault(job.key, []).append(job)
            now = time.monotonic()
            for key in sorted(pending, key=lambda k: pending[k][0].queued_at):
                jobs = pending[key]
                while len(jobs) >= self.max_batch_size:
                    self._execute(jobs[:self.max_batch_size])
                    jobs = jobs[self.max_batch_size:]
                if jobs and (stopping or now >= jobs[0].queued_at + self.max_wait_s):
                    self._execute(jobs)
                    jobs = []
                if jobs:
                    pending[key] = jobs
                else:
                    del pending[key]
            if stopping and not pending and self._queue.empty():
                return

    def _execute(self, jobs: list[_Job]) -> None:
        jobs = [j for j in jobs if j.future.set_running_or_notify_cancel()]
        if not jobs:
            return
        outputs = sorted({name for j in jobs for name in j.outputs})
        try:
            batch = self._stack(jobs[0].model, outputs, [j.array for j in jobs])
            results = self._run(jobs[0].model, batch, outputs)
        except BaseException as exc:  # noqa: BLE001 - handed to every waiting caller
            for j in jobs:
                j.future.set_exception(exc)
            return
        self.stats.batches += 1
        self.stats.items += len(jobs)
        self.stats.max_batch = max(self.stats.max_batch, len(jobs))
        if self._on_batch is not None:
            self._on_batch(len(jobs))
        for i, j in enumerate(jobs):
            j.future.set_result({name: results[outputs.index(name)][i] for name in j.outputs})

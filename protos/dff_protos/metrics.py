"""Prometheus metrics of a dff server (``--metrics-port N``; 0 = off).

Each server gets its own registry (several servers may run in one process, e.g. in tests):
requests by method and status code, per-item errors by code, the wait for a stream slot,
micro-batch sizes, images answered (a counter: rate() gives images/s), bytes of images in
flight, and the process's resident memory (``process_resident_memory_bytes``).
"""

from __future__ import annotations

import logging
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    start_http_server,
)

log = logging.getLogger(__name__)


class Metrics:
    """The metrics of one server; ``serve_http`` exposes them."""

    def __init__(self, server: str) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("dff_requests", "RPCs by method and final status code",
                                ["server", "method", "code"], registry=r)
        self.item_errors = Counter("dff_item_errors", "per-item errors by code",
                                   ["server", "code"], registry=r)
        self.queue_wait = Histogram("dff_stream_slot_wait_seconds",
                                    "time a stream waited for a slot", ["server"], registry=r,
                                    buckets=(0.001, 0.01, 0.1, 0.5, 1, 2, 5, 10, 30))
        self.batch_size = Histogram("dff_batch_size", "items per micro-batch", ["server"],
                                    registry=r, buckets=(1, 2, 4, 8, 16, 32, 64))
        self.images = Counter("dff_images", "images answered (rate() = images/s)",
                              ["server"], registry=r)
        self.inflight_bytes = Gauge("dff_inflight_bytes",
                                    "bytes of images accepted and not yet answered",
                                    ["server"], registry=r)
        ProcessCollector(registry=r)  # process_resident_memory_bytes, cpu, fds
        self.server = server
        self._http: Any = None

    def request(self, method: str, code: str) -> None:
        self.requests.labels(self.server, method, code).inc()

    def item_error(self, code: str) -> None:
        self.item_errors.labels(self.server, code).inc()

    def serve_http(self, host: str, port: int) -> int:
        """Start the HTTP endpoint (/metrics); returns the bound port."""
        started = start_http_server(port, addr=host.strip("[]"), registry=self.registry)
        if isinstance(started, tuple):
            self._http = started[0]
            bound = int(self._http.server_port)
        else:  # an older prometheus-client returns nothing
            bound = port
        log.info("metrics on http://%s:%d/metrics", host, bound)
        return bound

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None

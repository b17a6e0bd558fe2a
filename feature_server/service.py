"""The gRPC feature service: a thin servicer over :class:`feature_server.extractor.Extractor`
plus ``serve()`` (options, health, reflection, micro-batcher, graceful SIGTERM).

Per stream, a reader thread takes requests (options, images), decodes and preprocesses each
image and submits it to the shared micro-batcher; the RPC's own thread turns finished items
into responses. A per-stream semaphore bounds the items read but not yet answered, so a fast
client cannot make the server read unboundedly ahead (flow control).
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
from dff_protos import serving
from dff_protos.errors import DFFError, InvalidInput, ResourceExhausted
from dff_protos.status import map_errors
from dff_protos.v1 import features_pb2, features_pb2_grpc
from grpc_health.v1 import health

from feature_server.batching import MicroBatcher
from feature_server.convert import (
    describe_to_proto,
    item_error,
    options_from_proto,
    result_to_proto,
)
from feature_server.extractor import ExtractOptions, Extractor, Prepared
from feature_server.images import DEFAULT_FORMATS, DecodeLimits

log = logging.getLogger(__name__)

SERVER_VERSION = "0.1.0"


@dataclass(frozen=True)
class ServerConfig:
    """Everything ``dff serve features`` is configured with (built once at the entry point)."""

    host: str = "[::]"
    port: int = 50051
    home: str | None = None
    providers: tuple[str, ...] = ()
    max_batch_size: int = 8
    max_wait_ms: float = 5.0
    max_pixels: int = 50_000_000
    max_message_mb: int = 64
    max_concurrent_streams: int = 16
    max_inflight_per_stream: int = 16
    max_queue: int = 256
    formats: frozenset[str] = field(default=DEFAULT_FORMATS)
    grace_s: float = 30.0
    decode_workers: int = 0  # threads decoding images for all streams; 0 = min(8, cores)
    intra_op_threads: int = 0

    @property
    def max_message_bytes(self) -> int:
        return self.max_message_mb * 1024 * 1024

    @property
    def limits(self) -> DecodeLimits:
        return DecodeLimits(max_pixels=self.max_pixels, max_bytes=self.max_message_bytes,
                            formats=self.formats)


# ---------------------------------------------------------------------- the servicer
class _Stream:
    """Book-keeping of one Extract call: bounded in-flight items and the response queue."""

    _END = object()

    def __init__(self, max_inflight: int) -> None:
        self.slots = threading.Semaphore(max_inflight)
        self.out: queue.Queue[Any] = queue.Queue()
        self._lock = threading.Lock()
        self._pending = 0
        self._reading = True
        self.stop = threading.Event()
        self.futures: set[futures.Future] = set()  # submitted to the batcher, not yet done

    def cancel_pending(self) -> int:
        """Cancel queued batcher work of a stream that is gone; returns how many."""
        with self._lock:
            pending = list(self.futures)
        return sum(f.cancel() for f in pending)

    def started(self) -> None:
        with self._lock:
            self._pending += 1

    def put(self, item: Any) -> None:
        self.out.put(item)
        with self._lock:
            self._pending -= 1
            end = not self._reading and self._pending == 0
        if end:
            self.out.put(self._END)

    def reading_done(self) -> None:
        with self._lock:
            self._reading = False
            end = self._pending == 0
        if end:
            self.out.put(self._END)


class FeatureServicer(features_pb2_grpc.FeatureServiceServicer):
    """dff.v1.FeatureService over an Extractor and a shared MicroBatcher."""

    def __init__(self, extractor: Extractor, batcher: MicroBatcher, config: ServerConfig
                 ) -> None:
        self.extractor = extractor
        self.batcher = batcher
        self.config = config
        self._streams = threading.BoundedSemaphore(config.max_concurrent_streams)
        self._decoders = futures.ThreadPoolExecutor(
            max_workers=config.decode_workers or min(8, os.cpu_count() or 1),
            thread_name_prefix="decode")

    @map_errors
    def DescribeModel(self, request: features_pb2.DescribeModelRequest,  # noqa: N802
                      context: grpc.ServicerContext) -> features_pb2.DescribeModelResponse:
        return describe_to_proto(self.extractor.describe(), self.config, SERVER_VERSION)

    @map_errors
    def Extract(self, request_iterator: Iterator[features_pb2.ExtractRequest],  # noqa: N802
                context: grpc.ServicerContext) -> Iterator[features_pb2.ExtractResponse]:
        if not self._streams.acquire(blocking=False):
            raise ResourceExhausted(f"more than {self.config.max_concurrent_streams} "
                                    "concurrent Extract streams; retry later")
        try:
            stream = _Stream(self.config.max_inflight_per_stream)
            reader = threading.Thread(target=self._read, args=(request_iterator, context, stream),
                                      name="extract-reader", daemon=True)
            reader.start()
            started, answered, failed = time.monotonic(), 0, 0
            try:
                while True:
                    item = stream.out.get()
                    if item is _Stream._END:
                        break
                    stream.slots.release()
                    resp = self._respond(item)
                    answered += 1
                    failed += resp.HasField("error")
                    yield resp
                log.debug("stream from %s done: %d items (%d errors) in %.2fs", context.peer(),
                          answered, failed, time.monotonic() - started)
            finally:
                stream.stop.set()
                stream.slots.release()  # unblock a reader waiting for a slot
                cancelled = stream.cancel_pending()
                if cancelled:
                    log.info("stream ended early: %d queued items cancelled", cancelled)
        finally:
            self._streams.release()

    def _respond(self, item: Any) -> features_pb2.ExtractResponse:
        kind, payload = item
        if kind == "error":
            item_id, exc, decoding = payload
            return features_pb2.ExtractResponse(id=item_id, error=item_error(exc, decoding))
        prepared, options, feat_future, cls_future = payload
        try:
            acts = feat_future.result() if feat_future is not None else {}
            probs = cls_future.result()["probabilities"] if cls_future is not None else None
            result = self.extractor.finish(prepared, acts, probs, options)
            resp = result_to_proto(result, options)
        except Exception as exc:  # noqa: BLE001 - a per-item INTERNAL error, stream goes on
            return features_pb2.ExtractResponse(id=prepared.id, error=item_error(exc))
        size = resp.ByteSize()
        if size > self.config.max_message_bytes:
            # sending it would fail the whole stream; fail only this item
            return features_pb2.ExtractResponse(id=prepared.id, error=item_error(
                InvalidInput(
                    f"the response ({size} bytes) is above the message limit of "
                    f"{self.config.max_message_bytes} bytes; ask for fewer or deeper layers, "
                    "a smaller size, or float16")))
        return resp

    def _read(self, request_iterator: Iterator[features_pb2.ExtractRequest],
              context: grpc.ServicerContext, stream: _Stream) -> None:
        options = ExtractOptions()
        options_error: DFFError | None = None
        try:
            for request in request_iterator:
                if request.HasField("options"):
                    options = options_from_proto(request.options)
                    try:
                        self.extractor.validate(options)
                        options_error = None
                    except DFFError as exc:
                        options_error = exc
                    continue
                if not request.HasField("image"):
                    continue
                stream.slots.acquire()
                if stream.stop.is_set() or not context.is_active():
                    break
                stream.started()
                image = request.image
                if options_error is not None:
                    stream.put(("error", (image.id, options_error, False)))
                    continue
                # decoding runs on the shared pool, so one stream can use several cores
                self._decoders.submit(self._prepare, image.id, image.data, options, stream)
        except grpc.RpcError:
            log.info("client stream ended early (cancelled or deadline)")
        except Exception:  # noqa: BLE001 - the reader must always end the stream
            log.exception("reading the request stream failed")
        finally:
            stream.reading_done()

    def _prepare(self, item_id: str, data: bytes, options: ExtractOptions, stream: _Stream
                 ) -> None:
        try:
            prepared = self.extractor.prepare(item_id, data, options)
        except DFFError as exc:
            stream.put(("error", (item_id, exc, True)))
            return
        except Exception as exc:  # noqa: BLE001 - per-item INTERNAL, logged
            stream.put(("error", (item_id, exc, False)))
            return
        try:
            self._submit(prepared, options, stream)
        except Exception as exc:  # noqa: BLE001 - e.g. the batcher is shut down
            stream.put(("error", (item_id, exc, False)))

    def close(self) -> None:
        """Stop the decoding pool (after the server has drained)."""
        self._decoders.shutdown(wait=True)

    def _submit(self, prepared: Prepared, options: ExtractOptions, stream: _Stream) -> None:
        feat = cls = None
        if prepared.features_input is not None:
            feat = self.batcher.submit(options.model, prepared.features_input, options.layers)
        if prepared.classifier_input is not None:
            cls = self.batcher.submit(options.classifier, prepared.classifier_input,
                                      ("probabilities",))
        waiting = [f for f in (feat, cls) if f is not None]
        remaining = [len(waiting)]
        lock = threading.Lock()

        def done(f: futures.Future) -> None:
            with lock:
                remaining[0] -= 1
                last = remaining[0] == 0
            with stream._lock:
                stream.futures.discard(f)
            if last:
                stream.put(("ok", (prepared, options, feat, cls)))

        with stream._lock:
            stream.futures.update(waiting)
        for f in waiting:
            f.add_done_callback(done)


# ---------------------------------------------------------------------- the server
@dataclass
class RunningServer:
    """A started server and what it needs to stop gracefully."""

    server: grpc.Server
    port: int
    health: health.HealthServicer
    batcher: MicroBatcher
    extractor: Extractor
    config: ServerConfig
    servicer: FeatureServicer

    def stop(self, grace: float | None = None) -> None:
        """Health NOT_SERVING, stop taking RPCs, let in-flight ones finish, stop the batcher."""
        grace = self.config.grace_s if grace is None else grace
        log.info("shutting down: health NOT_SERVING, draining in-flight streams (grace %.0fs)",
                 grace)
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait()
        self.servicer.close()
        self.batcher.close(timeout=grace)
        log.info("stopped (%d batches, %d items, largest batch %d)", self.batcher.stats.batches,
                 self.batcher.stats.items, self.batcher.stats.max_batch)


def start_server(config: ServerConfig, extractor: Extractor | None = None) -> RunningServer:
    """Build and start the server (port 0 picks a free port; see ``RunningServer.port``)."""
    if extractor is None:
        extractor = Extractor.from_cache(config.home, providers=config.providers or None,
                                         batch_size=config.max_batch_size, limits=config.limits)
    batcher = MicroBatcher(extractor.run, max_batch_size=config.max_batch_size,
                           max_wait_s=config.max_wait_ms / 1000.0, max_queue=config.max_queue)
    # room for every stream's RPC thread plus health/describe calls
    server = serving.create_server(max_message_bytes=config.max_message_bytes,
                                   max_workers=config.max_concurrent_streams + 8,
                                   thread_name_prefix="grpc")
    servicer = FeatureServicer(extractor, batcher, config)
    features_pb2_grpc.add_FeatureServiceServicer_to_server(servicer, server)
    service_name = features_pb2.DESCRIPTOR.services_by_name["FeatureService"].full_name
    port, health_servicer = serving.start(server, service_name, config.host, config.port)
    log.info("feature server listening on %s:%d (provider %s, models %s, max batch %d)",
             config.host, port, extractor.execution_provider, sorted(extractor.registry),
             config.max_batch_size)
    return RunningServer(server, port, health_servicer, batcher, extractor, config, servicer)


def serve(config: ServerConfig) -> int:
    """Run until SIGTERM/SIGINT, then shut down gracefully; returns the exit code (0)."""
    running = start_server(config)
    return serving.run_until_signal(running.stop)


__all__ = ["FeatureServicer", "RunningServer", "ServerConfig", "serve", "start_server"]

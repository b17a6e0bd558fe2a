"""The gRPC feature service: a thin servicer over :class:`feature_server.extractor.Extractor`
plus ``serve()`` (options, health, reflection, micro-batcher, graceful SIGTERM).

Bounded cost: a stream waits up to ``stream_wait_s`` for one of ``max_concurrent_streams``
slots (then RESOURCE_EXHAUSTED); a stream that sends nothing for ``idle_timeout_s`` while none
of its items is in flight is closed (DEADLINE_EXCEEDED); every image's size is read from its
header first and its decoding cost (encoded + decoded + network input bytes) is taken from a
server-wide memory budget before it is decoded - items wait for budget, they do not pile up;
an image that alone needs more than the budget fails as IMAGE_TOO_LARGE. The ``size`` option is
capped by ``max_input_size``.

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
from dataclasses import dataclass, field, replace
from typing import Any

import grpc
import numpy as np
from dff_protos import serving
from dff_protos.errors import (
    DeadlineExceeded,
    DFFError,
    ImageTooLarge,
    Internal,
    InvalidInput,
)
from dff_protos.metrics import Metrics
from dff_protos.status import map_errors
from dff_protos.v1 import features_pb2, features_pb2_grpc
from grpc_health.v1 import health

from feature_server.batching import MicroBatcher
from feature_server.convert import (
    describe_to_proto,
    item_error,
    options_from_proto,
    pixels_from_proto,
    prepared_from_proto,
    result_to_proto,
)
from feature_server.extractor import ExtractOptions, Extractor, Prepared
from feature_server.images import DEFAULT_FORMATS, DecodeLimits, check_header
from feature_server.models.precision import PRECISIONS, variant_name

log = logging.getLogger(__name__)

SERVER_VERSION = "0.1.0"


@dataclass(frozen=True)
class ServerConfig:
    """Everything ``dff serve features`` is configured with (built once at the entry point)."""

    host: str = "127.0.0.1"
    port: int = 50051
    network: serving.NetworkConfig = field(default_factory=serving.NetworkConfig)
    stream_wait_s: float = 10.0  # a stream waits this long for a slot, then RESOURCE_EXHAUSTED
    max_waiting_streams: int = 16
    idle_timeout_s: float = 60.0  # a stream with nothing in flight and no request is closed
    max_input_size: int = 512  # largest ExtractOptions size (network input side)
    memory_budget_mb: int = 1024  # bytes of images being decoded/run at once
    home: str | None = None
    build: bool = True  # build missing models at start (False: `serve features --no-build`)
    providers: tuple[str, ...] = ()
    max_batch_size: int = 0  # 0 = the provider's default (8 on the CPU, 64 on a GPU)
    max_wait_ms: float = 5.0
    max_pixels: int = 50_000_000
    max_message_mb: int = 64
    max_concurrent_streams: int = 16
    max_inflight_per_stream: int = 16
    max_queue: int = 256
    formats: frozenset[str] = field(default=DEFAULT_FORMATS)
    grace_s: float = 30.0
    decode_workers: int = 0  # threads decoding images for all streams; 0 = min(16, cores)
    intra_op_threads: int = 0

    @property
    def max_message_bytes(self) -> int:
        return self.max_message_mb * 1024 * 1024

    @property
    def memory_budget_bytes(self) -> int:
        return self.memory_budget_mb * 1024 * 1024

    @property
    def limits(self) -> DecodeLimits:
        return DecodeLimits(max_pixels=self.max_pixels, max_bytes=self.max_message_bytes,
                            formats=self.formats)


# ---------------------------------------------------------------------- the servicer
class MemoryBudget:
    """Bytes of images being decoded or run, server-wide: ``acquire`` waits until the cost
    fits (or the caller's stream stops); a cost above the whole budget is refused."""

    def __init__(self, limit: int, metrics: Metrics | None = None) -> None:
        self.limit = limit
        self.used = 0
        self._cond = threading.Condition()
        self._metrics = metrics

    def acquire(self, cost: int, stop: threading.Event) -> bool:
        if cost > self.limit:
            raise ImageTooLarge(f"decoding this image needs about {cost >> 20} MiB, above the "
                                f"server's memory budget of {self.limit >> 20} MiB")
        with self._cond:
            while self.used + cost > self.limit:
                if stop.is_set():
                    return False
                self._cond.wait(0.5)
            self.used += cost
            self._gauge()
        return True

    def release(self, cost: int) -> None:
        if cost:
            with self._cond:
                self.used -= cost
                self._gauge()
                self._cond.notify_all()

    def _gauge(self) -> None:
        if self._metrics is not None:
            self._metrics.inflight_bytes.labels(self._metrics.server).set(self.used)


def image_cost(data: bytes, limits: DecodeLimits, options: ExtractOptions) -> int:
    """Bytes one image holds while it is decoded and run: encoded + uint8 + float32 pixels +
    the network inputs. Raises the header errors (too large, unparseable, refused format)."""
    _, w, h = check_header(data, limits)
    return len(data) + w * h * (3 + 12) + _network_input_bytes(options)


def pixels_cost(pixels: np.ndarray, options: ExtractOptions) -> int:
    """Bytes a DecodedImage holds while it is run: its uint8 and float32 pixels and the
    network inputs."""
    return pixels.nbytes * (1 + 4) + _network_input_bytes(options)


def _network_input_bytes(options: ExtractOptions) -> int:
    """float32 network inputs of one image, features and classifier (an upper bound)."""
    return 2 * 3 * options.size * options.size * 4


class _Stream:
    """Book-keeping of one Extract call: bounded in-flight items and the response queue.
    Every queued item carries its memory-budget cost; whatever is put after the stream ended
    gives its cost back at once."""

    _END = object()

    def __init__(self, max_inflight: int, budget: MemoryBudget) -> None:
        self.slots = threading.Semaphore(max_inflight)
        self.out: queue.Queue[Any] = queue.Queue()
        self.budget = budget
        self._lock = threading.Lock()
        self._pending = 0
        self._reading = True
        self._closed = False
        self.last_request = time.monotonic()  # the last image item (not options, not empty)
        self.failure: BaseException | None = None  # the reader itself failed: end the stream
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

    def idle(self) -> bool:
        """Still reading, nothing in flight."""
        with self._lock:
            return self._reading and self._pending == 0

    def put(self, item: Any, cost: int = 0) -> None:
        with self._lock:
            self._pending -= 1
            end = not self._reading and self._pending == 0
            closed = self._closed
            if not closed:
                self.out.put((item, cost))
        if closed:
            self.budget.release(cost)
        elif end:
            self.out.put((self._END, 0))

    def reading_done(self) -> None:
        with self._lock:
            self._reading = False
            end = self._pending == 0
        if end:
            self.out.put((self._END, 0))

    def close(self) -> None:
        """The RPC ended: later puts release their cost; queued items release theirs now."""
        self.stop.set()
        with self._lock:
            self._closed = True
            while True:
                try:
                    _, cost = self.out.get_nowait()
                except queue.Empty:
                    break
                self.budget.release(cost)


class FeatureServicer(features_pb2_grpc.FeatureServiceServicer):
    """dff.v1.FeatureService over an Extractor and a shared MicroBatcher."""

    def __init__(self, extractor: Extractor, batcher: MicroBatcher, config: ServerConfig,
                 metrics: Metrics | None = None) -> None:
        self.extractor = extractor
        self.batcher = batcher
        self.config = config
        self.metrics = metrics
        self._streams = serving.StreamSlots(config.max_concurrent_streams, config.stream_wait_s,
                                            config.max_waiting_streams, metrics)
        self.budget = MemoryBudget(config.memory_budget_bytes, metrics)
        self._decoders = futures.ThreadPoolExecutor(
            max_workers=config.decode_workers or min(16, os.cpu_count() or 1),
            thread_name_prefix="decode")
        # set once the server has stopped (after its grace): every stream still running ends
        self._stopped = threading.Event()

    @map_errors
    def DescribeModel(self, request: features_pb2.DescribeModelRequest,  # noqa: N802
                      context: grpc.ServicerContext) -> features_pb2.DescribeModelResponse:
        return describe_to_proto(self.extractor.describe(), self.config, SERVER_VERSION)

    @map_errors
    def Extract(self, request_iterator: Iterator[features_pb2.ExtractRequest],  # noqa: N802
                context: grpc.ServicerContext) -> Iterator[features_pb2.ExtractResponse]:
        self._streams.acquire("Extract stream")
        try:
            stream = _Stream(self.config.max_inflight_per_stream, self.budget)
            reader = threading.Thread(target=self._read, args=(request_iterator, context, stream),
                                      name="extract-reader", daemon=True)
            reader.start()
            started, answered, failed = time.monotonic(), 0, 0
            idle_s = self.config.idle_timeout_s
            try:
                while True:
                    if stream.failure is not None:
                        raise Internal("reading the request stream failed (see server log)")
                    try:
                        item, cost = stream.out.get(timeout=min(1.0, idle_s))
                    except queue.Empty:
                        if self._stopped.is_set() or not context.is_active():
                            # the caller went away (cancelled, deadline) or the server stopped
                            # after its grace: nothing more to answer, the slot goes back
                            log.info("Extract stream from %s ended: %s", context.peer(),
                                     "server stopped" if self._stopped.is_set()
                                     else "the caller went away")
                            return
                        if stream.idle() and time.monotonic() - stream.last_request > idle_s:
                            raise DeadlineExceeded(
                                f"no image for {idle_s:g}s with nothing in flight: idle "
                                "Extract stream closed") from None
                        continue
                    if item is _Stream._END:
                        if stream.failure is not None:
                            raise Internal("reading the request stream failed (see server log)")
                        break
                    stream.slots.release()
                    try:
                        resp = self._respond(item)
                    finally:
                        self.budget.release(cost)
                    answered += 1
                    if resp.HasField("error"):
                        failed += 1
                        if self.metrics is not None:
                            self.metrics.item_error(resp.error.kind or str(resp.error.code))
                    elif self.metrics is not None:
                        self.metrics.images.labels(self.metrics.server).inc()
                    yield resp
                log.debug("stream from %s done: %d items (%d errors) in %.2fs", context.peer(),
                          answered, failed, time.monotonic() - started)
            finally:
                stream.close()
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
            result = self.extractor.finish(prepared, acts, probs, options, widen=False)
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

    def _check_options(self, options: ExtractOptions) -> None:
        if not 1 <= options.size <= self.config.max_input_size:
            raise InvalidInput(f"size {options.size} is outside 1..{self.config.max_input_size} "
                               "(this server's --max-input-size)")
        self._check_precision(options)
        self.extractor.validate(options)

    def _check_precision(self, options: ExtractOptions) -> None:
        """A precision (or variant) of a model this server serves at other precisions only:
        say so, and which it serves (not "unknown feature model ... built by dff models
        build", which sends the client to build what this server was started without)."""
        registry = self.extractor.registry
        if options.model in registry:
            return
        base = options.model
        for p in PRECISIONS[1:]:
            if base.endswith(f"_{p}"):
                base = base[: -len(p) - 1]
        served = [p for p in PRECISIONS
                  if getattr(registry.get(variant_name(base, p)), "kind", "") == "features"]
        if served:
            wanted = options.precision or next(
                (p for p in PRECISIONS[1:] if options.model.endswith(f"_{p}")), "fp32")
            raise InvalidInput(f"this server does not serve {base} at precision {wanted!r}; "
                               f"it serves {', '.join(served)} (its --precision)")

    def _read(self, request_iterator: Iterator[features_pb2.ExtractRequest],
              context: grpc.ServicerContext, stream: _Stream) -> None:
        """Read the requests. Every image item started here gets exactly one answer: whatever
        goes wrong with one item (a malformed message included) is that item's error, never a
        pending item. A failure of the reading itself ends the stream with an error status."""
        options = ExtractOptions()
        options_error: DFFError | None = None
        try:
            for request in request_iterator:
                kind = request.WhichOneof("kind")
                if kind == "options":
                    try:
                        options = options_from_proto(request.options)
                        self._check_options(options)
                        options_error = None
                    except DFFError as exc:
                        options_error = exc
                    continue
                if kind not in ("image", "pixels", "prepared"):
                    continue  # an empty message: not activity (the idle timeout goes on)
                stream.last_request = time.monotonic()
                stream.slots.acquire()
                if stream.stop.is_set() or not context.is_active():
                    break
                stream.started()
                item_id = getattr(request, kind).id
                if options_error is not None:
                    stream.put(("error", (item_id, options_error, False)))
                    continue
                if not self._read_item(kind, request, item_id, options, stream):
                    break
        except grpc.RpcError:
            log.info("client stream ended early (cancelled or deadline)")
        except Exception as exc:  # noqa: BLE001 - the reader must always end the stream
            log.exception("reading the request stream failed")
            stream.failure = exc
        finally:
            stream.reading_done()

    def _read_item(self, kind: str, request: features_pb2.ExtractRequest, item_id: str,
                   options: ExtractOptions, stream: _Stream) -> bool:
        """Check one started item and hand it to the decoders (or, prepared, to the batcher);
        on any failure answer it with its error. False: the stream ended, stop reading."""
        held = 0  # memory budget taken for it and not yet handed on
        try:
            if kind == "prepared":  # nothing to decode: checked and batched from here
                inputs = prepared_from_proto(request.prepared)
                prepared = self.extractor.adopt(item_id, inputs.features_input,
                                                inputs.classifier_input, inputs.original_size,
                                                options)
                cost = sum(x.nbytes for x in (prepared.features_input,
                                              prepared.classifier_input) if x is not None)
            else:
                data: bytes | np.ndarray
                if kind == "image":
                    data = request.image.data
                    cost = image_cost(data, self.config.limits, options)
                else:  # decoded by the client: checked, then a view of the message
                    data = pixels_from_proto(request.pixels.pixels, self.config.limits)
                    cost = pixels_cost(data, options)
            if not self.budget.acquire(cost, stream.stop):
                stream.put(("error", (item_id, DeadlineExceeded("stream ended"), False)))
                return False
            held = cost
            if kind == "prepared":
                self._submit(prepared, options, stream, cost)
            else:
                # decoding runs on the shared pool, so one stream can use several cores
                self._decoders.submit(self._prepare, item_id, data, options, stream, cost)
            return True
        except DFFError as exc:  # refused from its header or its shape: never decoded
            # a file's or pixels' InvalidInput is INVALID_IMAGE; prepared inputs are arguments
            stream.put(("error", (item_id, exc, kind != "prepared" and not held)), held)
        except Exception as exc:  # noqa: BLE001 - e.g. a malformed message: this item's error
            # INTERNAL for the client, the traceback in the log (status.item_error)
            stream.put(("error", (item_id, exc, False)), held)
        return True

    def _prepare(self, item_id: str, data: bytes | np.ndarray, options: ExtractOptions,
                 stream: _Stream,
                 cost: int) -> None:
        try:
            prepared = self.extractor.prepare(item_id, data, options)
        except DFFError as exc:
            stream.put(("error", (item_id, exc, True)), cost)
            return
        except Exception as exc:  # noqa: BLE001 - per-item INTERNAL, logged
            stream.put(("error", (item_id, exc, False)), cost)
            return
        try:
            self._submit(prepared, options, stream, cost)
        except Exception as exc:  # noqa: BLE001 - e.g. the batcher is shut down
            stream.put(("error", (item_id, exc, False)), cost)

    def stopped(self) -> None:
        """The server has stopped: every stream still running ends now (its slot goes back)."""
        self._stopped.set()

    def close(self) -> None:
        """Stop the decoding pool (after the server has drained)."""
        self._decoders.shutdown(wait=True)

    def _submit(self, prepared: Prepared, options: ExtractOptions, stream: _Stream,
                cost: int) -> None:
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
                stream.put(("ok", (prepared, options, feat, cls)), cost)

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
    extras: serving.Started | None = None

    @property
    def health_port(self) -> int:
        return self.extras.health_port if self.extras is not None else 0

    @property
    def metrics_port(self) -> int:
        return self.extras.metrics_port if self.extras is not None else 0

    def stop(self, grace: float | None = None) -> None:
        """Health NOT_SERVING, stop taking RPCs, let in-flight ones finish, stop the batcher."""
        grace = self.config.grace_s if grace is None else grace
        log.info("shutting down: health NOT_SERVING, draining in-flight streams (grace %.0fs)",
                 grace)
        self.health.enter_graceful_shutdown()
        # after the grace gRPC cancels what still runs; a stream that is blocked anyway (its
        # caller neither sends nor reads) ends at its next check of the stop flag (<= 1 s)
        self.server.stop(grace).wait(grace + 10.0)
        self.servicer.stopped()
        self.servicer.close()
        self.batcher.close(timeout=grace)
        if self.extras is not None:
            self.extras.stop_extras()
        log.info("stopped (%d batches, %d items, largest batch %d)", self.batcher.stats.batches,
                 self.batcher.stats.items, self.batcher.stats.max_batch)


def start_server(config: ServerConfig, extractor: Extractor | None = None) -> RunningServer:
    """Build and start the server (port 0 picks a free port; see ``RunningServer.port``)."""
    if extractor is None:
        extractor = Extractor.from_cache(config.home, providers=config.providers or None,
                                         batch_size=config.max_batch_size, limits=config.limits,
                                         build=config.build)
    if config.max_batch_size == 0:
        config = replace(config, max_batch_size=extractor.batch_size)
    metrics = Metrics("features")
    batcher = MicroBatcher(extractor.run, max_batch_size=config.max_batch_size,
                           max_wait_s=config.max_wait_ms / 1000.0, max_queue=config.max_queue,
                           on_batch=metrics.batch_size.labels("features").observe,
                           stack=extractor.stack)
    # threads: every running stream, every stream waiting for a slot, and a reserve that
    # DescribeModel/health/reflection always find (streams never take it)
    server = serving.create_server(
        max_message_bytes=config.max_message_bytes,
        max_workers=config.max_concurrent_streams + config.max_waiting_streams + 8,
        thread_name_prefix="grpc", network=config.network, metrics=metrics)
    servicer = FeatureServicer(extractor, batcher, config, metrics)
    features_pb2_grpc.add_FeatureServiceServicer_to_server(servicer, server)
    service_name = features_pb2.DESCRIPTOR.services_by_name["FeatureService"].full_name
    extras = serving.start(server, service_name, config.host, config.port, config.network,
                           metrics)
    log.info("feature server listening on %s:%d (provider %s, models %s, max batch %d)",
             config.host, extras.port, extractor.execution_provider, sorted(extractor.registry),
             config.max_batch_size)
    return RunningServer(server, extras.port, extras.health, batcher, extractor, config,
                         servicer, extras)


def serve(config: ServerConfig) -> int:
    """Run until SIGTERM/SIGINT, then shut down gracefully; returns the exit code (0)."""
    running = start_server(config)
    return serving.run_until_signal(running.stop)


__all__ = ["FeatureServicer", "RunningServer", "ServerConfig", "serve", "start_server"]

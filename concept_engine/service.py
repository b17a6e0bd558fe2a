"""The ConceptEngine gRPC service: a thin adapter over :mod:`concept_engine.discovery` and
:mod:`concept_engine.store`, plus ``start_server()``/``serve()`` (limits, health, reflection,
graceful SIGTERM).

Each RPC: proto -> domain objects -> library call -> proto. Domain errors raised by the library
become status codes in one place (:func:`dff_protos.status.map_errors`).

Activations come from one or several feature servers (``EngineConfig.feature_servers`` ->
:class:`feature_server.client.FeatureClient`) or, when none is configured, from an in-process
:class:`feature_server.extractor.Extractor` (the embedded default).

``Discover`` takes its images either from the client stream or from ``options.data_dir``, a
folder UNDER the configured data root. A data_dir that leaves the root ('..', an absolute path
elsewhere, a symlink pointing out, a file inside that links out) is refused with
INVALID_ARGUMENT; with no data root configured, data_dir is refused altogether.
Proto3 zero values mean "default" for every numeric option (k=0 means: estimate k).

Bounded cost: Discover and Explain streams wait up to ``stream_wait_s`` for a slot (then
RESOURCE_EXHAUSTED) on their own limits, so health, List, Get and Delete always find a thread;
a request stream idle for ``idle_timeout_s`` is closed; the bytes of streamed images are capped
per Discover and across the server. The engine's health is NOT_SERVING while none of its
feature servers answers, and Discover then fails with UNAVAILABLE naming them. A store file
that cannot be read is DATA_LOSS naming the file; temporary files left by a killed engine are
removed at start.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from dff_protos import serving
from dff_protos.errors import (
    DataLoss,
    DFFError,
    ImageTooLarge,
    InvalidInput,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from dff_protos.metrics import Metrics
from dff_protos.security import ClientSecurity
from dff_protos.status import map_errors
from dff_protos.v1 import engine_pb2, engine_pb2_grpc
from grpc_health.v1 import health

from concept_engine.convert import (
    concept_set_to_proto,
    explanation_to_proto,
    info_to_proto,
    options_from_proto,
    progress_to_proto,
    summary_to_proto,
)
from concept_engine.discovery import DiscoveryOptions, Explanation, Progress, discover, explain
from concept_engine.finegrain import Decision
from concept_engine.store import ConceptSet, ConceptSetStore
from feature_server.extractor import ExtractResult, FeatureSource

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineConfig:
    """Everything ``dff serve engine`` is configured with (built once at the entry point)."""

    host: str = "127.0.0.1"
    port: int = 50052
    network: serving.NetworkConfig = field(default_factory=serving.NetworkConfig)
    feature_security: ClientSecurity | None = None  # None: the process default (env)
    store_dir: str = "concept-sets"
    data_root: str | None = None
    feature_servers: tuple[str, ...] = ()
    models_home: str | None = None
    feature_timeout_s: float = 600.0
    max_message_mb: int = 64
    max_images: int = 20_000
    max_concurrent_discover: int = 2
    max_workers: int = 16
    grace_s: float = 30.0
    max_concurrent_explain: int = 4
    stream_wait_s: float = 10.0
    max_waiting_streams: int = 8
    idle_timeout_s: float = 60.0
    max_discover_mb: int = 4096  # streamed image bytes of one Discover
    max_streamed_mb: int = 8192  # streamed image bytes held by all running calls
    feature_item_deadline_s: float = 30.0
    health_interval_s: float = 5.0

    @property
    def max_message_bytes(self) -> int:
        return self.max_message_mb * 1024 * 1024


# ---------------------------------------------------------------------- data_dir
def resolve_data_dir(data_root: str | None, data_dir: str) -> Path:
    """The folder ``data_dir`` names under ``data_root``, refusing anything outside it
    (after resolving '..' and symlinks)."""
    if not data_root:
        raise InvalidInput("this server has no data root: send the images in the stream")
    root = Path(data_root).resolve()
    if "\x00" in data_dir:
        raise InvalidInput("data_dir contains a NUL byte")
    candidate = Path(data_dir)
    if not candidate.is_absolute():
        candidate = root / candidate
    resolved = candidate.resolve()
    if not resolved.is_relative_to(root):
        raise InvalidInput(f"data_dir {data_dir!r} is outside the server's data root")
    if not resolved.is_dir():
        raise NotFound(f"data_dir {data_dir!r} is not a folder under the data root")
    return resolved


def read_data_dir(folder: Path, root: Path, max_images: int, max_bytes: int,
                  take: Callable[[int], None] | None = None
                  ) -> tuple[list[tuple[str, bytes]], dict[str, DFFError]]:
    """(id, bytes) of the image files in ``folder`` (sorted; id relative to it; a refused file
    keeps its place with empty bytes), and the files refused one by one ({id: error}: larger
    than ``max_bytes``, checked by size before reading; unreadable). A file that resolves
    outside ``root`` (a symlink escape) is refused.
    ``take(n)`` accounts each file's bytes before it is read (it raises when over a cap)."""
    from feature_server.images import read_items

    root = root.resolve()
    entries = read_items(folder)
    if len(entries) > max_images:
        raise ResourceExhausted(f"{len(entries)} images in data_dir, the limit is {max_images}")
    items: list[tuple[str, bytes]] = []
    refused: dict[str, DFFError] = {}
    for item_id, path in entries:
        if not path.resolve().is_relative_to(root):
            raise InvalidInput(f"{item_id!r} in data_dir links outside the server's data root")
        try:
            size = path.stat().st_size
            if size > max_bytes:
                refused[item_id] = ImageTooLarge(f"file of {size} bytes is above the limit of "
                                                 f"{max_bytes} bytes; not read")
            else:
                if take is not None:
                    take(size)
                items.append((item_id, path.read_bytes()))
                continue
        except OSError as exc:
            refused[item_id] = InvalidInput(f"cannot read the file: {exc.strerror or exc}")
        items.append((item_id, b""))
    return items, refused


class _Refusing:
    """A FeatureSource that answers the refused ids with their error and forwards the rest (so
    a refused file is one per-image error, and discovery goes on)."""

    def __init__(self, source: FeatureSource, refused: dict[str, DFFError]) -> None:
        self.source, self.refused = source, refused

    def extract(self, items: Iterable[tuple[str, bytes]], options: Any
                ) -> Iterator[ExtractResult]:
        rest = []
        for item_id, data in items:
            if item_id in self.refused:
                yield ExtractResult(item_id, error=self.refused[item_id])
            else:
                rest.append((item_id, data))
        yield from self.source.extract(rest, options)

    def describe(self) -> dict:
        return self.source.describe()

    def class_names(self, classifier: str | None = None) -> list[str]:
        return self.source.class_names(classifier)


# ---------------------------------------------------------------------- the servicer
class _Cancelled(Exception):
    """The client went away; stops the discovery worker at its next progress event."""


_END = object()


class ConceptEngineServicer(engine_pb2_grpc.ConceptEngineServicer):
    """RPC methods; all work is done by discovery.discover/explain and ConceptSetStore."""

    def __init__(self, source: FeatureSource, store: ConceptSetStore, config: EngineConfig,
                 metrics: Metrics | None = None):
        self.source = source
        self.store = store
        self.config = config
        self.metrics = metrics
        self._discover_slots = serving.StreamSlots(
            config.max_concurrent_discover, config.stream_wait_s, config.max_waiting_streams,
            metrics)
        self._explain_slots = serving.StreamSlots(
            config.max_concurrent_explain, config.stream_wait_s, config.max_waiting_streams,
            metrics)
        self._bytes_lock = threading.Lock()
        self._streamed_bytes = 0
        self.features_ok = True  # updated by the engine's feature-server health monitor

    # -- helpers
    def _first_options(self, request_iterator: Iterator[Any], field: str) -> Any:
        try:
            first = next(request_iterator)
        except StopIteration:
            raise InvalidInput(f"empty request stream: send {field} first") from None
        if first.WhichOneof("kind") != "options":
            raise InvalidInput(f"the first message must carry {field}")
        return first.options

    def _take_bytes(self, n: int, call_total: int) -> None:
        """Account ``n`` more streamed bytes (``call_total`` for this call so far)."""
        limit = self.config.max_discover_mb << 20
        if call_total > limit:
            raise ResourceExhausted(f"the streamed images exceed {self.config.max_discover_mb} "
                                    "MiB in one call (--max-discover-mb); split the folder")
        with self._bytes_lock:
            if self._streamed_bytes + n > self.config.max_streamed_mb << 20:
                raise ResourceExhausted(
                    f"this engine holds {self._streamed_bytes >> 20} MiB of streamed images "
                    f"(limit {self.config.max_streamed_mb} MiB, --max-streamed-mb); retry later")
            self._streamed_bytes += n
        if self.metrics is not None:
            self.metrics.inflight_bytes.labels(self.metrics.server).set(self._streamed_bytes)

    def _give_bytes(self, n: int) -> None:
        with self._bytes_lock:
            self._streamed_bytes -= n
        if self.metrics is not None:
            self.metrics.inflight_bytes.labels(self.metrics.server).set(self._streamed_bytes)

    def _images(self, request_iterator: Iterable[Any], taken: list[int] | None = None
                ) -> Iterator[tuple[str, bytes]]:
        n = 0
        for req in request_iterator:
            if req.WhichOneof("kind") != "image":
                raise InvalidInput("options may only be sent once, as the first message")
            n += 1
            if n > self.config.max_images:
                raise ResourceExhausted(f"more than {self.config.max_images} images in one call")
            if taken is not None:
                size = len(req.image.data)
                self._take_bytes(size, taken[0] + size)
                taken[0] += size  # only what was taken is given back
            yield req.image.id or f"image-{n:06d}", req.image.data

    def _check_features(self) -> None:
        """UNAVAILABLE naming the feature servers when none of them answers."""
        health = getattr(self.source, "health", None)
        if not self.config.feature_servers or not callable(health):
            return
        if self.features_ok:
            return
        states = health()
        if any(v == "SERVING" for v in states.values()):
            self.features_ok = True
            return
        raise Unavailable("none of this engine's feature servers answers: " + ", ".join(
            f"{a} ({v})" for a, v in states.items()))

    def _load(self, concept_set_id: str) -> ConceptSet:
        """store.get, with an unreadable/corrupt file as DataLoss naming it."""
        path = self.store.path(concept_set_id)  # InvalidInput for a bad id
        try:
            return self.store.get(concept_set_id)
        except NotFound:
            raise
        except Exception as exc:
            if not path.is_file():  # deleted (or replaced by something else) meanwhile
                raise NotFound(f"no concept set {concept_set_id!r}") from None
            if not isinstance(exc, (OSError, KeyError, ValueError, TypeError, InvalidInput)):
                raise
            raise DataLoss(f"concept set {concept_set_id!r}: the stored file {path} is "
                           f"unreadable or corrupt ({type(exc).__name__}: {exc})") from None

    def _read_file(self, concept_set_id: str) -> bytes:
        """store.read_bytes, with a file that cannot be read as DataLoss naming it."""
        try:
            return self.store.read_bytes(concept_set_id)
        except OSError as exc:
            path = self.store.path(concept_set_id)
            if not path.is_file():
                raise NotFound(f"no concept set {concept_set_id!r}") from None
            raise DataLoss(f"concept set {concept_set_id!r}: the stored file {path} cannot be "
                           f"read ({exc.strerror or exc})") from None

    # -- RPCs
    @map_errors
    def Discover(self, request_iterator, context):  # noqa: N802 - gRPC method name
        requests = serving.idle_timeout_iter(request_iterator, self.config.idle_timeout_s,
                                             "Discover request stream")
        msg = self._first_options(requests, "DiscoverOptions")
        source: FeatureSource = self.source
        self._check_features()
        self._discover_slots.acquire("Discover")
        taken = [0]
        try:
            if msg.data_dir:
                folder = resolve_data_dir(self.config.data_root, msg.data_dir)
                options = options_from_proto(msg, name=folder.name)
                options.validate()
                def take(n: int) -> None:
                    self._take_bytes(n, taken[0] + n)
                    taken[0] += n

                items, refused = read_data_dir(folder, Path(self.config.data_root),
                                               self.config.max_images,
                                               self.config.max_message_bytes, take)
                if refused:
                    source = _Refusing(self.source, refused)
                if any(True for _ in requests):
                    raise InvalidInput("give either data_dir or streamed images, not both")
            else:
                options = options_from_proto(msg)
                options.validate()
                items = list(self._images(requests, taken))
        except BaseException:
            self._discover_slots.release()
            self._give_bytes(taken[0])
            raise
        try:
            yield from self._run_discover(items, options, context, source)
        finally:
            self._give_bytes(taken[0])

    def _run_discover(self, items: list[tuple[str, bytes]], options: DiscoveryOptions,
                      context: grpc.ServicerContext, source: FeatureSource
                      ) -> Iterator[engine_pb2.DiscoverEvent]:
        """Runs discover() in a worker thread (which owns the acquired discover slot and
        releases it when it ends) and streams its events. A client that goes away (cancel,
        deadline) sets ``cancel``; the worker stops at its next progress event."""
        events: queue.Queue = queue.Queue()
        cancel = threading.Event()
        outcome: dict[str, Any] = {}
        context.add_callback(cancel.set)  # fires when the RPC ends, cancelled or not

        def on_event(event: Progress | Decision) -> None:
            if cancel.is_set():
                raise _Cancelled()
            events.put(event)

        def work() -> None:
            try:
                cs = discover(items, source, options, progress=on_event)
                on_event(Progress("save", 0, 1, "writing the concept set"))
                t = time.perf_counter()
                self.store.save(cs)
                cs.stage_seconds["save"] = time.perf_counter() - t
                outcome["set"] = cs
            except BaseException as exc:  # noqa: BLE001 - handed to the RPC thread
                outcome["error"] = exc
            finally:
                self._discover_slots.release()
                events.put(_END)

        worker = threading.Thread(target=work, name="discover", daemon=True)
        try:
            worker.start()
        except BaseException:
            self._discover_slots.release()
            raise
        try:
            while True:
                try:
                    event = events.get(timeout=0.5)
                except queue.Empty:
                    event = None
                if not context.is_active() or cancel.is_set() and event is not _END:
                    log.info("Discover cancelled by the client")
                    cancel.set()
                    return
                if event is None:
                    continue
                if event is _END:
                    break
                yield progress_to_proto(event)
        finally:
            cancel.set()
        worker.join()
        if "error" in outcome:
            if isinstance(outcome["error"], _Cancelled):
                return
            raise outcome["error"]
        cs = outcome["set"]
        yield engine_pb2.DiscoverEvent(progress=engine_pb2.Progress(
            stage="save", done=1, total=1, message=cs.id))
        yield engine_pb2.DiscoverEvent(summary=summary_to_proto(cs, len(items)))

    @map_errors
    def Explain(self, request_iterator, context):  # noqa: N802
        requests = serving.idle_timeout_iter(request_iterator, self.config.idle_timeout_s,
                                             "Explain request stream")
        msg = self._first_options(requests, "ExplainOptions")
        if not msg.concept_set_id:
            raise InvalidInput("ExplainOptions.concept_set_id is required")
        cs = self._load(msg.concept_set_id)
        self._check_features()
        self._explain_slots.acquire("Explain")
        try:
            yield from self._explain(cs, msg, requests, context)
        finally:
            self._explain_slots.release()

    def _explain(self, cs: ConceptSet, msg: Any, requests: Iterator[Any],
                 context: grpc.ServicerContext) -> Iterator[engine_pb2.ExplainResponse]:
        threshold = msg.threshold or None
        min_area = msg.min_area or None
        kept: dict[str, bytes] = {}
        seen: set[str] = set()

        def images() -> Iterator[tuple[str, bytes]]:
            for item_id, data in self._images(requests):
                # answers are matched by id (and overlays drawn on the image of that id)
                if item_id in seen:
                    raise InvalidInput(f"duplicate image ids: [{item_id!r}] (each image of a "
                                       "call needs its own id)")
                seen.add(item_id)
                if msg.render_overlay:
                    kept[item_id] = data
                yield item_id, data

        for e in explain(cs, images(), self.source, threshold, min_area):
            if not context.is_active():
                log.info("Explain cancelled by the client")
                return
            png = b""
            data = kept.pop(e.id, None)
            if msg.render_overlay and e.error is None and data is not None:
                png = _overlay_png(data, e, list(cs.concept_names))
            yield explanation_to_proto(e, msg.return_heatmaps, png, list(cs.concept_names))

    @map_errors
    def ListConceptSets(self, request, context):  # noqa: N802
        return engine_pb2.ListConceptSetsResponse(
            concept_sets=[info_to_proto(s) for s in self.store.list()])

    @map_errors
    def GetConceptSet(self, request, context):  # noqa: N802
        data = self._read_file(request.id) if request.include_file else b""
        msg = concept_set_to_proto(self._load(request.id))
        if request.include_file:
            msg.hdf5 = data
            limit = self.config.max_message_bytes
            if msg.ByteSize() > limit:
                raise ResourceExhausted(
                    f"concept set {request.id!r}: its file is {len(data)} bytes and the "
                    f"response would be {msg.ByteSize()} bytes, over this engine's max message "
                    f"size of {limit} bytes; ask without include_file (and use Explain)")
        return msg

    @map_errors
    def DeleteConceptSet(self, request, context):  # noqa: N802
        return engine_pb2.DeleteConceptSetResponse(deleted=self.store.delete(request.id))


def _overlay_png(data: bytes, e: Explanation, names: list[str] | None = None) -> bytes:
    """The image with every concept's contours and a legend, as PNG (pictures only here)."""
    from concept_engine import drawing
    from feature_server.images import decode_image

    try:
        img = decode_image(data)
    except InvalidInput as exc:  # decodable by the feature server but not here: no overlay
        log.warning("no overlay for %s: %s", e.id, exc)
        return b""
    certainties = None if e.certainties is None else [float(c) for c in e.certainties]
    return drawing.encode_png(drawing.overlay(img, e.polygons, certainties, names=names,
                                              present=None if e.present is None
                                              else [bool(v) for v in e.present]))


# ---------------------------------------------------------------------- the server
def make_source(config: EngineConfig) -> FeatureSource:
    """FeatureClient over the configured feature servers, else an in-process Extractor."""
    if config.feature_servers:
        from feature_server.client import FeatureClient

        log.info("activations from feature server(s) %s", ", ".join(config.feature_servers))
        return FeatureClient(list(config.feature_servers), timeout=config.feature_timeout_s,
                             max_message_mb=config.max_message_mb,
                             item_deadline=config.feature_item_deadline_s,
                             security=config.feature_security)
    from feature_server.extractor import Extractor

    log.info("no feature server given: extracting in-process (ONNX Runtime)")
    return Extractor.from_cache(config.models_home)


def clean_orphans(store_dir: str | Path) -> int:
    """Remove the temporary files (``.<id>.h5.*.tmp``) a killed engine left in its store;
    returns how many. Only called at start, before any save can run."""
    removed = 0
    for p in Path(store_dir).glob(".*.tmp"):
        try:
            p.unlink()
            removed += 1
        except OSError as exc:
            log.warning("could not remove the orphan temporary file %s: %s", p, exc)
    if removed:
        log.info("removed %d orphan temporary file(s) from the store %s", removed, store_dir)
    return removed


class FeatureHealthMonitor:
    """Every ``interval`` s: the engine is SERVING while at least one feature server is."""

    def __init__(self, servicer: ConceptEngineServicer, health_servicer: health.HealthServicer,
                 service_name: str, interval: float) -> None:
        self.servicer, self.health, self.service_name = servicer, health_servicer, service_name
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="feature-health", daemon=True)
        self._thread.start()

    def check(self) -> bool:
        states = self.servicer.source.health()  # type: ignore[attr-defined]
        ok = any(v == "SERVING" for v in states.values())
        if ok != self.servicer.features_ok:
            log.warning("feature servers %s: engine %s", states,
                        "SERVING" if ok else "NOT_SERVING")
        self.servicer.features_ok = ok
        if not self._stop.is_set():
            serving.mark_serving(self.health, self.service_name, ok)
        return ok

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.check()
            except Exception:  # noqa: BLE001 - the monitor must not die
                log.exception("feature-server health check failed")

    def stop(self) -> None:
        self._stop.set()


@dataclass
class RunningEngine:
    """A started engine server and what it needs to stop gracefully."""

    server: grpc.Server
    port: int
    health: health.HealthServicer
    servicer: ConceptEngineServicer
    config: EngineConfig
    extras: serving.Started | None = None
    monitor: FeatureHealthMonitor | None = None

    @property
    def health_port(self) -> int:
        return self.extras.health_port if self.extras is not None else 0

    @property
    def metrics_port(self) -> int:
        return self.extras.metrics_port if self.extras is not None else 0

    def stop(self, grace: float | None = None) -> None:
        grace = self.config.grace_s if grace is None else grace
        log.info("shutting down: health NOT_SERVING, draining in-flight calls (grace %.0fs)",
                 grace)
        if self.monitor is not None:
            self.monitor.stop()
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait()
        if self.extras is not None:
            self.extras.stop_extras()
        close = getattr(self.servicer.source, "close", None)
        if callable(close):
            close()


def start_server(config: EngineConfig, source: FeatureSource | None = None) -> RunningEngine:
    """Build and start the engine (port 0 picks a free port; see ``RunningEngine.port``)."""
    source = source if source is not None else make_source(config)
    store = ConceptSetStore(config.store_dir)
    clean_orphans(config.store_dir)
    metrics = Metrics("engine")
    # threads: running + waiting streams, and a reserve that health, List, Get and Delete
    # always find
    workers = max(config.max_workers, config.max_concurrent_discover
                  + config.max_concurrent_explain + config.max_waiting_streams + 8)
    server = serving.create_server(max_message_bytes=config.max_message_bytes,
                                   max_workers=workers, thread_name_prefix="engine",
                                   network=config.network, metrics=metrics)
    servicer = ConceptEngineServicer(source, store, config, metrics)
    engine_pb2_grpc.add_ConceptEngineServicer_to_server(servicer, server)
    service_name = engine_pb2.DESCRIPTOR.services_by_name["ConceptEngine"].full_name
    extras = serving.start(server, service_name, config.host, config.port, config.network,
                           metrics)
    monitor = None
    if config.feature_servers and callable(getattr(source, "health", None)):
        monitor = FeatureHealthMonitor(servicer, extras.health, service_name,
                                       config.health_interval_s)
        monitor.check()
    log.info("concept engine listening on %s:%d (store %s, data root %s)", config.host,
             extras.port, config.store_dir, config.data_root or "none")
    return RunningEngine(server, extras.port, extras.health, servicer, config, extras, monitor)


def serve(config: EngineConfig) -> int:
    """Run until SIGTERM/SIGINT, then shut down gracefully; returns the exit code (0)."""
    running = start_server(config)
    return serving.run_until_signal(running.stop)


__all__ = ["ConceptEngineServicer", "EngineConfig", "RunningEngine", "make_source",
           "resolve_data_dir", "serve", "start_server"]

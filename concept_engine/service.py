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
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from dff_protos import serving
from dff_protos.errors import InvalidInput, NotFound, ResourceExhausted
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
from concept_engine.store import ConceptSetStore
from feature_server.extractor import FeatureSource

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineConfig:
    """Everything ``dff serve engine`` is configured with (built once at the entry point)."""

    host: str = "[::]"
    port: int = 50052
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


def read_data_dir(folder: Path, root: Path, max_images: int, max_bytes: int
                  ) -> list[tuple[str, bytes]]:
    """(id, bytes) of the image files in ``folder`` (sorted; id relative to it). A file that
    resolves outside ``root`` (a symlink escape) is refused."""
    from feature_server.images import read_items

    root = root.resolve()
    entries = read_items(folder)
    if len(entries) > max_images:
        raise ResourceExhausted(f"{len(entries)} images in data_dir, the limit is {max_images}")
    items = []
    for item_id, path in entries:
        if not path.resolve().is_relative_to(root):
            raise InvalidInput(f"{item_id!r} in data_dir links outside the server's data root")
        size = path.stat().st_size
        items.append((item_id, path.read_bytes() if size <= max_bytes else b""))
    return items


# ---------------------------------------------------------------------- the servicer
class _Cancelled(Exception):
    """The client went away; stops the discovery worker at its next progress event."""


_END = object()


class ConceptEngineServicer(engine_pb2_grpc.ConceptEngineServicer):
    """RPC methods; all work is done by discovery.discover/explain and ConceptSetStore."""

    def __init__(self, source: FeatureSource, store: ConceptSetStore, config: EngineConfig):
        self.source = source
        self.store = store
        self.config = config
        self._discover_slots = threading.BoundedSemaphore(config.max_concurrent_discover)

    # -- helpers
    def _first_options(self, request_iterator: Iterator[Any], field: str) -> Any:
        try:
            first = next(request_iterator)
        except StopIteration:
            raise InvalidInput(f"empty request stream: send {field} first") from None
        if first.WhichOneof("kind") != "options":
            raise InvalidInput(f"the first message must carry {field}")
        return first.options

    def _images(self, request_iterator: Iterable[Any]) -> Iterator[tuple[str, bytes]]:
        n = 0
        for req in request_iterator:
            if req.WhichOneof("kind") != "image":
                raise InvalidInput("options may only be sent once, as the first message")
            n += 1
            if n > self.config.max_images:
                raise ResourceExhausted(f"more than {self.config.max_images} images in one call")
            yield req.image.id or f"image-{n:06d}", req.image.data

    # -- RPCs
    @map_errors
    def Discover(self, request_iterator, context):  # noqa: N802 - gRPC method name
        msg = self._first_options(request_iterator, "DiscoverOptions")
        if msg.data_dir:
            folder = resolve_data_dir(self.config.data_root, msg.data_dir)
            options = options_from_proto(msg, name=folder.name)
            options.validate()
            items = read_data_dir(folder, Path(self.config.data_root), self.config.max_images,
                                  self.config.max_message_bytes)
            if any(True for _ in request_iterator):
                raise InvalidInput("give either data_dir or streamed images, not both")
        else:
            options = options_from_proto(msg)
            options.validate()
            items = list(self._images(request_iterator))
        if not self._discover_slots.acquire(blocking=False):
            raise ResourceExhausted(f"{self.config.max_concurrent_discover} discoveries are "
                                    f"already running; retry later")
        yield from self._run_discover(items, options, context)

    def _run_discover(self, items: list[tuple[str, bytes]], options: DiscoveryOptions,
                      context: grpc.ServicerContext) -> Iterator[engine_pb2.DiscoverEvent]:
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
                cs = discover(items, self.source, options, progress=on_event)
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
        msg = self._first_options(request_iterator, "ExplainOptions")
        if not msg.concept_set_id:
            raise InvalidInput("ExplainOptions.concept_set_id is required")
        cs = self.store.get(msg.concept_set_id)
        threshold = msg.threshold or None
        min_area = msg.min_area or None
        kept: dict[str, bytes] = {}

        def images() -> Iterator[tuple[str, bytes]]:
            for item_id, data in self._images(request_iterator):
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
        data = self.store.read_bytes(request.id) if request.include_file else b""
        msg = concept_set_to_proto(self.store.get(request.id))
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
    return drawing.encode_png(drawing.overlay(img, e.polygons, e.certainties, names=names,
                                              present=e.present))


# ---------------------------------------------------------------------- the server
def make_source(config: EngineConfig) -> FeatureSource:
    """FeatureClient over the configured feature servers, else an in-process Extractor."""
    if config.feature_servers:
        from feature_server.client import FeatureClient

        log.info("activations from feature server(s) %s", ", ".join(config.feature_servers))
        return FeatureClient(list(config.feature_servers), timeout=config.feature_timeout_s,
                             max_message_mb=config.max_message_mb)
    from feature_server.extractor import Extractor

    log.info("no feature server given: extracting in-process (ONNX Runtime)")
    return Extractor.from_cache(config.models_home)


@dataclass
class RunningEngine:
    """A started engine server and what it needs to stop gracefully."""

    server: grpc.Server
    port: int
    health: health.HealthServicer
    servicer: ConceptEngineServicer
    config: EngineConfig

    def stop(self, grace: float | None = None) -> None:
        grace = self.config.grace_s if grace is None else grace
        log.info("shutting down: health NOT_SERVING, draining in-flight calls (grace %.0fs)",
                 grace)
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait()
        close = getattr(self.servicer.source, "close", None)
        if callable(close):
            close()


def start_server(config: EngineConfig, source: FeatureSource | None = None) -> RunningEngine:
    """Build and start the engine (port 0 picks a free port; see ``RunningEngine.port``)."""
    source = source if source is not None else make_source(config)
    store = ConceptSetStore(config.store_dir)
    server = serving.create_server(max_message_bytes=config.max_message_bytes,
                                   max_workers=config.max_workers, thread_name_prefix="engine")
    servicer = ConceptEngineServicer(source, store, config)
    engine_pb2_grpc.add_ConceptEngineServicer_to_server(servicer, server)
    service_name = engine_pb2.DESCRIPTOR.services_by_name["ConceptEngine"].full_name
    port, health_servicer = serving.start(server, service_name, config.host, config.port)
    log.info("concept engine listening on %s:%d (store %s, data root %s)", config.host, port,
             config.store_dir, config.data_root or "none")
    return RunningEngine(server, port, health_servicer, servicer, config)


def serve(config: EngineConfig) -> int:
    """Run until SIGTERM/SIGINT, then shut down gracefully; returns the exit code (0)."""
    running = start_server(config)
    return serving.run_until_signal(running.stop)


__all__ = ["ConceptEngineServicer", "EngineConfig", "RunningEngine", "make_source",
           "resolve_data_dir", "serve", "start_server"]

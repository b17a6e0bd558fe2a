"""gRPC client of the feature service: the same :class:`FeatureSource` interface as the
in-process Extractor, over one or several feature-server addresses.

- Items are dealt round-robin into shards, one Extract stream per shard, shards spread over
  the addresses (``streams_per_address`` streams each). Each address is a gRPC target; with
  ``dns:///name:port`` the channel's ``round_robin`` LB policy spreads streams over every
  resolved backend (a Kubernetes headless Service); such targets get ``DNS_STREAMS`` streams
  unless ``streams_per_address`` says otherwise.
- Every call carries a deadline (``timeout`` + ``timeout_per_item`` per image for streams), and
  a stream whose replica answers nothing for ``item_deadline`` seconds while items are in
  flight is cancelled: its items move to another replica (a frozen replica costs seconds, not
  the stream deadline).
- No query of death: an item whose stream died (replica gone, reset, frozen) is re-sent once,
  to another replica, one item at a time (so that a second death names the one item that was
  in flight, and the items after it are not blamed); an item that was in flight on two
  replicas that both failed is answered with a QueryOfDeath error and never sent to a third.
- A stream refused before any item was delivered (RESOURCE_EXHAUSTED, UNAVAILABLE on connect)
  is retried with exponential backoff + jitter within ``retry_budget`` seconds (default: the
  call ``timeout``, at most 60 s), rotating the addresses; the final error says what was tried.
- ``connections_per_address`` (or ``DFF_CONNECTIONS_PER_ADDRESS``) opens that many TCP
  connections to each address, each with ``streams_per_address`` streams: a feature server
  run with ``--workers N`` (N processes on one port, SO_REUSEPORT) gets each connection on one
  of its processes, so a client needs about N connections to use them all.
- Items are encoded files or decoded pixels (uint8 (H, W, 3) BGR arrays, sent as DecodedImage
  messages). With ``decode_locally`` (or ``DFF_CLIENT_DECODE=1``) the client decodes files
  itself, on its own threads a few items ahead of the stream, and sends the pixels: the server
  then spends no CPU on decoding (~2 ms a photo), which is what limits a GPU server's
  throughput. Files whose decoded form is not plain 8-bit colour, or that fail to decode here,
  are sent as they are (the server answers them as always).
- With ``prepare_locally`` (or ``DFF_CLIENT_PREPARE=1``) the client also preprocesses, with
  the server's own code and the preprocessing DescribeModel states, and sends the network
  inputs (PreparedImage): the server then neither decodes nor preprocesses. With
  ``prepared_dtype="float16"`` (or ``DFF_CLIENT_PREPARE=float16``) it sends them as float16:
  half the bytes, which the server's CPU pays for more than for anything else on this path;
  on CUDA lossless for the fp16 models (their first step rounds the input to float16), and
  within 1/16 of a grey level (of 255) of the float32 inputs otherwise (fp32 activations
  ~0.03% apart). Int8 models, and servers that do not state ``accepts_prepared_float16``,
  get float32. The default, ``"auto"``, sends float16 where it is lossless - an fp16 model
  on a server that states ``half_io`` (the model takes float16 itself) - and float32
  elsewhere.
- TLS / mutual TLS / bearer token come from ``security`` (default: the process default, see
  :mod:`dff_protos.security`).
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import logging
import os
import queue
import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import cv2
import grpc
import numpy as np
from dff_protos import errors
from dff_protos.security import ClientSecurity, default_client_security
from dff_protos.status import error_from_rpc
from dff_protos.v1 import features_pb2, features_pb2_grpc

from feature_server import kernels
from feature_server.convert import (
    PreparedInputs,
    describe_from_proto,
    image_request,
    options_to_proto,
    result_from_proto,
)
from feature_server.extractor import ExtractOptions, ExtractResult, ImageData
from feature_server.images import (
    DecodeLimits,
    check_pixels,
    decode_image,
    decode_pixels,
    pixels_to_image,
    preprocess,
)
from feature_server.models.registry import DEFAULT_CLASSIFIER, Preprocessing

log = logging.getLogger(__name__)

DNS_STREAMS = 4
_NOT_RETRYABLE = frozenset({grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNIMPLEMENTED,
                            grpc.StatusCode.PERMISSION_DENIED,
                            grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.NOT_FOUND,
                            grpc.StatusCode.FAILED_PRECONDITION})


#: Decoded images the client may hold ahead of the stream (besides the count bound).
LOOKAHEAD_BYTES = 256 * 1024 * 1024


def _ready_bytes(window: Iterable[concurrent.futures.Future[Any]]) -> int:
    """Bytes of the decoded images already waiting in ``window``."""
    total = 0
    for f in window:
        if f.done() and not f.cancelled() and f.exception() is None:
            total += _payload_bytes(f.result())
    return total


def _payload_bytes(payload: Any) -> int:
    if isinstance(payload, np.ndarray):
        return int(payload.nbytes)
    if isinstance(payload, PreparedInputs):
        return sum(int(a.nbytes) for a in (payload.features_input, payload.classifier_input)
                   if a is not None)
    return len(payload)


def _as_file(data: ImageData) -> bytes:
    """An item as an encoded file: pixels become a PNG (lossless: decoded, the same pixels)."""
    if not isinstance(data, np.ndarray):
        return data
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(data))
    if not ok:
        raise errors.InvalidInput("could not encode the pixels as PNG")
    return buf.tobytes()


def parse_addresses(addresses: str | Sequence[str]) -> list[str]:
    """'a:1,b:2' or ['a:1', 'b:2'] -> ['a:1', 'b:2']."""
    if isinstance(addresses, str):
        addresses = addresses.split(",")
    out = [a.strip() for a in addresses if a.strip()]
    if not out:
        raise errors.InvalidInput("no feature-server address given")
    return out


def delivered(exc: BaseException) -> bool:
    """Did a failed stream's items reach a replica (which then failed with them)? False for a
    refusal before any work: overload, auth, or a connection that never came up."""
    if not isinstance(exc, grpc.RpcError):
        return True
    code = exc.code()
    if code in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAUTHENTICATED,
                grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNIMPLEMENTED):
        return False
    text = (exc.details() or "").lower()
    return not (code == grpc.StatusCode.UNAVAILABLE
                and ("connect" in text or "refused" in text or "dns" in text))


@dataclass
class _Shard:
    indices: list[int]
    address_index: int


class ClientClosed(errors.Unavailable):
    """The client was closed while items were still to be sent: they are not retried."""


#: the longest wait between two attempts to reconnect to a replica that is down
RECONNECT_BACKOFF_MAX_MS = 3000

#: the longest error message the client makes of several (attempts, replicas)
MAX_ERROR_CHARS = 1000


def _bounded(text: str, limit: int = MAX_ERROR_CHARS) -> str:
    return text if len(text) <= limit else f"{text[:limit - 20]}... ({len(text)} chars)"


def _attempts(tried: Sequence[str]) -> str:
    """'a: UNAVAILABLE (x12); b: RESOURCE_EXHAUSTED' - each outcome once, with its count."""
    counts = collections.Counter(tried)
    return _bounded("; ".join(f"{t} (x{n})" if n > 1 else t for t, n in counts.items()))


def _local_error(exc: BaseException, what: str) -> errors.DFFError:
    """A failure on this side (building a request): not a replica's, never retried. A domain
    error as it is; anything else as Internal naming it (bounded)."""
    if isinstance(exc, errors.DFFError):
        return exc
    err = errors.Internal(_bounded(f"{what} failed in the client: {type(exc).__name__}: {exc}",
                                   500))
    err.__cause__ = exc
    return err


class _Local(Exception):
    """A stream ended by a failure on the client's side: its items fail with ``error``."""

    def __init__(self, error: errors.DFFError) -> None:
        super().__init__(str(error))
        self.error = error


@dataclass(frozen=True)
class _Failed:
    """What the client could not make of one item (its conversion raised)."""

    error: BaseException


@dataclass
class _Run:
    """One ``extract`` call's shared state: ``stop`` is set when its caller stops reading
    (the generator is closed, or raised); ``calls`` are the streams in flight, cancelled
    then."""
    stop: threading.Event = field(default_factory=threading.Event)
    calls: list[Any] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def started(self, call: Any) -> None:
        with self.lock:
            self.calls.append(call)
            stopped = self.stop.is_set()
        if stopped:
            call.cancel()

    def abandon(self) -> None:
        with self.lock:
            self.stop.set()
            calls = list(self.calls)
        for call in calls:
            call.cancel()


class FeatureClient:
    """FeatureSource over gRPC feature servers (see the module docstring)."""

    def __init__(self, addresses: str | Sequence[str], *, timeout: float = 60.0,
                 timeout_per_item: float = 5.0, streams_per_address: int | None = None,
                 max_attempts: int = 3, max_message_mb: int = 64,
                 item_deadline: float = 30.0, retry_budget: float | None = None,
                 security: ClientSecurity | None = None,
                 decode_locally: bool | None = None,
                 connections_per_address: int | None = None,
                 prepare_locally: bool | None = None,
                 prepared_dtype: str | None = None) -> None:
        self.addresses = parse_addresses(addresses)
        self.decode_locally = (os.environ.get("DFF_CLIENT_DECODE", "0") == "1"
                               if decode_locally is None else decode_locally)
        self._decode_threads = min(8, os.cpu_count() or 1)
        self._decode_pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()
        self._capabilities: dict[str, bool] = {}
        env_prepare = os.environ.get("DFF_CLIENT_PREPARE", "0").strip().lower()
        self.prepare_locally = (env_prepare in ("1", "float16")
                                if prepare_locally is None else prepare_locally)
        self.prepared_dtype = prepared_dtype or ("float16" if env_prepare == "float16"
                                                 else "auto")
        if self.prepared_dtype not in ("auto", "float32", "float16"):
            raise errors.InvalidInput(f"prepared_dtype must be auto, float32 or float16, got "
                                      f"{self.prepared_dtype!r}")
        self.timeout = timeout
        self.timeout_per_item = timeout_per_item
        self.item_deadline = item_deadline
        # a caller who gives a 5 s timeout must not wait a minute for a refusing server
        self.retry_budget = min(60.0, timeout) if retry_budget is None else retry_budget
        if streams_per_address is None:
            # a dns:/// name may resolve to many replicas: open several streams so that the
            # round_robin policy can spread them; a plain host:port is one server
            streams_per_address = DNS_STREAMS if any(
                a.startswith("dns:") for a in self.addresses) else 1
        self.streams_per_address = max(1, streams_per_address)
        self.max_attempts = max(1, max_attempts)  # kept for callers; see _run_shard
        limit = max_message_mb * 1024 * 1024
        self.max_image_bytes = limit - 4096  # room for the message's other fields
        options = [("grpc.max_receive_message_length", limit),
                   ("grpc.max_send_message_length", limit),
                   ("grpc.lb_policy_name", "round_robin"),
                   ("grpc.keepalive_time_ms", 30_000),
                   ("grpc.keepalive_timeout_ms", 10_000),
                   # a replica that comes back is seen within seconds: gRPC's reconnect
                   # backoff grows to 120 s by default, so an engine stayed UNAVAILABLE for
                   # about a minute after its feature server had restarted
                   ("grpc.initial_reconnect_backoff_ms", 500),
                   ("grpc.max_reconnect_backoff_ms", RECONNECT_BACKOFF_MAX_MS)]
        self.security = security if security is not None else default_client_security()
        if connections_per_address is None:
            connections_per_address = int(os.environ.get("DFF_CONNECTIONS_PER_ADDRESS") or 1)
        self.connections_per_address = max(1, connections_per_address)
        if self.connections_per_address > 1:
            # each channel its own TCP connection (gRPC otherwise shares one between channels
            # of equal arguments): a server with several worker processes on one port
            # (SO_REUSEPORT) gets each connection on one of them
            options.append(("grpc.use_local_subchannel_pool", 1))
        # address-major: stub i + 1 is the next address, so fail-over moves to another server
        self._stub_addresses = [a for _ in range(self.connections_per_address)
                                for a in self.addresses]
        self._channels = [self.security.channel(a, options) for a in self._stub_addresses]
        self._stubs = [features_pb2_grpc.FeatureServiceStub(c) for c in self._channels]
        self._closed = False
        self._describe: dict | None = None

    def close(self) -> None:
        self._closed = True
        for channel in self._channels:
            channel.close()
        if self._decode_pool is not None:
            self._decode_pool.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> FeatureClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ health
    def health(self, timeout: float = 2.0) -> dict[str, str]:
        """{address: SERVING / NOT_SERVING / the error code} of every address."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        out = {}
        for address, channel in zip(self.addresses, self._channels[:len(self.addresses)],
                                    strict=True):
            try:
                resp = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=timeout)
                out[address] = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
            except grpc.RpcError as exc:
                out[address] = exc.code().name
        return out

    # ------------------------------------------------------------------ extract
    def extract(self, items: Iterable[tuple[str, ImageData]], options: ExtractOptions
                ) -> Iterator[ExtractResult]:
        """One result per item, in completion order (match them by ``id``). An item is an
        encoded file (bytes) or decoded pixels (uint8 (H, W, 3) BGR array)."""
        items = list(items)
        refused: dict[int, errors.DFFError] = {}
        for i, (_, data) in enumerate(items):
            if isinstance(data, np.ndarray):
                try:  # what the server would refuse is refused here, before it is sent
                    check_pixels(data.shape, data.dtype, DecodeLimits(max_pixels=2**62))
                except errors.DFFError as exc:
                    refused[i] = exc
                    continue
            size = data.nbytes if isinstance(data, np.ndarray) else len(data)
            if size > self.max_image_bytes:
                # it would fail the whole stream at the transport; fail only this item
                what = "decoded pixels" if isinstance(data, np.ndarray) else "encoded image"
                refused[i] = errors.ImageTooLarge(
                    f"{what} of {size} bytes is above the message limit of "
                    f"{self.max_image_bytes} bytes")
        for i, refusal in refused.items():
            yield ExtractResult(items[i][0], error=refusal)
        yield from self._extract([it for i, it in enumerate(items) if i not in refused],
                                 options)

    def _extract(self, items: list[tuple[str, ImageData]], options: ExtractOptions
                 ) -> Iterator[ExtractResult]:
        if not items:
            return
        n_shards = min(len(items), len(self._stubs) * self.streams_per_address)
        results: queue.Queue[tuple[int, ExtractResult] | None] = queue.Queue()
        threads: list[threading.Thread] = []
        run = _Run()
        for s in range(n_shards):
            shard = _Shard(list(range(s, len(items), n_shards)), s % len(self._stubs))
            t = threading.Thread(target=self._run_shard,
                                 args=(shard, items, options, results, run),
                                 name=f"extract-shard-{s}", daemon=True)
            t.start()
            threads.append(t)
        finished = 0
        try:
            while finished < n_shards:
                got = results.get()
                if got is None:
                    finished += 1
                    continue
                yield got[1]
        finally:
            if finished < n_shards:
                # the caller stopped reading: the streams are cancelled, nothing is retried
                run.abandon()
        for t in threads:
            t.join()

    def _run_shard(self, shard: _Shard, items: list[tuple[str, ImageData]],
                   options: ExtractOptions,
                   results: queue.Queue[tuple[int, ExtractResult] | None],
                   run: _Run | None = None) -> None:
        run = run or _Run()

        def fail(indices: Iterable[int], err: errors.DFFError) -> None:
            for i in indices:
                results.put((i, ExtractResult(items[i][0], error=err)))

        try:
            pending = list(shard.indices)
            address_index = shard.address_index
            failed_on: dict[int, list[str]] = {}  # item -> replicas that died with it
            tried: list[str] = []
            started = time.monotonic()
            backoff = 0.1
            while pending and not run.stop.is_set():
                address = self._stub_addresses[address_index]
                # items that were in flight on a failed replica go first, one at a time; the
                # others (never in flight on a failure) follow in a normal stream
                struck = [i for i in pending if i in failed_on]
                batch = struck or pending
                answered, sent, exc = self._stream(self._stubs[address_index], batch, items,
                                                   options, results, one_at_a_time=bool(struck),
                                                   run=run)
                pending = [i for i in pending if i not in answered]
                if not pending or run.stop.is_set():
                    break  # done, or no one reads the answers any more
                if isinstance(exc, ClientClosed) or self._closed:
                    fail(pending, ClientClosed(
                        f"the client was closed with {len(pending)} item(s) unanswered"))
                    break
                if exc is None and struck and not set(struck) & set(pending):
                    continue  # the struck items are done: the rest, normally, same replica
                if isinstance(exc, _Local):  # our own failure: no replica is to blame
                    fail(pending, exc.error)
                    break
                if exc is None:  # a stream that ended cleanly without answering them all
                    fail(pending, errors.Internal(
                        f"{address} ended the stream without answering {len(pending)} item(s)"))
                    break
                code = exc.code() if isinstance(exc, grpc.RpcError) else None
                name = code.name if code is not None else type(exc).__name__
                tried.append(f"{address}: {name}")
                if code in _NOT_RETRYABLE:
                    fail(pending, error_from_rpc(exc) if isinstance(exc, grpc.RpcError)
                         else errors.DFFError(_bounded(str(exc))))
                    break
                nxt = (address_index + 1) % len(self._stubs)
                # a stream that failed before any of these items was sent made no progress:
                # retried with backoff within the budget like a refusal, never in a tight loop
                if delivered(exc) and sent & set(pending):
                    for i in pending:
                        if i in sent:
                            failed_on.setdefault(i, []).append(f"{address} ({name})")
                    dead = [i for i in pending if len(failed_on.get(i, ())) >= 2]
                    for i in dead:
                        fail([i], errors.QueryOfDeath(
                            "suspected query of death: in flight on two replicas that both "
                            f"failed ({', '.join(failed_on[i])}); not sent to a third"))
                    pending = [i for i in pending if i not in set(dead)]
                    if pending:
                        log.warning("stream to %s failed (%s); re-sending %d items to %s",
                                    address, name, len(pending), self._stub_addresses[nxt])
                else:
                    elapsed = time.monotonic() - started
                    if elapsed + backoff > self.retry_budget:
                        err = error_from_rpc(exc) if isinstance(exc, grpc.RpcError) else \
                            errors.Unavailable(str(exc))
                        fail(pending, type(err)(
                            f"{_bounded(str(err), 300)} - gave up after {len(tried)} attempts "
                            f"in {elapsed:.1f}s (retry budget {self.retry_budget:g}s): "
                            f"{_attempts(tried)}"))
                        break
                    pause = backoff * (0.5 + random.random())  # jitter: 0.5x..1.5x
                    log.info("stream to %s refused (%s); retrying on %s in %.2fs", address,
                             name, self._stub_addresses[nxt], pause)
                    time.sleep(pause)
                    backoff = min(backoff * 2, 5.0)
                address_index = nxt
        finally:
            results.put(None)

    def _payloads(self, items: list[tuple[str, ImageData]], indices: list[int],
                  options: ExtractOptions) -> Iterator[ImageData | PreparedInputs | _Failed]:
        """What is sent for each of ``indices``, in order (``_Failed`` where making it
        raised): the item itself; with ``decode_locally`` a file's pixels; with
        ``prepare_locally`` the network inputs made here - converted on the client's threads
        a few items ahead (bounded: at most ``2 * threads`` images and
        :data:`LOOKAHEAD_BYTES` wait). What a server does not take (it predates it) is not
        sent to it: files go as they are, arrays as PNGs of their pixels, which it decodes to
        the very same pixels."""
        arrays = any(isinstance(items[i][1], np.ndarray) for i in indices)
        convert: Callable[[ImageData], ImageData | PreparedInputs] | None = None
        if self.prepare_locally and self._accepts("accepts_prepared_images"):
            pre = self._preprocessing(options)
            if pre is not None:
                precision = self._model_precision(options.model)
                half = (self.prepared_dtype != "float32" and precision != "int8"
                        and (self.prepared_dtype == "float16"
                             or (precision == "fp16" and self._states("half_io")))
                        and self._accepts("accepts_prepared_float16"))
                convert = functools.partial(self._local_inputs, options=options, pre=pre,
                                            half=half)
        if convert is None and (self.decode_locally or self.prepare_locally or arrays):
            convert = (self._local_pixels if self._accepts("accepts_decoded_images")
                       else _as_file)
        if convert is None or (convert == _as_file and not arrays):
            for i in indices:
                yield items[i][1]
            return
        pool = self._pool()
        ahead = 2 * self._decode_threads
        window: collections.deque[concurrent.futures.Future[Any]] = collections.deque()

        def take() -> ImageData | PreparedInputs | _Failed:
            try:
                return window.popleft().result()
            except Exception as exc:  # noqa: BLE001 - that item's failure, the rest go on
                return _Failed(exc)

        try:
            for i in indices:
                window.append(pool.submit(convert, items[i][1]))
                while len(window) >= ahead or (len(window) > 1 and
                                               _ready_bytes(window) > LOOKAHEAD_BYTES):
                    yield take()
            while window:
                yield take()
        finally:
            for fut in window:
                fut.cancel()

    def _preprocessing(self, options: ExtractOptions
                       ) -> tuple[Preprocessing | None, Preprocessing | None] | None:
        """The feature model's and the classifier's preprocessing as DescribeModel states
        them (None for a network the options do not ask for); None when one asked for is
        not described (the images then go as pixels or files)."""
        try:
            described = {m["name"]: m for m in self.describe()["models"]}
        except errors.DFFError:
            return None
        out: list[Preprocessing | None] = []
        for name, wanted in ((options.model, bool(options.layers)),
                             (options.classifier, options.wants_classifier)):
            if not wanted:
                out.append(None)
                continue
            model = described.get(name)
            if model is None:
                return None
            out.append(Preprocessing.from_dict(model["preprocessing"]))
        return out[0], out[1]

    def _model_precision(self, model: str) -> str:
        """The precision DescribeModel states for ``model`` ('' when unknown). An int8 model
        gets float32 inputs even where float16 ones were asked for: its own quantisation of
        the input turns their rounding (< 1/16 of a grey level) into ~4% different
        activations, against ~0.03% for fp32 and none for fp16 on CUDA."""
        try:
            for m in self.describe()["models"]:
                if m["name"] == model:
                    return str(m.get("precision", ""))
        except errors.DFFError:
            pass
        return ""

    def _local_inputs(self, data: ImageData, *, options: ExtractOptions,
                      pre: tuple[Preprocessing | None, Preprocessing | None],
                      half: bool = False) -> ImageData | PreparedInputs:
        """The network inputs the server would make of ``data`` (its own preprocessing code),
        rounded to float16 with ``half``; the item unchanged where they cannot be made here
        (the server answers it)."""
        try:
            img = (pixels_to_image(data) if isinstance(data, np.ndarray)
                   else decode_image(data))
        except errors.DFFError:
            return data
        features_pre, classifier_pre = pre
        x = (None if features_pre is None
             else preprocess(img, features_pre, options.resize_mode, options.size))
        cx = None if classifier_pre is None else preprocess(img, classifier_pre)
        if half:
            x = None if x is None else kernels.float_to_half(x)
            cx = None if cx is None else kernels.float_to_half(cx)
        inputs = PreparedInputs(x, cx, (int(img.shape[0]), int(img.shape[1])))
        if sum(a.nbytes for a in (x, cx) if a is not None) > self.max_image_bytes:
            return data
        return inputs

    def accepts_decoded_images(self) -> bool:
        """Whether the servers take DecodedImage requests (DescribeModel says so; False when
        it cannot be asked). Asked once."""
        return self._accepts("accepts_decoded_images")

    def _accepts(self, capability: str) -> bool:
        """A capability DescribeModel states (False when it cannot be asked); asked once."""
        if capability not in self._capabilities:
            try:
                self._capabilities[capability] = bool(self.describe().get(capability))
            except errors.DFFError as exc:
                log.warning("DescribeModel failed (%s): sending encoded images", exc)
                self._capabilities[capability] = False
            if not self._capabilities[capability]:
                log.warning("the feature server does not state %s (it predates it): sending "
                            "%s", capability, "encoded images" if "decoded" in capability
                            else "float32 inputs" if "float16" in capability
                            else "decoded images or files")
        return self._capabilities[capability]

    def _states(self, capability: str) -> bool:
        """A setting DescribeModel states, False when it does not (or cannot be asked); unlike
        :meth:`_accepts` not a sign of an older server, so nothing is logged."""
        try:
            return bool(self.describe().get(capability))
        except errors.DFFError:
            return False

    def _local_pixels(self, data: ImageData) -> ImageData:
        """A file's decoded pixels when that is what the server would compute on; otherwise
        the item unchanged (pixels already, not 8-bit colour, undecodable, too large)."""
        if isinstance(data, np.ndarray) or not (self.decode_locally or self.prepare_locally):
            return data
        try:
            pixels = decode_pixels(data)
        except errors.DFFError:
            return data  # the server refuses it with its own, authoritative message
        if pixels is None or pixels.nbytes > self.max_image_bytes:
            return data
        return pixels

    def _pool(self) -> concurrent.futures.ThreadPoolExecutor:
        with self._pool_lock:
            if self._decode_pool is None:
                self._decode_pool = concurrent.futures.ThreadPoolExecutor(
                    max_workers=self._decode_threads, thread_name_prefix="dff-decode")
            return self._decode_pool

    def _stream(self, stub: features_pb2_grpc.FeatureServiceStub, indices: list[int],
                items: list[tuple[str, ImageData]], options: ExtractOptions,
                results: queue.Queue[tuple[int, ExtractResult] | None],
                one_at_a_time: bool = False, run: _Run | None = None
                ) -> tuple[set[int], set[int], BaseException | None]:
        """One Extract stream; returns the indices answered, the indices handed to gRPC
        (sent), and the error that ended the stream. ``one_at_a_time``: send an item only
        once the previous one is answered."""
        sent: set[int] = set()
        answered: set[int] = set()
        last = [time.monotonic()]
        done = threading.Event()
        progressed = threading.Semaphore(0)
        stuck: list[bool] = []

        try:
            first = features_pb2.ExtractRequest(options=options_to_proto(options))
        except Exception as exc:  # noqa: BLE001 - options no server could take: every item
            return answered, sent, _Local(_local_error(exc, "encoding the options"))
        payloads = self._payloads(items, indices, options)
        broken: list[BaseException] = []  # the request generator itself failed (a bug here)

        def local_failure(i: int, exc: BaseException) -> None:
            # an item this side could not turn into a request: answered here, at once
            answered.add(i)
            results.put((i, ExtractResult(items[i][0], error=_local_error(
                exc, f"making the request for {items[i][0]!r}"))))
            progressed.release()

        def requests() -> Iterator[features_pb2.ExtractRequest]:
            # nothing may escape: gRPC would log each exception with its traceback and end the
            # call as UNKNOWN, which reads like a replica failure and is retried
            try:
                yield first
                for n, i in enumerate(indices):
                    if one_at_a_time and n > 0:
                        while not progressed.acquire(timeout=0.5):
                            if done.is_set():
                                return
                    if done.is_set():
                        return
                    payload = next(payloads)
                    try:
                        if isinstance(payload, _Failed):
                            raise payload.error
                        # the wire id is the item's index, so duplicate caller ids stay distinct
                        request = image_request(str(i), payload)
                    except Exception as exc:  # noqa: BLE001 - that item's error, not sent
                        local_failure(i, exc)
                        continue
                    sent.add(i)
                    yield request
            except Exception as exc:  # noqa: BLE001 - ends the stream; its items fail here
                log.error("making the requests of a stream failed: %s: %s",
                          type(exc).__name__, _bounded(str(exc), 300))
                broken.append(exc)

        deadline = self.timeout + self.timeout_per_item * len(indices)
        try:
            call = stub.Extract(requests(), timeout=deadline)
        except ValueError as exc:  # grpc: "Cannot invoke RPC: Channel closed!"
            return answered, sent, ClientClosed(str(exc))
        if run is not None:
            run.started(call)

        def watchdog() -> None:
            # a replica that answers nothing for item_deadline s while items are in flight
            # (frozen, overloaded) loses them: cancel, and the shard moves them elsewhere
            while not done.wait(min(1.0, self.item_deadline / 4)):
                if time.monotonic() - last[0] > self.item_deadline:
                    stuck.append(True)
                    call.cancel()
                    return

        dog = threading.Thread(target=watchdog, name="extract-watchdog", daemon=True)
        dog.start()
        try:
            for resp in call:
                last[0] = time.monotonic()
                try:
                    i = int(resp.id)
                except ValueError:
                    i = -1
                if i not in sent or i in answered:
                    log.warning("ignoring an answer for an item not in flight (id %r)",
                                resp.id[:40])
                    continue
                answered.add(i)
                results.put((i, result_from_proto(resp, items[i][0])))
                progressed.release()
        except grpc.RpcError as exc:
            if stuck:
                return answered, sent, errors.DeadlineExceeded(
                    f"no answer for {self.item_deadline:g}s (per-item deadline)")
            if broken:
                return answered, sent, _Local(_local_error(broken[0], "making the requests"))
            return answered, sent, exc
        finally:
            done.set()
        if broken:
            return answered, sent, _Local(_local_error(broken[0], "making the requests"))
        return answered, sent, None

    # ------------------------------------------------------------------ metadata
    def describe(self) -> dict:
        """DescribeModel of the first address that answers, as the Extractor's dict."""
        if self._describe is not None:
            return self._describe
        last: grpc.RpcError | None = None
        for stub in self._stubs:
            try:
                resp = stub.DescribeModel(features_pb2.DescribeModelRequest(),
                                          timeout=min(self.timeout, 60.0))
            except grpc.RpcError as exc:
                last = exc
                continue
            self._describe = describe_from_proto(resp)
            return self._describe
        assert last is not None
        raise error_from_rpc(last)

    def class_names(self, classifier: str | None = None) -> list[str]:
        name = classifier or DEFAULT_CLASSIFIER
        for model in self.describe()["models"]:
            if model["name"] == name:
                return list(model["class_names"])
        raise errors.NotFound(f"the feature server has no classifier {name!r}")

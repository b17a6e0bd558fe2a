"""gRPC client of the feature service: the same :class:`FeatureSource` interface as the
in-process Extractor, over one or several feature-server addresses.

- Items are dealt round-robin into shards, one Extract stream per shard, shards spread over
  the addresses (``streams_per_address`` streams each). Each address is a gRPC target; with
  ``dns:///name:port`` the channel's ``round_robin`` LB policy spreads streams over every
  resolved backend (a Kubernetes headless Service); such targets get ``DNS_STREAMS`` streams
  unless ``streams_per_address`` says otherwise.
- Every call carries a deadline (``timeout`` + ``timeout_per_item`` per image for streams).
- When a stream fails (server gone, deadline, overloaded), its unanswered items are re-sent
  on the next address, up to ``max_attempts`` streams per item; after that each unanswered
  item is returned with the error.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import grpc
from dff_protos import errors
from dff_protos.status import error_from_rpc
from dff_protos.v1 import common_pb2, features_pb2, features_pb2_grpc

from feature_server.convert import describe_from_proto, options_to_proto, result_from_proto
from feature_server.extractor import ExtractOptions, ExtractResult
from feature_server.models.registry import DEFAULT_CLASSIFIER

log = logging.getLogger(__name__)

DNS_STREAMS = 4
_NOT_RETRYABLE = frozenset({grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNIMPLEMENTED,
                            grpc.StatusCode.PERMISSION_DENIED,
                            grpc.StatusCode.UNAUTHENTICATED})


def parse_addresses(addresses: str | Sequence[str]) -> list[str]:
    """'a:1,b:2' or ['a:1', 'b:2'] -> ['a:1', 'b:2']."""
    if isinstance(addresses, str):
        addresses = addresses.split(",")
    out = [a.strip() for a in addresses if a.strip()]
    if not out:
        raise errors.InvalidInput("no feature-server address given")
    return out


@dataclass
class _Shard:
    indices: list[int]
    address_index: int
    attempt: int = 1


class FeatureClient:
    """FeatureSource over gRPC feature servers (see the module docstring)."""

    def __init__(self, addresses: str | Sequence[str], *, timeout: float = 60.0,
                 timeout_per_item: float = 5.0, streams_per_address: int | None = None,
                 max_attempts: int = 3, max_message_mb: int = 64) -> None:
        self.addresses = parse_addresses(addresses)
        self.timeout = timeout
        self.timeout_per_item = timeout_per_item
        if streams_per_address is None:
            # a dns:/// name may resolve to many replicas: open several streams so that the
            # round_robin policy can spread them; a plain host:port is one server
            streams_per_address = DNS_STREAMS if any(
                a.startswith("dns:") for a in self.addresses) else 1
        self.streams_per_address = max(1, streams_per_address)
        self.max_attempts = max(1, max_attempts)
        limit = max_message_mb * 1024 * 1024
        self.max_image_bytes = limit - 4096  # room for the message's other fields
        options = [("grpc.max_receive_message_length", limit),
                   ("grpc.max_send_message_length", limit),
                   ("grpc.lb_policy_name", "round_robin")]
        self._channels = [grpc.insecure_channel(a, options=options) for a in self.addresses]
        self._stubs = [features_pb2_grpc.FeatureServiceStub(c) for c in self._channels]
        self._describe: dict | None = None

    def close(self) -> None:
        for channel in self._channels:
            channel.close()

    def __enter__(self) -> FeatureClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ extract
    def extract(self, items: Iterable[tuple[str, bytes]], options: ExtractOptions
                ) -> Iterator[ExtractResult]:
        """One result per item, in completion order (match them by ``id``)."""
        items = list(items)
        too_big = [i for i, (_, data) in enumerate(items) if len(data) > self.max_image_bytes]
        for i in too_big:
            # it would fail the whole stream at the transport; fail only this item
            yield ExtractResult(items[i][0], error=errors.ImageTooLarge(
                f"encoded image of {len(items[i][1])} bytes is above the message limit of "
                f"{self.max_image_bytes} bytes"))
        skip = set(too_big)
        yield from self._extract([it for i, it in enumerate(items) if i not in skip], options)

    def _extract(self, items: list[tuple[str, bytes]], options: ExtractOptions
                 ) -> Iterator[ExtractResult]:
        if not items:
            return
        n_shards = min(len(items), len(self._stubs) * self.streams_per_address)
        results: queue.Queue[tuple[int, ExtractResult] | None] = queue.Queue()
        threads: list[threading.Thread] = []
        for s in range(n_shards):
            shard = _Shard(list(range(s, len(items), n_shards)), s % len(self._stubs))
            t = threading.Thread(target=self._run_shard, args=(shard, items, options, results),
                                 name=f"extract-shard-{s}", daemon=True)
            t.start()
            threads.append(t)
        finished = 0
        while finished < n_shards:
            got = results.get()
            if got is None:
                finished += 1
                continue
            yield got[1]
        for t in threads:
            t.join()

    def _run_shard(self, shard: _Shard, items: list[tuple[str, bytes]],
                   options: ExtractOptions,
                   results: queue.Queue[tuple[int, ExtractResult] | None]) -> None:
        try:
            pending = list(shard.indices)
            address_index, attempt = shard.address_index, 1
            while pending:
                answered, exc = self._stream(self._stubs[address_index], pending, items,
                                             options, results)
                pending = [i for i in pending if i not in answered]
                if exc is None or not pending:
                    break
                code = exc.code() if isinstance(exc, grpc.RpcError) else None
                if attempt >= self.max_attempts or code in _NOT_RETRYABLE:
                    err = error_from_rpc(exc) if isinstance(exc, grpc.RpcError) else \
                        errors.DFFError(str(exc))
                    for i in pending:
                        results.put((i, ExtractResult(items[i][0], error=err)))
                    break
                nxt = (address_index + 1) % len(self._stubs)
                log.warning("stream to %s failed (%s); re-sending %d items to %s",
                            self.addresses[address_index], code, len(pending),
                            self.addresses[nxt])
                address_index, attempt = nxt, attempt + 1
        finally:
            results.put(None)

    def _stream(self, stub: features_pb2_grpc.FeatureServiceStub, indices: list[int],
                items: list[tuple[str, bytes]], options: ExtractOptions,
                results: queue.Queue[tuple[int, ExtractResult] | None]
                ) -> tuple[set[int], BaseException | None]:
        """One Extract stream; returns the indices answered and the error that ended it."""

        def requests() -> Iterator[features_pb2.ExtractRequest]:
            yield features_pb2.ExtractRequest(options=options_to_proto(options))
            for i in indices:
                # the wire id is the item's index, so duplicate caller ids stay distinct
                yield features_pb2.ExtractRequest(
                    image=common_pb2.ImageInput(id=str(i), data=items[i][1]))

        answered: set[int] = set()
        deadline = self.timeout + self.timeout_per_item * len(indices)
        try:
            for resp in stub.Extract(requests(), timeout=deadline):
                i = int(resp.id)
                answered.add(i)
                results.put((i, result_from_proto(resp, items[i][0])))
        except grpc.RpcError as exc:
            return answered, exc
        return answered, None

    # ------------------------------------------------------------------ metadata
    def describe(self) -> dict:
        """DescribeModel of the first address that answers, as the Extractor's dict."""
        if self._describe is not None:
            return self._describe
        last: grpc.RpcError | None = None
        for stub in self._stubs:
            try:
                resp = stub.DescribeModel(features_pb2.DescribeModelRequest(),
                                          timeout=self.timeout)
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

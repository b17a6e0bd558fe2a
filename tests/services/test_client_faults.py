"""FeatureClient against scripted in-process replicas (real gRPC on loopback, no models):
query of death, per-item deadline on a frozen replica, backoff within a budget."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from concurrent import futures

import grpc
from dff_protos import errors
from dff_protos.v1 import common_pb2, features_pb2, features_pb2_grpc

from feature_server.client import ClientClosed, FeatureClient
from feature_server.extractor import ExtractOptions


class Scripted(features_pb2_grpc.FeatureServiceServicer):
    """Answers every image with an empty result, except: ``poison`` data kills the stream
    (like a replica that dies on it), ``mode='frozen'`` never answers, ``mode='busy'`` refuses
    every stream with RESOURCE_EXHAUSTED."""

    def __init__(self, mode: str = "ok") -> None:
        self.mode = mode
        self.streams = 0
        self.seen: list[bytes] = []
        self.release = threading.Event()

    def Extract(self, request_iterator, context) -> Iterator[features_pb2.ExtractResponse]:  # noqa: N802
        self.streams += 1
        if self.mode == "busy":
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "all slots busy")
        for req in request_iterator:
            if not req.HasField("image"):
                continue
            self.seen.append(req.image.data)
            if self.mode == "frozen":
                self.release.wait(30)
                return
            if self.mode == "mute":
                continue  # reads everything, answers nothing, ends the stream cleanly
            if self.mode == "slow":
                time.sleep(0.05)
            if req.image.data == b"poison":
                raise RuntimeError("the replica died on this item")
            yield features_pb2.ExtractResponse(
                id=req.image.id, info=common_pb2.ImageInfo(original_height=1,
                                                           original_width=1))


def _serve(servicer: Scripted) -> tuple[grpc.Server, str]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    features_pb2_grpc.add_FeatureServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, f"127.0.0.1:{port}"


def _run(addresses: list[str], items: list[tuple[str, bytes]], **kw) -> dict:
    with FeatureClient(addresses, streams_per_address=1, timeout=30, **kw) as client:
        return {r.id: r for r in client.extract(items, ExtractOptions())}


def test_query_of_death_is_answered_per_item_and_never_reaches_a_third_replica():
    servicers = [Scripted(), Scripted(), Scripted()]
    started = [_serve(s) for s in servicers]
    try:
        # three shards, one per replica: shard 0 holds the poison
        items = [("p", b"poison")] + [(f"ok{i}", b"fine") for i in range(8)]
        results = _run([a for _, a in started], items)
    finally:
        for server, _ in started:
            server.stop(0)
    assert set(results) == {i for i, _ in items}
    assert isinstance(results["p"].error, errors.QueryOfDeath)
    assert "two replicas" in str(results["p"].error)
    assert all(results[f"ok{i}"].error is None for i in range(8))
    poisoned = [b"poison" in s.seen for s in servicers]
    assert sum(poisoned) == 2  # sent to two replicas, never to the third


def test_frozen_replica_loses_its_items_after_the_per_item_deadline():
    frozen, healthy = Scripted("frozen"), Scripted()
    started = [_serve(frozen), _serve(healthy)]
    try:
        items = [(f"i{i}", b"fine") for i in range(6)]
        results = _run([a for _, a in started], items, item_deadline=1.0)
    finally:
        frozen.release.set()
        for server, _ in started:
            server.stop(0)
    assert all(r.error is None for r in results.values()) and len(results) == 6


def test_busy_replicas_are_retried_with_backoff_and_the_error_says_what_was_tried():
    busy = [Scripted("busy"), Scripted("busy")]
    started = [_serve(s) for s in busy]
    try:
        results = _run([a for _, a in started], [("x", b"fine")], retry_budget=1.0)
    finally:
        for server, _ in started:
            server.stop(0)
    err = results["x"].error
    assert isinstance(err, errors.ResourceExhausted)
    text = str(err)
    assert "gave up after" in text and "RESOURCE_EXHAUSTED" in text
    assert all(a in text for _, a in started)  # both addresses were tried


def test_a_replica_that_is_down_does_not_count_as_a_death():
    healthy = Scripted()
    server, address = _serve(healthy)
    try:
        # the first address refuses connections: its shard moves on without a strike
        items = [(f"i{i}", b"fine") for i in range(4)]
        results = _run(["127.0.0.1:1", address], items, retry_budget=20.0)
    finally:
        server.stop(0)
    assert all(r.error is None for r in results.values()) and len(results) == 4


def test_a_stream_ended_without_answers_fails_its_items_instead_of_looping():
    mute = Scripted("mute")
    server, address = _serve(mute)
    try:
        results = _run([address], [("a", b"fine"), ("b", b"fine")])
    finally:
        server.stop(0)
    assert all(isinstance(r.error, errors.Internal) for r in results.values())
    assert "without answering" in str(results["a"].error)


def test_a_caller_that_stops_reading_cancels_the_streams_and_nothing_is_retried(caplog):
    servicer = Scripted("slow")
    server, address = _serve(servicer)
    items = [(f"i{n}", b"x") for n in range(40)]
    try:
        with caplog.at_level(logging.INFO, logger="feature_server.client"), \
                FeatureClient([address], streams_per_address=2, timeout=30) as client:
            stream = client.extract(items, ExtractOptions())
            next(stream)
            stream.close()  # e.g. a notebook loop left with `break`
            assert servicer.streams == 2
            # the client stays usable
            again = {r.id: r for r in client.extract(items[:3], ExtractOptions())}
            assert sorted(again) == ["i0", "i1", "i2"]
            assert all(r.error is None for r in again.values())
        assert servicer.streams == 4  # no stream of the first call was sent again
        assert len(servicer.seen) < len(items) + 3  # and the rest was never sent
        assert "re-sending" not in caplog.text and "retrying" not in caplog.text
    finally:
        server.stop(None)


def test_closing_the_client_mid_stream_fails_the_rest_instead_of_losing_it():
    server, address = _serve(Scripted("slow"))
    items = [(f"i{n}", b"x") for n in range(40)]
    try:
        client = FeatureClient([address], streams_per_address=1, timeout=30)
        stream = client.extract(items, ExtractOptions())
        first = next(stream)
        client.close()
        rest = list(stream)
        assert first.error is None and len(rest) == len(items) - 1
        unanswered = [r for r in rest if r.error is not None]
        assert unanswered and all(isinstance(r.error, ClientClosed) for r in unanswered)
        assert "the client was closed" in str(unanswered[0].error)
    finally:
        server.stop(None)


def test_a_cancelled_discover_stops_feeding_its_remote_feature_server(tmp_path, caplog):
    """Discover on an engine whose features come from a (scripted, slow) feature server: the
    client cancels after the first progress event; the engine's worker stops at its next one,
    its feature streams are cancelled with it, and the feature server is sent nothing more
    (before the feature client stopped its streams with its caller, it was sent every image)."""
    from dff_protos.v1 import engine_pb2, engine_pb2_grpc
    from fake_source import FakeSource, make_items

    from concept_engine.service import EngineConfig, start_server

    servicer = Scripted("slow")
    server, address = _serve(servicer)
    client = FeatureClient([address], streams_per_address=2, timeout=30)
    fake = FakeSource()

    class Remote:  # the scripted server's (empty) answers; names and models from the fake
        extract = client.extract
        describe = fake.describe
        class_names = fake.class_names

    engine = start_server(EngineConfig(host="127.0.0.1", port=0, store_dir=str(tmp_path),
                                       grace_s=1), Remote())  # type: ignore[arg-type]
    items = make_items(60)
    try:
        with caplog.at_level(logging.INFO, logger="feature_server.client"), \
                grpc.insecure_channel(f"127.0.0.1:{engine.port}") as channel:
            stub = engine_pb2_grpc.ConceptEngineStub(channel)

            def requests():
                yield engine_pb2.DiscoverRequest(options=engine_pb2.DiscoverOptions(k=2))
                for i, data in items:
                    yield engine_pb2.DiscoverRequest(image=common_pb2.ImageInput(id=i, data=data))

            call = stub.Discover(requests(), timeout=60)
            for event in call:
                if event.HasField("progress") and event.progress.stage == "features" \
                        and event.progress.done >= 1:
                    break
            call.cancel()
            deadline = time.monotonic() + 10
            seen = -1
            while time.monotonic() < deadline and seen != len(servicer.seen):
                seen = len(servicer.seen)
                time.sleep(0.5)  # 10 answers' time: nothing new means nothing is being sent
            assert seen == len(servicer.seen) < len(items) // 2
        assert servicer.streams == 2  # nothing was sent again
        assert "re-sending" not in caplog.text and "retrying" not in caplog.text
    finally:
        engine.stop(grace=1)
        client.close()
        server.stop(None)

"""An Extract stream always ends and gives its slot back: a tensor shape that overflows int64,
any exception while one item is read, a reader that fails, a server stopped under a blocked
stream, empty messages sent as keep-alives; cancelled streams are counted as CANCELLED; option
errors name what the client sent. Real servers on loopback port 0 (one stream slot each, so a
slot that is not given back shows as RESOURCE_EXHAUSTED on the next call)."""

from __future__ import annotations

import threading
import time
import urllib.request
from collections.abc import Iterator
from types import SimpleNamespace

import grpc
import pytest
from dff_protos import errors
from dff_protos.serving import NetworkConfig
from dff_protos.v1 import common_pb2, features_pb2, features_pb2_grpc

from feature_server import service as service_module
from feature_server.convert import options_from_proto
from feature_server.extractor import ExtractOptions
from feature_server.service import FeatureServicer, RunningServer, ServerConfig, start_server
from tests.feature_server.test_server import image, opts
from tests.ports import free_port

ItemError = common_pb2.ItemError
BIG = 2**63 - 1  # (2^63-1)^2 == 1 (mod 2^64): 3 x BIG x BIG wraps to 3 in int64


@pytest.fixture(scope="module")
def photo(shared_data) -> bytes:
    return sorted((shared_data / "imagenet_sample").glob("*.JPEG"))[0].read_bytes()


def _server(extractor, **kw) -> RunningServer:
    config = dict(host="127.0.0.1", port=0, max_concurrent_streams=1, stream_wait_s=2,
                  max_waiting_streams=2)
    config.update(kw)
    return start_server(ServerConfig(**config), extractor)


def _stub(running: RunningServer) -> tuple[grpc.Channel, features_pb2_grpc.FeatureServiceStub]:
    channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
    return channel, features_pb2_grpc.FeatureServiceStub(channel)


def _evil(item_id: str = "evil") -> features_pb2.ExtractRequest:
    msg = features_pb2.PreparedImage(id=item_id, original_height=224, original_width=224)
    msg.features_input.CopyFrom(common_pb2.Tensor(data=b"\0" * 12, shape=[3, BIG, BIG],
                                                  dtype=common_pb2.FLOAT32))
    return features_pb2.ExtractRequest(prepared=msg)


def test_a_prepared_shape_that_overflows_int64_fails_only_its_item(extractor, photo):
    running = _server(extractor)
    try:
        channel, stub = _stub(running)
        with channel:
            answers = list(stub.Extract(iter([opts(), image("before", photo), _evil(),
                                              image("after", photo)]), timeout=60))
            # the one slot came back: the next stream is served at once
            [again] = list(stub.Extract(iter([image("again", photo)]), timeout=60))
        t0 = time.monotonic()
        running.stop(grace=1)
        stopped_in = time.monotonic() - t0
    finally:
        running.stop(grace=0)
    by_id = {a.id: a for a in answers}
    assert set(by_id) == {"before", "evil", "after"}
    evil = by_id["evil"].error
    assert evil.code == ItemError.INVALID_ARGUMENT and evil.kind == "InvalidInput"
    assert evil.message == (f"tensor of shape [3, {BIG}, {BIG}] and dtype float32 needs more "
                            f"than {2**62} bytes, got 12")
    assert not by_id["before"].HasField("error") and not by_id["after"].HasField("error")
    assert not again.HasField("error")
    assert stopped_in < 10


def test_any_exception_reading_one_item_is_that_items_error(extractor, photo, monkeypatch):
    def broken(msg):
        raise ValueError("a bug while reading a prepared image")

    monkeypatch.setattr(service_module, "prepared_from_proto", broken)
    running = _server(extractor)
    try:
        channel, stub = _stub(running)
        with channel:
            answers = list(stub.Extract(iter([_evil("p"), image("ok", photo)]), timeout=60))
            [again] = list(stub.Extract(iter([image("again", photo)]), timeout=60))
    finally:
        running.stop(grace=1)
    by_id = {a.id: a for a in answers}
    assert by_id["p"].error.code == ItemError.INTERNAL
    assert "a bug" not in by_id["p"].error.message  # logged, not sent
    assert not by_id["ok"].HasField("error") and not again.HasField("error")


def test_a_failing_reader_ends_the_stream_with_an_error_and_frees_its_slot(extractor, photo,
                                                                           monkeypatch):
    def broken(msg):
        raise RuntimeError("the reader itself failed")

    monkeypatch.setattr(service_module, "options_from_proto", broken)
    running = _server(extractor)
    try:
        channel, stub = _stub(running)
        with channel:
            with pytest.raises(grpc.RpcError) as err:
                list(stub.Extract(iter([image("a", photo), opts()]), timeout=30))
            [again] = list(stub.Extract(iter([image("again", photo)]), timeout=60))
    finally:
        running.stop(grace=1)
    assert err.value.code() == grpc.StatusCode.INTERNAL
    assert not again.HasField("error")


def test_stop_does_not_hang_on_a_stream_that_neither_sends_nor_ends(extractor, photo):
    running = _server(extractor, idle_timeout_s=600)
    release = threading.Event()

    def requests() -> Iterator[features_pb2.ExtractRequest]:
        yield image("a", photo)
        release.wait(60)

    channel, stub = _stub(running)
    try:
        call = stub.Extract(requests(), timeout=60)
        assert next(iter(call)).id == "a"
        t0 = time.monotonic()
        running.stop(grace=1)
        stopped_in = time.monotonic() - t0
        # the handler ended too: its slot is back
        assert running.servicer._streams._slots.acquire(timeout=5)
    finally:
        release.set()
        channel.close()
        running.stop(grace=0)
    assert stopped_in < 10


def test_empty_messages_do_not_keep_a_stream_alive(extractor):
    running = _server(extractor, idle_timeout_s=1)
    stop = threading.Event()

    def keepalives() -> Iterator[features_pb2.ExtractRequest]:
        yield opts()
        while not stop.is_set():
            yield features_pb2.ExtractRequest()
            time.sleep(0.1)

    try:
        channel, stub = _stub(running)
        with channel:
            t0 = time.monotonic()
            with pytest.raises(grpc.RpcError) as err:
                list(stub.Extract(keepalives(), timeout=20))
            took = time.monotonic() - t0
    finally:
        stop.set()
        running.stop(grace=1)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, err.value.details()
    assert took < 10


def test_a_cancelled_extract_is_counted_as_cancelled(extractor, photo):
    running = _server(extractor, network=NetworkConfig(metrics_port=free_port()))
    release = threading.Event()

    def requests() -> Iterator[features_pb2.ExtractRequest]:
        yield image("a", photo)
        release.wait(30)

    try:
        channel, stub = _stub(running)
        with channel:
            call = stub.Extract(requests(), timeout=60)
            next(iter(call))
            call.cancel()
            release.set()
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                url = f"http://127.0.0.1:{running.metrics_port}/metrics"
                with urllib.request.urlopen(url, timeout=10) as resp:
                    metrics = resp.read().decode()
                if 'method="Extract"' in metrics:
                    break
                time.sleep(0.2)
    finally:
        release.set()
        running.stop(grace=1)
    lines = [x for x in metrics.splitlines()
             if x.startswith("dff_requests_total{") and 'method="Extract"' in x]
    assert lines == ['dff_requests_total{code="CANCELLED",method="Extract",server="features"} '
                     '1.0'], lines


@pytest.mark.parametrize(("field", "expected"), [
    ({"resize": common_pb2.ResizePolicy(mode=common_pb2.SHORTER_CROP)}, "SHORTER_CROP"),
    ({"resize": common_pb2.ResizePolicy(mode=99)}, "resize mode 99"),
    ({"wire_dtype": common_pb2.UINT8}, "wire_dtype UINT8"),
    ({"wire_dtype": 77}, "wire_dtype 77"),
])
def test_option_errors_name_what_the_client_sent(field, expected):
    with pytest.raises(errors.InvalidInput) as err:
        options_from_proto(features_pb2.ExtractOptions(**field))
    assert expected in str(err.value) and "invalid" not in str(err.value)


def test_a_precision_the_server_was_started_without_says_so():
    spec = SimpleNamespace(kind="features")
    servicer = FeatureServicer.__new__(FeatureServicer)
    servicer.extractor = SimpleNamespace(registry={"vgg19": spec})
    with pytest.raises(errors.InvalidInput) as err:
        servicer._check_precision(ExtractOptions(precision="int8"))
    text = str(err.value)
    assert "does not serve vgg19 at precision 'int8'" in text and "serves fp32" in text
    assert "dff models build" not in text
    with pytest.raises(errors.InvalidInput, match="precision 'fp16'"):
        servicer._check_precision(ExtractOptions(model="vgg19_fp16"))
    servicer._check_precision(ExtractOptions(precision="fp32"))  # served: no error
    servicer._check_precision(ExtractOptions(model="nope"))  # the Extractor names it

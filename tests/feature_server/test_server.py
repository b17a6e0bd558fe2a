"""The gRPC service in process (loopback, port 0): per-item errors, concurrency, health,
reflection, limits, client fail-over."""

from __future__ import annotations

import threading

import grpc
import numpy as np
import pytest
from dff_protos import wire
from dff_protos.errors import InvalidInput
from dff_protos.v1 import common_pb2, features_pb2, features_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from feature_server.client import FeatureClient
from feature_server.convert import options_to_proto
from feature_server.extractor import ExtractOptions
from feature_server.service import ServerConfig, start_server
from tests.feature_server.test_images import png_claiming
from tests.ports import free_port

ItemError = common_pb2.ItemError


def image(item_id: str, data: bytes) -> features_pb2.ExtractRequest:
    return features_pb2.ExtractRequest(image=common_pb2.ImageInput(id=item_id, data=data))


def opts(**kw) -> features_pb2.ExtractRequest:
    return features_pb2.ExtractRequest(options=options_to_proto(ExtractOptions(**kw)))


@pytest.fixture(scope="module")
def photos(shared_data) -> list[tuple[str, bytes]]:
    files = sorted((shared_data / "imagenet_sample").glob("*.JPEG"))[:8]
    return [(p.name, p.read_bytes()) for p in files]


@pytest.fixture(scope="module")
def local(extractor, photos) -> dict[str, np.ndarray]:
    """In-process conv5_4 of the photos: what the server must return."""
    return {r.id: r.activations["conv5_4"] for r in extractor.extract(photos, ExtractOptions())}


@pytest.mark.slow
def test_bad_inputs_give_item_errors_and_the_stream_goes_on(address, photos, shared_data):
    good = photos[0][1]
    requests = [
        opts(),
        image("good-1", good),
        image("empty", b""),
        image("truncated", good[: len(good) // 3]),
        image("text", b"this is a text file, not an image\n"),
        image("gif", (shared_data / "imagenet_data" / "ant" / "imageNotFound.gif").read_bytes()),
        image("huge", png_claiming(30000, 30000)),
        image("good-2", photos[1][1]),
        opts(layers=("conv5_4", "conv9_9")),
        image("bad-layer", good),
        opts(wire_dtype="float16"),
        image("good-3", photos[2][1]),
    ]
    with grpc.insecure_channel(address) as channel:
        stub = features_pb2_grpc.FeatureServiceStub(channel)
        responses = {r.id: r for r in stub.Extract(iter(requests), timeout=60)}
    assert len(responses) == 9, sorted(responses)
    expect = {"empty": (ItemError.INVALID_IMAGE, "empty"),
              "truncated": (ItemError.INVALID_IMAGE, "truncated"),
              "text": (ItemError.INVALID_IMAGE, "not a supported image"),
              "gif": (ItemError.INVALID_IMAGE, "GIF images are not accepted"),
              "huge": (ItemError.IMAGE_TOO_LARGE, "30000x30000"),
              "bad-layer": (ItemError.INVALID_ARGUMENT, "conv9_9")}
    for item_id, (code, text) in expect.items():
        err = responses[item_id].error
        assert err.code == code, (item_id, err)
        assert text in err.message, (item_id, err.message)
        assert not responses[item_id].activations
    for item_id in ("good-1", "good-2", "good-3"):
        r = responses[item_id]
        assert not r.HasField("error")
        assert wire.from_tensor(r.activations[0].tensor).shape == (512, 14, 14)
    assert responses["good-3"].activations[0].tensor.dtype == common_pb2.FLOAT16
    assert responses["good-1"].info.original_width == 500



def test_float16_wire_carries_exactly_the_in_process_rounding(address, extractor, photos):
    # the server sends the float16 array it rounded (one conversion), the in-process path the
    # same values widened to float32: bit for bit the same numbers either way
    items = photos[:2]
    expect = {r.id: r.activations["conv5_4"]
              for r in extractor.extract(items, ExtractOptions(wire_dtype="float16"))}
    with grpc.insecure_channel(address) as channel:
        stub = features_pb2_grpc.FeatureServiceStub(channel)
        got = list(stub.Extract(iter([opts(wire_dtype="float16")]
                                     + [image(i, d) for i, d in items]), timeout=60))
    assert sorted(r.id for r in got) == sorted(expect)
    for r in got:
        tensor = r.activations[0].tensor
        assert tensor.dtype == common_pb2.FLOAT16 and len(tensor.data) == 2 * 512 * 14 * 14
        half = wire.from_tensor(tensor, as_float32=False)
        assert half.dtype == np.float16
        np.testing.assert_array_equal(half.astype(np.float32), expect[r.id])

def test_bad_options_through_the_client(address, photos):
    with FeatureClient(address) as client:
        results = list(client.extract(photos[:2], ExtractOptions(layers=("pool9",))))
    assert len(results) == 2
    assert all(isinstance(r.error, InvalidInput) and "pool9" in str(r.error) for r in results)


@pytest.mark.slow
def test_concurrent_streams_are_correct_and_batched(address, server, photos, local):
    before = server.batcher.stats.batches, server.batcher.stats.items
    outcomes: dict[int, list] = {}

    def run(k: int) -> None:
        items = photos[2 * k: 2 * k + 2]
        dtype = "float16" if k % 2 else "float32"
        with FeatureClient(address, timeout=120) as client:
            outcomes[k] = [(r, dtype) for r in client.extract(items, ExtractOptions(
                layers=("conv4_4", "conv5_4"), wire_dtype=dtype))]

    threads = [threading.Thread(target=run, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    got = [x for k in range(4) for x in outcomes[k]]
    assert sorted(r.id for r, _ in got) == sorted(local)
    for r, dtype in got:
        assert r.error is None and r.activations["conv4_4"].shape == (512, 28, 28)
        err = np.linalg.norm(r.activations["conv5_4"] - local[r.id]) / np.linalg.norm(local[r.id])
        assert err <= (1e-2 if dtype == "float16" else 1e-6)
    batches = server.batcher.stats.batches - before[0]
    items = server.batcher.stats.items - before[1]
    assert items == 8 and batches < 8  # items of different streams shared batches


def test_health_reflection_and_describe(address, registry):
    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "dff.v1.FeatureService"):
            resp = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(channel)
        (answer,) = refl.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
        names = {s.name for s in answer.list_services_response.service}
        assert {"dff.v1.FeatureService", "grpc.health.v1.Health"} <= names
        desc = features_pb2_grpc.FeatureServiceStub(channel).DescribeModel(
            features_pb2.DescribeModelRequest(), timeout=10)
    assert desc.execution_provider in desc.available_providers
    assert desc.execution_provider in ("CPUExecutionProvider", "CUDAExecutionProvider")
    models = {m.name: m for m in desc.models}
    vgg = models["vgg19"]
    assert vgg.kind == "features" and vgg.weights_sha256 == registry["vgg19"].weights_sha256
    conv = {layer.name: layer for layer in vgg.layers}
    assert list(conv["conv5_4"].shape_at_224) == [512, 14, 14] and conv["conv5_4"].stride == 16
    assert vgg.preprocessing.color_order == "BGR"
    np.testing.assert_allclose(vgg.preprocessing.mean, [103.939, 116.779, 123.68], rtol=1e-6)
    cls = models["efficientnet_lite0"]
    assert cls.num_classes == 1000 and cls.class_names[310] == "ant"
    assert desc.limits.max_pixels == 40_000_000 and desc.limits.max_batch_size == 8


@pytest.mark.slow
def test_client_resends_items_of_a_failed_stream(address, photos, local):
    dead = f"127.0.0.1:{free_port()}"
    with FeatureClient([dead, address], timeout=30) as client:
        results = list(client.extract(photos[:4], ExtractOptions()))
    assert sorted(r.id for r in results) == sorted(n for n, _ in photos[:4])
    for r in results:
        assert r.error is None
        np.testing.assert_allclose(r.activations["conv5_4"], local[r.id], rtol=1e-5, atol=1e-4)
    with FeatureClient([dead], timeout=5, max_attempts=2) as client:
        (only,) = client.extract(photos[:1], ExtractOptions())
    assert only.error is not None and only.id == photos[0][0]


def test_concurrent_stream_limit(extractor, photos):
    running = start_server(ServerConfig(host="127.0.0.1", port=0, max_concurrent_streams=1,
                                        stream_wait_s=0.5),
                           extractor)
    release = threading.Event()

    def slow_requests():
        yield opts()
        release.wait(30)

    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = features_pb2_grpc.FeatureServiceStub(channel)
            first = stub.Extract(slow_requests(), timeout=30)
            grpc.channel_ready_future(channel).result(timeout=10)
            import time

            time.sleep(0.5)  # let the first stream start on the server
            with pytest.raises(grpc.RpcError) as info:
                list(stub.Extract(iter([opts(), image("x", photos[0][1])]), timeout=30))
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            release.set()
            assert list(first) == []
    finally:
        release.set()
        running.stop(grace=1)


def test_response_above_the_message_limit_fails_only_that_item(extractor, photos):
    running = start_server(ServerConfig(host="127.0.0.1", port=0, max_message_mb=2),
                           extractor)
    try:
        requests = [opts(layers=("conv1_1",)), image("too-big", photos[0][1]),
                    opts(), image("fine", photos[0][1])]
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = features_pb2_grpc.FeatureServiceStub(channel)
            responses = {r.id: r for r in stub.Extract(iter(requests), timeout=60)}
        assert responses["too-big"].error.code == ItemError.INVALID_ARGUMENT
        assert "message limit" in responses["too-big"].error.message
        assert not responses["fine"].HasField("error")
    finally:
        running.stop(grace=1)


def test_describe_is_the_same_in_process_and_remote(address, extractor):
    with FeatureClient(address) as client:
        remote = client.describe()
        assert client.class_names() == extractor.class_names()
    local = extractor.describe()
    assert remote["limits"]["max_batch_size"] == 8 and remote["server_version"]
    for key in ("limits", "server_version"):
        remote.pop(key)
    assert remote == local
    cls = next(m for m in local["models"] if m["name"] == "efficientnet_lite0")
    assert cls["class_wnids"][309] == "n02206856"  # bee
    assert cls["preprocessing"]["resize_mode"] == "shorter_crop"


def test_client_refuses_images_above_the_message_limit_per_item(address, photos):
    from dff_protos.errors import ImageTooLarge

    with FeatureClient(address, max_message_mb=1) as client:
        results = {r.id: r for r in client.extract(
            [("big", b"\xff\xd8\xff" + b"\x00" * (2 << 20)), photos[0]], ExtractOptions())}
    assert isinstance(results["big"].error, ImageTooLarge)
    assert results[photos[0][0]].error is None


@pytest.mark.slow
def test_dns_target_with_round_robin_and_several_streams(server, photos, local):
    from feature_server.client import DNS_STREAMS

    before = server.batcher.stats.items
    with FeatureClient(f"dns:///127.0.0.1:{server.port}", timeout=60) as client:
        assert client.streams_per_address == DNS_STREAMS
        results = list(client.extract(photos[:4], ExtractOptions()))
    assert sorted(r.id for r in results) == sorted(n for n, _ in photos[:4])
    assert all(r.error is None for r in results)
    assert server.batcher.stats.items - before == 4
    np.testing.assert_allclose(results[0].activations["conv5_4"], local[results[0].id],
                               rtol=1e-5, atol=1e-4)

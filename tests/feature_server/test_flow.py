"""Flow control and provider choice, without a network: the servicer driven directly."""

from __future__ import annotations

import time

import pytest
from dff_protos.errors import InvalidInput
from dff_protos.v1 import common_pb2, features_pb2

from feature_server.batching import MicroBatcher
from feature_server.extractor import select_providers
from feature_server.service import FeatureServicer, ServerConfig


class FakeContext:
    def is_active(self) -> bool:
        return True

    def peer(self) -> str:
        return "test"

    def abort(self, code, details):  # pragma: no cover - not expected here
        raise AssertionError(f"aborted: {code} {details}")


def test_servicer_does_not_read_unboundedly_ahead(extractor):
    config = ServerConfig(max_inflight_per_stream=2)
    batcher = MicroBatcher(extractor.run)
    servicer = FeatureServicer(extractor, batcher, config)
    pulled = []

    def requests():
        yield features_pb2.ExtractRequest(options=features_pb2.ExtractOptions())
        for i in range(20):
            pulled.append(i)
            yield features_pb2.ExtractRequest(
                image=common_pb2.ImageInput(id=str(i), data=b"not an image"))

    responses = servicer.Extract(requests(), FakeContext())
    first = next(responses)
    assert first.error.code == common_pb2.ItemError.INVALID_IMAGE
    time.sleep(0.3)  # give the reader every chance to run ahead
    assert len(pulled) <= 4  # 2 in-flight slots (+1 freed by the first answer, +1 held)
    rest = list(responses)
    assert len(rest) == 19 and len(pulled) == 20
    servicer.close()
    batcher.close()


def test_stream_ends_when_the_consumer_stops(extractor):
    batcher = MicroBatcher(extractor.run)
    servicer = FeatureServicer(extractor, batcher, ServerConfig(max_inflight_per_stream=1))
    pulled = []

    def requests():
        for i in range(1000):
            pulled.append(i)
            yield features_pb2.ExtractRequest(image=common_pb2.ImageInput(id=str(i), data=b""))

    responses = servicer.Extract(requests(), FakeContext())
    next(responses)
    responses.close()  # the client went away
    time.sleep(0.2)
    assert servicer._streams._slots.acquire(blocking=False)  # the stream slot was given back
    assert len(pulled) < 10  # the reader stopped instead of draining the client
    servicer.close()
    batcher.close()


def test_provider_selection():
    assert select_providers(["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    assert select_providers()[-1] == "CPUExecutionProvider"
    with pytest.raises(InvalidInput, match="not available|none of"):
        select_providers(["NoSuchExecutionProvider"])


@pytest.mark.gpu
def test_cuda_provider_preferred_when_present(registry):
    from feature_server.extractor import Extractor

    assert select_providers()[0] == "CUDAExecutionProvider"
    assert Extractor(registry).execution_provider == "CUDAExecutionProvider"


def test_queued_work_of_a_gone_stream_is_cancelled(extractor, shared_data):
    import numpy as np

    def slow_run(model, batch, outputs):
        time.sleep(0.2)
        return [np.zeros((len(batch), 512, 14, 14), np.float32) for _ in outputs]

    batcher = MicroBatcher(slow_run, max_batch_size=1, max_wait_s=0.0)
    servicer = FeatureServicer(extractor, batcher, ServerConfig(max_inflight_per_stream=8))
    data = (shared_data / "imagenet_sample" / "n01440764_tench.JPEG").read_bytes()

    def requests():
        for i in range(8):
            yield features_pb2.ExtractRequest(image=common_pb2.ImageInput(id=str(i), data=data))

    responses = servicer.Extract(requests(), FakeContext())
    assert not next(responses).HasField("error")
    responses.close()
    servicer.close()
    batcher.close()
    assert batcher.stats.items <= 3  # the rest was cancelled, not computed

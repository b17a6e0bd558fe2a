"""Per-request caps of the feature server over gRPC: the size option, the memory budget, and
TLS + token through FeatureClient (certificates made in the test)."""

from __future__ import annotations

import sys
import urllib.request
from pathlib import Path

import grpc
import pytest
from dff_protos import errors
from dff_protos.security import ClientSecurity, ServerSecurity
from dff_protos.serving import NetworkConfig
from dff_protos.v1 import common_pb2, features_pb2_grpc

from feature_server.client import FeatureClient
from feature_server.extractor import ExtractOptions
from feature_server.service import ServerConfig, start_server
from tests.feature_server.test_server import image, opts

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "services"))
from certs import make_certs  # noqa: E402

from tests.ports import free_port


def _photo(shared_data) -> tuple[str, bytes]:
    p = sorted((shared_data / "imagenet_sample").glob("*.JPEG"))[0]
    return p.name, p.read_bytes()


def test_size_option_and_memory_budget_fail_only_the_item(extractor, shared_data):
    running = start_server(ServerConfig(host="127.0.0.1", port=0, max_input_size=256,
                                        memory_budget_mb=1,
                                        network=NetworkConfig(metrics_port=free_port())),
                           extractor)
    name, data = _photo(shared_data)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = features_pb2_grpc.FeatureServiceStub(channel)
            big = list(stub.Extract(iter([opts(size=2048), image(name, data)]), timeout=60))
            over = list(stub.Extract(iter([opts(size=224), image(name, data)]), timeout=60))
        url = f"http://127.0.0.1:{running.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as resp:
            metrics = resp.read().decode()
    finally:
        running.stop(grace=1)
    assert big[0].error.code == common_pb2.ItemError.INVALID_ARGUMENT
    assert "max-input-size" in big[0].error.message
    # a 500x375 JPEG costs ~3 MiB to decode and run: above a 1 MiB budget
    assert over[0].error.code == common_pb2.ItemError.IMAGE_TOO_LARGE
    assert "memory budget" in over[0].error.message
    assert 'dff_item_errors_total{code="ImageTooLarge",server="features"} 1.0' in metrics
    assert 'dff_item_errors_total{code="InvalidInput",server="features"} 1.0' in metrics
    assert 'dff_requests_total{code="OK",method="Extract",server="features"} 2.0' in metrics


@pytest.mark.slow
def test_feature_client_over_mutual_tls_with_a_token(extractor, shared_data, tmp_path):
    certs = make_certs(tmp_path / "certs")
    tokens = tmp_path / "tokens"
    tokens.write_text("reader-token-0123456789 read\n")
    security = ServerSecurity.from_files(str(certs.server.cert), str(certs.server.key),
                                         str(certs.ca.cert), str(tokens))
    running = start_server(ServerConfig(host="127.0.0.1", port=0,
                                        network=NetworkConfig(security=security)), extractor)
    token_file = tmp_path / "token"
    token_file.write_text("reader-token-0123456789\n")
    item = _photo(shared_data)
    try:
        good = ClientSecurity.from_files(str(certs.ca.cert), str(certs.client.cert),
                                         str(certs.client.key), str(token_file))
        with FeatureClient(f"localhost:{running.port}", security=good) as client:
            [ok] = list(client.extract([item], ExtractOptions()))
            assert client.describe()["models"]
        no_token = ClientSecurity.from_files(str(certs.ca.cert), str(certs.client.cert),
                                             str(certs.client.key))
        with FeatureClient(f"localhost:{running.port}", security=no_token) as client:
            [refused] = list(client.extract([item], ExtractOptions()))
            with pytest.raises(errors.Unauthenticated):
                client.describe()
    finally:
        running.stop(grace=1)
    assert ok.error is None and ok.activations["conv5_4"].shape == (512, 14, 14)
    assert isinstance(refused.error, errors.Unauthenticated)

"""The container health probe against a real grpc.health.v1 server on loopback."""

from __future__ import annotations

from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from exporter import healthcheck


@pytest.fixture
def health_server():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"127.0.0.1:{port}"
    server.stop(0)


def test_serving_not_serving_and_unreachable(health_server, capsys):
    servicer, addr = health_server
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    assert healthcheck.main([addr]) == 0
    assert "SERVING" in capsys.readouterr().out
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    assert healthcheck.main([addr, "-q"]) == 1
    assert healthcheck.main([addr, "--service", "dff.v1.Nope"]) == 1
    assert "NOT_FOUND" in capsys.readouterr().err
    assert healthcheck.main(["127.0.0.1:1", "--timeout", "0.5"]) == 1

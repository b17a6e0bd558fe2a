"""TLS, mutual TLS, role tokens, audit, health-only port, reflection switch and metrics - on a
real engine server (loopback port 0, the deterministic fake feature source), with certificates
made in the test."""

from __future__ import annotations

import logging
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from certs import Certs, make_certs
from dff_protos import errors
from dff_protos.security import (
    ClientSecurity,
    ServerSecurity,
    parse_tokens,
    role_for,
)
from dff_protos.serving import NetworkConfig
from dff_protos.status import error_from_rpc
from dff_protos.v1 import engine_pb2, engine_pb2_grpc
from fake_source import FakeSource, make_items
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from concept_engine.service import EngineConfig, RunningEngine, start_server
from tests.ports import free_port

TOKENS = {"read": "r" * 24, "write": "w" * 24, "admin": "a" * 24}


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


def _engine(tmp: Path, security: ServerSecurity, **net) -> RunningEngine:
    network = NetworkConfig(security=security, **net)
    return start_server(EngineConfig(host="127.0.0.1", port=0, store_dir=str(tmp / "store"),
                                     network=network, grace_s=1), FakeSource())


@pytest.fixture(scope="module")
def mtls_engine(tmp_path_factory, certs) -> Iterator[RunningEngine]:
    tmp = tmp_path_factory.mktemp("mtls")
    tokens = tmp / "tokens"
    tokens.write_text("# token role\n" + "".join(f"{t} {r}\n" for r, t in TOKENS.items()))
    security = ServerSecurity.from_files(str(certs.server.cert), str(certs.server.key),
                                         str(certs.ca.cert), str(tokens))
    running = _engine(tmp, security, health_port=0, metrics_port=0)
    yield running
    running.stop(grace=1)


@pytest.fixture(scope="module")
def tls_engine(tmp_path_factory, certs) -> Iterator[RunningEngine]:
    tmp = tmp_path_factory.mktemp("tls")
    security = ServerSecurity.from_files(str(certs.server.cert), str(certs.server.key))
    # any free port for the extras: bind 0 and read the bound ports back
    running = _engine(tmp, security, health_port=free_port(), metrics_port=free_port(),
                      reflection=False)
    yield running
    running.stop(grace=1)


def _client(certs: Certs, *, ca: bool = True, cert: bool = True, token: str | None = None,
            rogue: bool = False) -> ClientSecurity:
    pair = certs.rogue_client if rogue else certs.client
    return ClientSecurity.from_files(str(certs.ca.cert) if ca else None,
                                     str(pair.cert) if cert else None,
                                     str(pair.key) if cert else None, token=token)


def _list(security: ClientSecurity, port: int, timeout: float = 10) -> object:
    with security.channel(f"localhost:{port}") as channel:
        return engine_pb2_grpc.ConceptEngineStub(channel).ListConceptSets(
            engine_pb2.ListConceptSetsRequest(), timeout=timeout)


def _code(fn) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        fn()
    return err.value.code()


# ---------------------------------------------------------------------- TLS / mTLS
def test_tls_client_with_ca_is_served(tls_engine, certs):
    resp = _list(ClientSecurity.from_files(str(certs.ca.cert)), tls_engine.port)
    assert list(resp.concept_sets) == []


def test_plaintext_client_to_tls_server_is_refused(tls_engine):
    assert _code(lambda: _list(ClientSecurity(), tls_engine.port, timeout=5)) == \
        grpc.StatusCode.UNAVAILABLE


def test_tls_client_trusting_another_ca_is_refused(tls_engine, certs):
    wrong = ClientSecurity.from_files(str(certs.rogue_ca.cert))
    assert _code(lambda: _list(wrong, tls_engine.port, timeout=5)) == \
        grpc.StatusCode.UNAVAILABLE


def test_mtls_client_with_certificate_and_token_is_served(mtls_engine, certs):
    resp = _list(_client(certs, token=TOKENS["read"]), mtls_engine.port)
    assert list(resp.concept_sets) == []


def test_mtls_client_without_certificate_is_refused(mtls_engine, certs):
    no_cert = _client(certs, cert=False, token=TOKENS["read"])
    assert _code(lambda: _list(no_cert, mtls_engine.port, timeout=5)) == \
        grpc.StatusCode.UNAVAILABLE


def test_mtls_client_with_untrusted_certificate_is_refused(mtls_engine, certs):
    rogue = _client(certs, rogue=True, token=TOKENS["read"])
    assert _code(lambda: _list(rogue, mtls_engine.port, timeout=5)) == \
        grpc.StatusCode.UNAVAILABLE


# ---------------------------------------------------------------------- tokens and roles
def _calls(stub: engine_pb2_grpc.ConceptEngineStub) -> dict[str, object]:
    def discover() -> object:
        # options and no images: past authorisation this is a domain error, not a role one
        return list(stub.Discover(iter([engine_pb2.DiscoverRequest(
            options=engine_pb2.DiscoverOptions(name="x", k=2))]), timeout=30))

    return {
        "list": lambda: stub.ListConceptSets(engine_pb2.ListConceptSetsRequest(), timeout=10),
        "get": lambda: stub.GetConceptSet(engine_pb2.GetConceptSetRequest(id="nope"),
                                          timeout=10),
        "discover": discover,
        "delete": lambda: stub.DeleteConceptSet(
            engine_pb2.DeleteConceptSetRequest(id="nope"), timeout=10),
    }


def _outcome(fn) -> str:
    try:
        fn()
    except grpc.RpcError as exc:
        return exc.code().name
    return "OK"


@pytest.mark.parametrize("role, expected", [
    (None, {"list": "UNAUTHENTICATED", "get": "UNAUTHENTICATED",
            "discover": "UNAUTHENTICATED", "delete": "UNAUTHENTICATED"}),
    ("unknown", {"list": "UNAUTHENTICATED", "get": "UNAUTHENTICATED",
                 "discover": "UNAUTHENTICATED", "delete": "UNAUTHENTICATED"}),
    ("read", {"list": "OK", "get": "NOT_FOUND", "discover": "PERMISSION_DENIED",
              "delete": "PERMISSION_DENIED"}),
    ("write", {"list": "OK", "get": "NOT_FOUND", "discover": "FAILED_PRECONDITION",
               "delete": "PERMISSION_DENIED"}),
    ("admin", {"list": "OK", "get": "NOT_FOUND", "discover": "FAILED_PRECONDITION",
               "delete": "OK"}),
])
def test_each_role_gets_exactly_its_methods(mtls_engine, certs, role, expected):
    token = None if role is None else TOKENS.get(role, "x" * 24)
    with _client(certs, token=token).channel(f"localhost:{mtls_engine.port}") as channel:
        stub = engine_pb2_grpc.ConceptEngineStub(channel)
        got = {name: _outcome(fn) for name, fn in _calls(stub).items()}
    assert got == expected


def test_refusals_map_to_their_domain_errors(mtls_engine, certs):
    with _client(certs, token=TOKENS["read"]).channel(
            f"localhost:{mtls_engine.port}") as channel:
        stub = engine_pb2_grpc.ConceptEngineStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.DeleteConceptSet(engine_pb2.DeleteConceptSetRequest(id="x"), timeout=10)
    assert isinstance(error_from_rpc(err.value), errors.PermissionDenied)
    assert "admin" in err.value.details()


def test_delete_is_audited_with_role_and_peer_and_tokens_are_never_logged(
        mtls_engine, certs, caplog):
    caplog.set_level(logging.DEBUG)
    with _client(certs, token=TOKENS["admin"]).channel(
            f"localhost:{mtls_engine.port}") as channel:
        engine_pb2_grpc.ConceptEngineStub(channel).DeleteConceptSet(
            engine_pb2.DeleteConceptSetRequest(id="some-set"), timeout=10)
    with _client(certs, token="z" * 24).channel(f"localhost:{mtls_engine.port}") as channel:
        _outcome(lambda: engine_pb2_grpc.ConceptEngineStub(channel).ListConceptSets(
            engine_pb2.ListConceptSetsRequest(), timeout=10))
    audit = [r.getMessage() for r in caplog.records if r.name == "dff.audit"]
    assert any("DeleteConceptSet" in m and "'some-set'" in m and "role=admin" in m
               and "peer=ipv4:127.0.0.1:" in m for m in audit), audit
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert all(t not in text for t in [*TOKENS.values(), "z" * 24])


def test_health_needs_no_token(mtls_engine, certs):
    with _client(certs).channel(f"localhost:{mtls_engine.port}") as channel:
        resp = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                         timeout=10)
    assert resp.status == health_pb2.HealthCheckResponse.SERVING


def test_token_file_parsing():
    assert parse_tokens("# c\n\n" + "t" * 16 + " read  # note\n") == {"t" * 16: "read"}
    with pytest.raises(errors.InvalidInput, match="line 1") as err:
        parse_tokens("secret-secret-secret root\n")
    assert "secret" not in str(err.value)
    with pytest.raises(errors.InvalidInput, match="16 characters"):
        parse_tokens("short read\n")
    with pytest.raises(errors.InvalidInput, match="no token"):
        parse_tokens("# nothing\n")
    assert role_for({"a" * 16: "admin"}, "a" * 16) == "admin"
    assert role_for({"a" * 16: "admin"}, "a" * 15) is None


def test_half_configured_tls_is_refused(certs):
    with pytest.raises(errors.InvalidInput, match="go together"):
        ServerSecurity.from_files(str(certs.server.cert))
    with pytest.raises(errors.InvalidInput, match="needs --tls-cert"):
        ServerSecurity.from_files(client_ca=str(certs.ca.cert))
    with pytest.raises(errors.InvalidInput, match="cannot read"):
        ServerSecurity.from_files(tokens="/nonexistent/tokens")


# ---------------------------------------------------------------------- ports and switches
def test_plaintext_health_port_answers_health_only(tls_engine):
    with grpc.insecure_channel(f"127.0.0.1:{tls_engine.health_port}") as channel:
        resp = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                         timeout=10)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
        code = _code(lambda: engine_pb2_grpc.ConceptEngineStub(channel).ListConceptSets(
            engine_pb2.ListConceptSetsRequest(), timeout=10))
    assert code == grpc.StatusCode.UNIMPLEMENTED


def test_reflection_can_be_switched_off(tls_engine, mtls_engine, certs):
    def services(security: ClientSecurity, port: int) -> object:
        with security.channel(f"localhost:{port}") as channel:
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            req = reflection_pb2.ServerReflectionRequest(list_services="")
            return [s.name for r in stub.ServerReflectionInfo(iter([req]), timeout=10)
                    for s in r.list_services_response.service]

    assert _code(lambda: services(ClientSecurity.from_files(str(certs.ca.cert)),
                                  tls_engine.port)) == grpc.StatusCode.UNIMPLEMENTED
    assert "dff.v1.ConceptEngine" in services(_client(certs, token=TOKENS["read"]),
                                              mtls_engine.port)


def test_metrics_endpoint_counts_requests(tls_engine, certs):
    _list(ClientSecurity.from_files(str(certs.ca.cert)), tls_engine.port)
    url = f"http://127.0.0.1:{tls_engine.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as resp:
        text = resp.read().decode()
    assert 'dff_requests_total{code="OK",method="ListConceptSets",server="engine"}' in text
    assert "process_resident_memory_bytes" in text
    assert "dff_inflight_bytes" in text


def test_default_bind_is_loopback_and_flags_have_env_fallbacks(monkeypatch, certs):
    from exporter.cli import build_parser

    for cmd in (["serve", "engine"], ["serve", "features"]):
        args = build_parser().parse_args(cmd)
        assert args.host == "127.0.0.1" and args.health_port == 0 and args.metrics_port == 0
    monkeypatch.setenv("DFF_HOST", "0.0.0.0")
    monkeypatch.setenv("DFF_TLS_CERT", str(certs.server.cert))
    monkeypatch.setenv("DFF_TLS_KEY", str(certs.server.key))
    monkeypatch.setenv("DFF_HEALTH_PORT", "50062")
    monkeypatch.setenv("DFF_FEATURE_TLS_CA", str(certs.ca.cert))
    args = build_parser().parse_args(["serve", "engine"])
    assert (args.host, args.health_port, args.feature_tls_ca) == \
        ("0.0.0.0", 50062, str(certs.ca.cert))
    from concept_engine.cli import config_from_args

    config = config_from_args(args)
    assert config.network.security.tls and not config.network.security.mtls
    assert config.feature_security is not None and config.feature_security.tls
    monkeypatch.setenv("DFF_CLIENT_TLS_CA", str(certs.ca.cert))
    monkeypatch.setenv("DFF_TOKEN", "t" * 20)
    client = ClientSecurity.from_env()
    assert client.tls and client.token == "t" * 20
    assert "t" * 20 not in repr(client)


def test_streamed_discover_still_works_with_tokens(mtls_engine, certs):
    items = make_items(6)
    with _client(certs, token=TOKENS["write"]).channel(
            f"localhost:{mtls_engine.port}") as channel:
        stub = engine_pb2_grpc.ConceptEngineStub(channel)
        reqs = [engine_pb2.DiscoverRequest(options=engine_pb2.DiscoverOptions(
            name="ant", k=2, prediction_filter=3, certainty_filter=3, min_images=2))]
        from dff_protos.v1 import common_pb2

        reqs += [engine_pb2.DiscoverRequest(image=common_pb2.ImageInput(id=i, data=d))
                 for i, d in items]
        events = list(stub.Discover(iter(reqs), timeout=60))
    assert events[-1].HasField("summary") and events[-1].summary.k == 2

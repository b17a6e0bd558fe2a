"""Failures that must stay small and clear: a client-side exception while building a request
is that item's (or the call's) error at once, never retried; aggregated error messages are
bounded; bad TLS material and token files are refused at startup naming the file and line;
refused DeleteConceptSet attempts are audited. Real gRPC on loopback port 0."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading

import grpc
import pytest
from certs import make_certs
from dff_protos import errors
from dff_protos.security import ClientSecurity, ServerSecurity, load_tokens, parse_tokens
from dff_protos.serving import NetworkConfig
from dff_protos.v1 import engine_pb2, engine_pb2_grpc
from fake_source import FakeSource
from test_client_faults import Scripted, _run, _serve

from concept_engine.service import EngineConfig, start_server
from feature_server import client as client_module
from tests.services.procs import ROOT


# ---------------------------------------------------------------------- the feature client
def test_a_local_exception_building_a_request_fails_that_item_at_once(monkeypatch, caplog):
    real = client_module.image_request

    def stand_in(item_id, data):
        if data == b"boom":
            raise RuntimeError("the client's own bug")
        return real(item_id, data)

    monkeypatch.setattr(client_module, "image_request", stand_in)
    replica = Scripted()
    server, address = _serve(replica)
    try:
        items = [("a", b"fine"), ("b", b"boom"), ("c", b"fine")]
        results = _run([address], items, retry_budget=5.0)
    finally:
        server.stop(0)
    assert set(results) == {"a", "b", "c"}
    assert results["a"].error is None and results["c"].error is None
    err = results["b"].error
    assert isinstance(err, errors.Internal)
    assert "RuntimeError: the client's own bug" in str(err) and len(str(err)) < 600
    assert replica.streams == 1 and b"boom" not in replica.seen  # no retry, never sent
    assert "Exception iterating requests" not in caplog.text


def test_options_the_client_cannot_encode_fail_the_call_at_once(monkeypatch):
    def stand_in(options):
        raise errors.InvalidInput("unknown wire dtype 'int4' (float32 or float16)")

    monkeypatch.setattr(client_module, "options_to_proto", stand_in)
    replica = Scripted()
    server, address = _serve(replica)
    done: dict = {}
    try:
        worker = threading.Thread(target=lambda: done.update(
            _run([address], [("a", b"fine"), ("b", b"fine")], retry_budget=5.0)))
        worker.start()
        worker.join(20)
    finally:
        server.stop(0)
    assert not worker.is_alive(), "the client retried a local error"
    assert replica.streams == 0
    assert all(isinstance(r.error, errors.InvalidInput) and "int4" in str(r.error)
               for r in done.values()) and len(done) == 2


def test_the_retry_error_names_each_outcome_once_with_its_count():
    replica = Scripted("busy")
    server, address = _serve(replica)
    try:
        results = _run([address], [("a", b"fine")], retry_budget=2.0)
    finally:
        server.stop(0)
    text = str(results["a"].error)
    assert replica.streams >= 3 and "gave up after" in text
    assert text.count(f"{address}: RESOURCE_EXHAUSTED") == 1  # not once per attempt
    assert f"{address}: RESOURCE_EXHAUSTED (x{replica.streams})" in text
    assert len(text) < 1000


# ---------------------------------------------------------------------- startup refusals
def test_token_file_bom_and_duplicate_tokens(tmp_path):
    bom = tmp_path / "bom.txt"
    bom.write_bytes("\ufeffbomadmin-token-aaaaaaaa admin\n".encode())
    assert load_tokens(str(bom)) == {"bomadmin-token-aaaaaaaa": "admin"}
    for second in ("admin", "read"):
        with pytest.raises(errors.InvalidInput) as err:
            parse_tokens("# c\ndup-token-aaaaaaaaaaaaa admin\n\n"
                         f"dup-token-aaaaaaaaaaaaa {second}\n", "tokens.txt")
        text = str(err.value)
        assert "tokens.txt lines 2 and 4" in text and "twice" in text
        assert "dup-token" not in text  # never the token


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_certs(tmp_path_factory.mktemp("certs"))


def test_bad_tls_material_is_named_at_startup(certs, tmp_path):
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    cert, key, ca = str(certs.server.cert), str(certs.server.key), str(certs.ca.cert)
    other_key = str(certs.client.key)
    cases = [((cert, other_key, None), f"--tls-key {other_key} does not match"),
             ((str(garbage), key, None), f"--tls-cert {garbage}: not a PEM certificate"),
             ((cert, key, str(garbage)), f"--tls-client-ca {garbage}: not a PEM CA"),
             ((key, cert, None), "swapped")]
    for (c, k, a), expected in cases:
        with pytest.raises(errors.InvalidInput) as err:
            ServerSecurity.from_files(c, k, a)
        assert expected in str(err.value)
    ServerSecurity.from_files(cert, key, ca)  # the good material passes


@pytest.mark.parametrize("command", ["features", "engine"])
def test_serve_with_a_key_that_does_not_match_exits_2_naming_it(certs, tmp_path, command):
    args = [sys.executable, "-m", "exporter.cli", "serve", command, "--port", "0",
            "--tls-cert", str(certs.server.cert), "--tls-key", str(certs.client.key)]
    if command == "engine":
        args += ["--store", str(tmp_path / "store")]
    else:
        args += ["--no-build"]
    env = dict(os.environ, PYTHONPATH=f"{ROOT / 'protos'}{os.pathsep}{ROOT}")
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert f"error: --tls-key {certs.client.key} does not match the certificate" in last
    assert "could not bind" not in proc.stderr and "Traceback" not in proc.stderr


# ---------------------------------------------------------------------- audit
def test_refused_deletes_are_audited_without_the_token(tmp_path, caplog):
    tokens = tmp_path / "tokens"
    tokens.write_text("reader-token-0123456789 read\nadmin-token-01234567890 admin\n")
    security = ServerSecurity.from_files(tokens=str(tokens))
    running = start_server(EngineConfig(host="127.0.0.1", port=0,
                                        store_dir=str(tmp_path / "store"), grace_s=1,
                                        network=NetworkConfig(security=security)), FakeSource())
    caplog.set_level(logging.INFO, logger="dff.audit")
    codes = []
    try:
        for token in (None, "unknown-token-0123456789", "reader-token-0123456789"):
            sec = ClientSecurity(token=token)
            with sec.channel(f"127.0.0.1:{running.port}") as channel:
                with pytest.raises(grpc.RpcError) as err:
                    engine_pb2_grpc.ConceptEngineStub(channel).DeleteConceptSet(
                        engine_pb2.DeleteConceptSetRequest(id="some-set"), timeout=10)
                codes.append(err.value.code())
    finally:
        running.stop(grace=1)
    assert codes == [grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.UNAUTHENTICATED,
                     grpc.StatusCode.PERMISSION_DENIED]
    audit = [r for r in caplog.records if r.name == "dff.audit"]
    assert len(audit) == 3 and all(r.levelno == logging.WARNING for r in audit)
    text = "\n".join(r.getMessage() for r in audit)
    assert text.count("refused DeleteConceptSet") == 3 and "'some-set'" in text
    assert "role=read" in text and "peer=ipv4:127.0.0.1:" in text
    assert "PERMISSION_DENIED" in text and "UNAUTHENTICATED" in text
    assert "0123456789" not in text

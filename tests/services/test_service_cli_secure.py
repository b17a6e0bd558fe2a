"""The secure setup end to end through the real commands, as the README shows it: `dff serve
features` and `dff serve engine` with mutual TLS and role tokens (the engine a TLS client of the
feature server), then `dff discover --engine` with client certificate and token - and the same
discover without a token is refused."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import grpc
import h5py
import procs
import pytest
from certs import make_certs
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.ports import free_port

pytestmark = pytest.mark.slow


def test_discover_through_a_mutual_tls_engine_and_feature_server(tmp_path, models_home,
                                                                  shared_data):
    certs = make_certs(tmp_path / "certs")
    tokens = tmp_path / "tokens.txt"
    tokens.write_text("engine-reads-features-0123 read\nuser-may-discover-0123 write\n")
    engine_token = tmp_path / "engine-token"
    engine_token.write_text("engine-reads-features-0123\n")
    user_token = tmp_path / "user-token"
    user_token.write_text("user-may-discover-0123\n")
    tls = ["--tls-cert", str(certs.server.cert), "--tls-key", str(certs.server.key),
           "--tls-client-ca", str(certs.ca.cert), "--auth-tokens", str(tokens)]
    env = {"DFF_HOME": str(models_home)}
    data = tmp_path / "data" / "gymnast"
    data.mkdir(parents=True)
    for p in sorted((shared_data / "gymnast").glob("*.jpg"))[:4]:
        shutil.copy(p, data / p.name)
    features = procs.start("features", "--no-build", *tls, env=env)
    engine = None
    try:
        engine = procs.start(
            "engine", "--store", str(tmp_path / "store"),
            "--feature-server", f"localhost:{features.port}", *tls,
            "--feature-tls-ca", str(certs.ca.cert), "--feature-tls-cert", str(certs.client.cert),
            "--feature-tls-key", str(certs.client.key),
            "--feature-token-file", str(engine_token), "--health-port", str(free_port()),
            env=env)
        health_port = int(next(line.split("health-only port ")[1].split(",")[0].split()[0]
                               for line in engine.lines if "health-only port" in line))
        with grpc.insecure_channel(f"127.0.0.1:{health_port}") as channel:
            assert health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=10).status == \
                health_pb2.HealthCheckResponse.SERVING  # it reached its feature server
        client = ["--engine", f"localhost:{engine.port}", "--tls-ca", str(certs.ca.cert),
                  "--tls-cert", str(certs.client.cert), "--tls-key", str(certs.client.key),
                  "--k", "2", "--no-prediction-filter", "--no-certainty-filter",
                  "--min-images", "2", "--no-progress"]
        run_env = dict(os.environ, PYTHONPATH=f"{procs.ROOT / 'protos'}{os.pathsep}"
                                              f"{procs.ROOT}", DFF_HOME=str(models_home))
        run_env.pop("DFF_TOKEN", None)
        refused = subprocess.run(
            [sys.executable, "-m", "exporter.cli", "discover", str(data), "--out",
             str(tmp_path / "refused"), *client], cwd=procs.ROOT, env=run_env,
            capture_output=True, text=True, timeout=300)
        done = subprocess.run(
            [sys.executable, "-m", "exporter.cli", "discover", str(data), "--out",
             str(tmp_path / "out"), *client, "--token-file", str(user_token)],
            cwd=procs.ROOT, env=run_env, capture_output=True, text=True, timeout=300)
    finally:
        if engine is not None:
            engine.stop()
        features.stop()
    said = refused.stdout + refused.stderr
    assert refused.returncode != 0 and "Unauthenticated" in said, said
    assert done.returncode == 0, done.stderr[-3000:]
    with h5py.File(tmp_path / "out" / "gymnast" / "concepts.h5") as f:
        assert int(f.attrs["k"]) == 2



"""`dff serve features` (python -m exporter.cli) as a real process: SIGTERM drains in-flight work
and exits 0; `extract` writes HDF5 in-process and through a server."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import h5py
import numpy as np
import pytest
from dff_protos.v1 import features_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from feature_server.__main__ import main
from feature_server.convert import result_from_proto
from tests.feature_server.test_server import image, opts

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_sigterm_drains_in_flight_work(models_home, shared_data):
    env = dict(os.environ, DFF_HOME=str(models_home),
               PYTHONPATH=f"{ROOT / 'protos'}{os.pathsep}{ROOT}")
    proc = subprocess.Popen(
        [sys.executable, "-m", "exporter.cli", "-v", "serve", "features", "--host",
         "127.0.0.1", "--port", "0", "--max-batch-size", "2", "--max-wait-ms", "1",
         "--no-build", "--grace-s", "60"],
        cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    port: list[int] = []
    ready = threading.Event()

    def pump() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)
            m = re.search(r"listening on 127\.0\.0\.1:(\d+)", line)
            if m:
                port.append(int(m.group(1)))
                ready.set()

    pumper = threading.Thread(target=pump, daemon=True)
    pumper.start()
    try:
        assert ready.wait(120), "".join(lines)
        files = sorted((shared_data / "imagenet_sample").glob("*.JPEG"))[:6]
        requests = [opts()] + [image(p.name, p.read_bytes()) for p in files]
        received = []
        with grpc.insecure_channel(f"127.0.0.1:{port[0]}") as channel:
            stub = features_pb2_grpc.FeatureServiceStub(channel)
            for i, resp in enumerate(stub.Extract(iter(requests), timeout=120)):
                received.append(result_from_proto(resp))
                if i == 0:  # work is in flight: stop the server now
                    proc.send_signal(signal.SIGTERM)
                    health = health_pb2_grpc.HealthStub(channel)
                    deadline = time.monotonic() + 20
                    while True:
                        try:
                            status = health.Check(health_pb2.HealthCheckRequest(),
                                                  timeout=5).status
                        except grpc.RpcError as exc:  # already refusing new calls
                            status = exc.code()
                        if status != health_pb2.HealthCheckResponse.SERVING:
                            break
                        assert time.monotonic() < deadline, "still SERVING after SIGTERM"
                        time.sleep(0.05)
        assert sorted(r.id for r in received) == [p.name for p in files]
        assert all(r.error is None and r.activations["conv5_4"].shape == (512, 14, 14)
                   for r in received)
        assert proc.wait(timeout=90) == 0, "".join(lines)
        log = "".join(lines)
        assert "received signal 15" in log and "draining" in log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        pumper.join(timeout=10)
        assert proc.stderr is not None
        proc.stderr.close()


@pytest.mark.slow
def test_extract_cli_in_process_and_remote(models_home, address, shared_data, tmp_path):
    folder = shared_data / "gymnast"
    local_out, remote_out = tmp_path / "local.h5", tmp_path / "remote.h5"
    assert main(["extract", str(folder), "--out", str(local_out), "--home", str(models_home),
                 "--dtype", "float16", "--probabilities", "--layers", "conv5_4"]) == 0
    assert main(["extract", str(folder), str(shared_data / "imagenet_data" / "ant" /
                                             "imageNotFound.gif"),
                 "--out", str(remote_out), "--feature-server", address,
                 "--dtype", "float16", "--probabilities"]) == 3  # the GIF: a partial failure
    with h5py.File(local_out) as a, h5py.File(remote_out) as b:
        assert a.attrs["schema_version"] == 1 and a.attrs["wire_dtype"] == "float16"
        ids = [s.decode() for s in a["ids"][()]]
        assert ids == sorted(p.name for p in folder.iterdir())
        acts = a["activations/conv5_4"]
        assert acts.shape == (6, 512, 14, 14) and acts.dtype == np.float16
        assert a["probabilities"].shape == (6, 1000)
        np.testing.assert_array_equal(a["original_size"][0], [500, 400])
        assert [s.decode() for s in b["ids"][()]][:6] == ids
        np.testing.assert_allclose(b["activations/conv5_4"][:6], acts[()], rtol=1e-2, atol=1e-2)
        errors = [s.decode() for s in b["errors"][()]]
        assert errors[:6] == [""] * 6 and "GIF" in errors[6]
    # sparse rows on the wire: the same file, bit for bit
    sparse_out = tmp_path / "sparse.h5"
    assert main(["extract", str(folder), str(shared_data / "imagenet_data" / "ant" /
                                             "imageNotFound.gif"),
                 "--out", str(sparse_out), "--feature-server", address, "--sparse",
                 "--dtype", "float16", "--probabilities"]) == 3
    with h5py.File(remote_out) as b, h5py.File(sparse_out) as c:
        np.testing.assert_array_equal(c["activations/conv5_4"][()], b["activations/conv5_4"][()])
        assert c["activations/conv5_4"].dtype == np.float16
        assert [s.decode() for s in c["errors"][()]] == [s.decode() for s in b["errors"][()]]
    # decoded (or also preprocessed) here, sent as pixels (network inputs): the same numbers
    # and the server's own error for the GIF
    for flag in ("--client-decode", "--client-prepare"):
        local_out = tmp_path / f"{flag.strip('-')}.h5"
        assert main(["extract", str(folder), str(shared_data / "imagenet_data" / "ant" /
                                                 "imageNotFound.gif"),
                     "--out", str(local_out), "--feature-server", address, flag,
                     "--dtype", "float16", "--probabilities"]) == 3
        with h5py.File(remote_out) as b, h5py.File(local_out) as c:
            assert [s.decode() for s in c["ids"][()]] == [s.decode() for s in b["ids"][()]]
            np.testing.assert_allclose(c["activations/conv5_4"][()],
                                       b["activations/conv5_4"][()], rtol=1e-3, atol=1e-3)
            np.testing.assert_allclose(c["probabilities"][()], b["probabilities"][()],
                                       rtol=1e-3, atol=1e-5)
            np.testing.assert_array_equal(c["original_size"][()], b["original_size"][()])
            assert ([s.decode() for s in c["errors"][()]]
                    == [s.decode() for s in b["errors"][()]]), flag
    assert not list(tmp_path.glob(".*tmp*"))  # temp files renamed away

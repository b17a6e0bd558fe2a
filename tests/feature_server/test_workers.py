"""`dff serve features --workers N`: N processes on one port (SO_REUSEPORT). Connections spread
over them, the answers are the in-process ones, SIGTERM drains the group (exit 0), and a
worker that dies takes the group down (exit 1) instead of leaving it half-sized."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from dff_protos.serving import NetworkConfig

from feature_server.client import FeatureClient
from feature_server.extractor import ExtractOptions
from feature_server.service import ServerConfig
from feature_server.workers import worker_configs

ROOT = Path(__file__).resolve().parents[2]
GROUP = re.compile(r"listening on 127\.0\.0\.1:(\d+) \((\d+) worker processes, pids \[([\d, ]+)\]")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Group:
    """`dff serve features --workers 2 --port 0` in its own process."""

    def __init__(self, models_home: Path) -> None:
        env = dict(os.environ, DFF_HOME=str(models_home),
                   PYTHONPATH=f"{ROOT / 'protos'}{os.pathsep}{ROOT}")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "exporter.cli", "-v", "serve", "features", "--host",
             "127.0.0.1", "--port", "0", "--workers", "2", "--no-build", "--grace-s", "10"],
            cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self.ready = threading.Event()
        self.port = 0
        self.pids: list[int] = []
        self.pumper = threading.Thread(target=self._pump, daemon=True)
        self.pumper.start()
        assert self.ready.wait(180), "".join(self.lines)

    def _pump(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)
            m = GROUP.search(line)
            if m:
                self.port = int(m.group(1))
                self.pids = [int(p) for p in m.group(3).split(",")]
                self.ready.set()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)
        self.pumper.join(timeout=30)  # the pipe is at its end once every worker has exited
        assert self.proc.stderr is not None
        self.proc.stderr.close()


@pytest.mark.slow
def test_connections_spread_over_the_workers_and_sigterm_drains(models_home, extractor,
                                                                shared_data):
    # 24 images on 24 connections: the kernel hashes each connection to one of the 2 workers,
    # so one of them gets none with probability 2 ** -23 (4 connections: 1 in 8)
    files = sorted((shared_data / "imagenet_sample").glob("*.JPEG"))
    files = (files * 24)[:24]
    items = [(f"{i}-{p.name}", p.read_bytes()) for i, p in enumerate(files)]
    expect = {r.id: r.activations["conv5_4"] for r in extractor.extract(items, ExtractOptions())}
    group = Group(models_home)
    try:
        assert len(group.pids) == 2 and group.port > 0
        before = [cpu_seconds(p) for p in group.pids]
        with FeatureClient(f"127.0.0.1:{group.port}", timeout=120,
                           connections_per_address=24) as client:
            got = {r.id: r for r in client.extract(items, ExtractOptions())}
        used = [cpu_seconds(p) - b for p, b in zip(group.pids, before, strict=True)]
        assert sorted(got) == sorted(expect)
        for item_id, r in got.items():
            assert r.error is None
            np.testing.assert_allclose(r.activations["conv5_4"], expect[item_id], rtol=1e-5,
                                       atol=1e-5)
        # both ran the network (~12 images of 20+ ms each; an idle worker uses ~0)
        assert min(used) > 0.02, used
        group.proc.send_signal(signal.SIGTERM)
        assert group.proc.wait(timeout=60) == 0
        for pid in group.pids:
            assert not Path(f"/proc/{pid}").exists() or \
                "Z" in Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    finally:
        group.close()


@pytest.mark.slow
def test_a_dead_worker_takes_the_group_down(models_home):
    group = Group(models_home)
    try:
        os.kill(group.pids[0], signal.SIGKILL)
        assert group.proc.wait(timeout=60) == 1
        deadline = time.monotonic() + 30
        while Path(f"/proc/{group.pids[1]}").exists() and time.monotonic() < deadline:
            stat = Path(f"/proc/{group.pids[1]}/stat").read_text()
            if stat.rsplit(")", 1)[1].split()[0] == "Z":
                break
            time.sleep(0.2)
        assert "stopping the group" in "".join(group.lines)
    finally:
        group.close()


def test_worker_configs_share_the_port_and_split_the_side_ports():
    config = ServerConfig(host="127.0.0.1", port=0, network=NetworkConfig(
        host="127.0.0.1", port=0, health_port=50061, metrics_port=9101))
    configs = worker_configs(config, 3, 43210)
    assert [c.port for c in configs] == [43210] * 3
    assert all(c.network.reuse_port and c.network.port == 43210 for c in configs)
    assert [c.network.health_port for c in configs] == [50061, 0, 0]
    assert [c.network.metrics_port for c in configs] == [9101, 9102, 9103]
    off = worker_configs(ServerConfig(), 2, 1234)
    assert [c.network.metrics_port for c in off] == [0, 0]
    # a single server never shares its port
    assert not ServerConfig().network.reuse_port


def test_a_secure_config_reaches_the_workers(tmp_path):
    # workers are spawned: their config (TLS material, tokens included) travels pickled
    import pickle

    from dff_protos.security import ServerSecurity

    from tests.services.certs import make_certs

    certs = make_certs(tmp_path)
    (tmp_path / "tokens.txt").write_text("abcdefghijklmnopqrstu read\n")
    security = ServerSecurity.from_files(str(certs.server.cert), str(certs.server.key),
                                         str(certs.ca.cert), str(tmp_path / "tokens.txt"))
    config = ServerConfig(network=NetworkConfig(security=security))
    for worker in worker_configs(config, 2, 40000):
        back = pickle.loads(pickle.dumps(worker))
        assert back == worker and back.network.security.mtls and back.network.security.tokens

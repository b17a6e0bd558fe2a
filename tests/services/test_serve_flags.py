"""The server flags of `dff serve features` and `dff serve engine`: every value the servers
cannot run with is refused up front in one line naming the flag (or the environment variable),
exit 2, no traceback; IPv6 hosts are bracketed; the port a `--port 0` server got is printed at
the default log level."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.ports import free_port
from tests.services.certs import Certs, make_certs
from tests.services.procs import ROOT

ENV = dict(os.environ, PYTHONPATH=f"{ROOT / 'protos'}{os.pathsep}{ROOT}")


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


def dff(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """`dff ARGV` in this process: (exit code, stderr); only for commands that fail before
    anything is served."""
    from exporter.cli import main

    try:
        code = main(argv)
    except SystemExit as exc:  # argparse (--help)
        code = int(exc.code or 0)
    return code, capsys.readouterr().err


def one_error_line(err: str, prefix: str) -> str:
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1, err
    assert lines[0].startswith(prefix + ": error: "), err
    assert "Traceback" not in err
    return lines[0]


# ---------------------------------------------------------------------- 1: port ranges
@pytest.mark.parametrize("service", ["features", "engine"])
@pytest.mark.parametrize("flag,value", [
    ("--port", "70000"), ("--port", "-1"), ("--port", "65536"),
    ("--health-port", "70000"), ("--health-port", "-3"),
    ("--metrics-port", "70001"), ("--metrics-port", "-1"),
])
def test_a_port_out_of_range_is_refused_naming_the_flag(service, flag, value, capsys,
                                                        tmp_path):
    code, err = dff(["serve", service, flag, value, *(["--store", str(tmp_path / "s")]
                                                      if service == "engine" else [])], capsys)
    assert code == 2
    line = one_error_line(err, f"dff serve {service}")
    assert f"{flag} {value}: must be in 0..65535" in line


def test_worker_groups_check_the_ports_they_would_take(capsys):
    code, err = dff(["serve", "features", "--workers", "2", "--port", "70000"], capsys)
    assert code == 2 and "--port 70000: must be in 0..65535" in one_error_line(
        err, "dff serve features")
    # worker i serves metrics on --metrics-port + i: 65535 + 1 does not exist
    code, err = dff(["serve", "features", "--workers", "2", "--metrics-port", "65535"], capsys)
    line = one_error_line(err, "dff serve features")
    assert code == 2 and "--metrics-port 65535: with --workers 2" in line and "65536" in line


def test_the_edges_of_the_port_range_are_accepted():
    from dff_protos.serving import network_from_args

    from exporter.cli import build_parser

    args = build_parser().parse_args(["serve", "features", "--port", "65535", "--health-port",
                                      "0", "--metrics-port", "65534", "--workers", "2"])
    net = network_from_args(args)
    assert (net.port, net.health_port, net.metrics_port) == (65535, 0, 65534)


def test_the_healthcheck_refuses_a_port_out_of_range(capsys):
    from exporter.healthcheck import main

    for address, why in (("127.0.0.1:70000", "port 70000 is out of range"),
                         ("localhost:abc", "'abc' is not a port number"),
                         ("[::1]:0", "port 0 is out of range")):
        assert main([address]) == 2
        err = capsys.readouterr().err
        assert f"ADDR {address}: {why}" in one_error_line(err, "python -m exporter.healthcheck")
    # an address that is fine is still probed (nothing listens there: 1, not 2)
    assert main(["127.0.0.1:1", "--timeout", "0.5", "-q"]) == 1


# ---------------------------------------------------------------------- 2: env defaults
@pytest.mark.parametrize("var", ["DFF_WORKERS", "DFF_HEALTH_PORT", "DFF_METRICS_PORT"])
def test_a_bad_environment_value_fails_only_the_command_that_uses_it(var, monkeypatch,
                                                                     capsys, tmp_path):
    monkeypatch.setenv(var, "abc")
    monkeypatch.setenv("DFF_HOME", str(tmp_path / "home"))
    assert dff(["--help"], capsys)[0] == 0
    assert dff(["serve", "features", "--help"], capsys)[0] == 0
    assert dff(["models", "list"], capsys)[0] == 1  # "no models": not the variable's fault
    code, err = dff(["serve", "features"], capsys)
    assert code == 2
    assert f"{var} 'abc'" in one_error_line(err, "dff serve features")
    if var != "DFF_WORKERS":
        code, err = dff(["serve", "engine", "--store", str(tmp_path / "s")], capsys)
        assert code == 2 and f"{var} 'abc'" in one_error_line(err, "dff serve engine")
    out_of_range = "0" if var == "DFF_WORKERS" else "70000"  # never a valid value here
    monkeypatch.setenv(var, out_of_range)
    code, err = dff(["serve", "features"], capsys)
    assert code == 2
    assert f"{var} '{out_of_range}'" in one_error_line(err, "dff serve features")


def test_environment_defaults_still_apply_and_flags_win(monkeypatch):
    from exporter.cli import build_parser

    monkeypatch.setenv("DFF_WORKERS", "3")
    monkeypatch.setenv("DFF_HEALTH_PORT", "50061")
    monkeypatch.setenv("DFF_METRICS_PORT", "9101")
    args = build_parser().parse_args(["serve", "features"])
    assert (args.workers, args.health_port, args.metrics_port) == (3, 50061, 9101)
    args = build_parser().parse_args(["serve", "features", "--workers", "1",
                                      "--health-port", "0"])
    assert (args.workers, args.health_port) == (1, 0)
    monkeypatch.setenv("DFF_WORKERS", "0")
    args = build_parser().parse_args(["serve", "features", "--workers", "2"])
    assert args.workers == 2  # a flag given: the variable is not looked at


# ---------------------------------------------------------------------- 3, 6: engine values
@pytest.mark.parametrize("argv,expected", [
    (["--max-images", "0"], "--max-images 0: must be >= 1"),
    (["--max-images", "-5"], "--max-images -5: must be >= 1"),
    (["--max-concurrent-discover", "0"], "--max-concurrent-discover 0: must be >= 1"),
    (["--max-concurrent-explain", "0"], "--max-concurrent-explain 0: must be >= 1"),
    (["--max-message-mb", "0"], "--max-message-mb 0: must be in 1..2047"),
    (["--feature-timeout", "-1"], "--feature-timeout -1: must be > 0"),
    (["--feature-timeout", "nan"], "--feature-timeout nan: not a finite number"),
    (["--grace", "-1"], "--grace -1: must be >= 0"),
    (["--data-root", "/nonexistent/dff"], "--data-root /nonexistent/dff: no such folder"),
    (["--feature-server", "h:abc"], "--feature-server h:abc: 'abc' is not a port number"),
    (["--feature-server", "h:70000"], "--feature-server h:70000: port 70000 is out of range"),
    (["--feature-server", "127.0.0.1:5,:9"], "--feature-server :9: no host"),
])
def test_engine_values_it_cannot_run_with_are_refused(argv, expected, capsys, tmp_path):
    code, err = dff(["serve", "engine", "--store", str(tmp_path / "s"), *argv], capsys)
    assert code == 2
    assert expected in one_error_line(err, "dff serve engine")


def test_engine_folders_that_are_files_are_refused(capsys, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    for argv, expected in (
            (["--store", str(afile)], f"--store {afile}: not a folder"),
            (["--store", str(afile / "x")], f"--store {afile / 'x'}: cannot create the folder"),
            (["--store", str(tmp_path / "s"), "--data-root", str(afile)],
             f"--data-root {afile}: not a folder")):
        code, err = dff(["serve", "engine", *argv], capsys)
        assert code == 2 and expected in one_error_line(err, "dff serve engine")


def test_decode_workers_below_zero_is_refused(capsys):
    code, err = dff(["serve", "features", "--decode-workers", "-1"], capsys)
    assert code == 2
    assert "--decode-workers -1: must be >= 0" in one_error_line(err, "dff serve features")
    code, err = dff(["serve", "features", "--workers", "0"], capsys)
    assert code == 2
    assert "--workers 0: must be in 1..256" in one_error_line(err, "dff serve features")


# ---------------------------------------------------------------------- 5: the right flag
def test_feature_tls_messages_name_the_feature_flags(certs, capsys, tmp_path):
    store = ["--store", str(tmp_path / "s")]
    code, err = dff(["serve", "engine", *store, "--feature-tls-cert", str(certs.client.cert)],
                    capsys)
    line = one_error_line(err, "dff serve engine")
    assert code == 2 and "--feature-tls-key" in line and "--tls-key" not in line.replace(
        "--feature-tls-key", "")
    code, err = dff(["serve", "engine", *store, "--feature-tls-cert", str(certs.client.cert),
                     "--feature-tls-key", str(certs.client.key)], capsys)
    line = one_error_line(err, "dff serve engine")
    assert code == 2 and "needs --feature-tls-ca" in line
    not_pem = tmp_path / "ca.txt"
    not_pem.write_text("not a certificate\n")
    code, err = dff(["serve", "engine", *store, "--feature-tls-ca", str(not_pem)], capsys)
    line = one_error_line(err, "dff serve engine")
    assert code == 2 and f"--feature-tls-ca {not_pem}: not a PEM CA certificate" in line


def _serve(argv: list[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "exporter.cli", *argv], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("flag", ["--health-port", "--metrics-port"])
def test_a_taken_health_or_metrics_port_is_named(flag, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        run = _serve(["serve", "engine", "--port", "0", "--store", str(tmp_path / "s"),
                      "--feature-server", "127.0.0.1:1", flag, str(port)])
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr
    # gRPC may log its own line first; ours is the last and names the flag
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith(f"dff serve engine: error: {flag} {port}: could not bind"), \
        run.stderr


# ---------------------------------------------------------------------- 4, 7: a live engine
class Server:
    def __init__(self, argv: list[str]) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "exporter.cli", *argv], cwd=ROOT,
                                     env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
        self.lines: list[str] = []
        self.ready = threading.Event()
        self.readers = [threading.Thread(target=self._pump, args=(s,), daemon=True)
                        for s in (self.proc.stdout, self.proc.stderr)]
        for t in self.readers:
            t.start()

    def _pump(self, stream) -> None:
        for line in stream:
            self.lines.append(line)
            if "listening on" in line:
                self.ready.set()
        self.ready.set()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for t in self.readers:
            t.join(5)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


def test_port_0_prints_the_chosen_port_without_v(tmp_path):
    server = Server(["serve", "engine", "--host", "127.0.0.1", "--port", "0", "--store",
                     str(tmp_path / "s"), "--feature-server", "127.0.0.1:1", "--grace", "1"])
    try:
        assert server.ready.wait(60), "".join(server.lines)
        found = [m for line in server.lines
                 if (m := re.search(r"listening on 127\.0\.0\.1:(\d+)", line))]
        assert len(found) == 1, server.lines  # one line, at the default log level
        port = int(found[0].group(1))
        assert port > 0
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            grpc.channel_ready_future(channel).result(timeout=20)
    finally:
        server.stop()


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def test_host_port_brackets_ipv6_literals():
    from dff_protos.serving import host_port, split_address

    assert host_port("::1", 0) == "[::1]:0"
    assert host_port("[::1]", 5) == "[::1]:5"
    assert host_port("127.0.0.1", 5) == "127.0.0.1:5"
    assert split_address("[::1]:50051") == ("::1", "50051")
    assert split_address("dns:///fs:50051") == ("fs", "50051")
    assert split_address("::1") == ("::1", None)


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback here")
def test_a_bare_ipv6_host_binds_every_port_on_it(tmp_path):
    health, metrics = free_port(), free_port()
    server = Server(["serve", "engine", "--host", "::1", "--port", "0", "--store",
                     str(tmp_path / "s"), "--feature-server", "127.0.0.1:1", "--grace", "1",
                     "--health-port", str(health), "--metrics-port", str(metrics)])
    try:
        assert server.ready.wait(60), "".join(server.lines)
        found = [m for line in server.lines
                 if (m := re.search(r"listening on \[::1\]:(\d+)", line))]
        assert found, server.lines
        port = int(found[0].group(1))
        with grpc.insecure_channel(f"[::1]:{port}") as channel:
            grpc.channel_ready_future(channel).result(timeout=20)
        with grpc.insecure_channel(f"[::1]:{health}") as channel:
            resp = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                             timeout=20)
            assert resp.status in (health_pb2.HealthCheckResponse.SERVING,
                                   health_pb2.HealthCheckResponse.NOT_SERVING)
        with urllib.request.urlopen(f"http://[::1]:{metrics}/metrics", timeout=20) as resp:
            assert b"dff_requests_total" in resp.read() or resp.status == 200
    finally:
        server.stop()

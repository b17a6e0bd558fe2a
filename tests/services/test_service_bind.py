"""A server whose port is taken says so in one line (exit 2), single or a worker group, feature
server or engine - no traceback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from tests.services.procs import ROOT


@pytest.mark.parametrize("command", [
    ["serve", "features", "--no-build"],
    ["serve", "features", "--no-build", "--workers", "2"],
    ["serve", "engine"],
], ids=["features", "feature-workers", "engine"])
def test_a_taken_port_is_one_clear_error(command, models_home, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = dict(os.environ, DFF_HOME=str(models_home),
                   PYTHONPATH=f"{ROOT / 'protos'}{os.pathsep}{ROOT}")
        extra = ["--store", str(tmp_path / "store")] if command[1] == "engine" else []
        run = subprocess.run([sys.executable, "-m", "exporter.cli", *command, "--port", str(port),
                              *extra], cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=180)
    assert run.returncode == 2, run.stderr
    last = run.stderr.strip().splitlines()[-1]
    assert f"error: 127.0.0.1:{port}: could not bind the port" in last, run.stderr
    assert "Traceback" not in run.stderr

"""Real server processes for the fault and load tests: ``python -m exporter.cli serve ...`` on
loopback port 0; the bound port is read from the server's log."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Proc:
    proc: subprocess.Popen
    port: int = 0
    lines: list[str] = field(default_factory=list)
    reader: threading.Thread | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def rss_bytes(self) -> int:
        """Current resident memory (VmRSS) of the process."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.alive():
            os.kill(self.pid, signal.SIGCONT)
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.close()

    def close(self) -> None:
        """Wait for the log reader and close the pipe (after the process ended)."""
        if self.reader is not None:
            self.reader.join(10)
        if self.proc.stderr is not None:
            self.proc.stderr.close()


def start(kind: str, *args: str, timeout: float = 120.0, env: dict | None = None) -> Proc:
    """Start ``dff serve KIND --host 127.0.0.1 --port 0 ARGS`` and wait until it listens."""
    full_env = dict(os.environ, PYTHONPATH=f"{ROOT / 'protos'}{os.pathsep}{ROOT}",
                    **(env or {}))
    proc = subprocess.Popen(
        [sys.executable, "-m", "exporter.cli", "-v", "serve", kind, "--host", "127.0.0.1",
         "--port", "0", *args], cwd=ROOT, env=full_env, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True)
    p = Proc(proc)
    ready = threading.Event()
    pattern = re.compile(r"(?:feature server|concept engine) listening on 127\.0\.0\.1:(\d+)")

    def pump() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            if len(p.lines) < 2000:
                p.lines.append(line)
            m = pattern.search(line)
            if m:
                p.port = int(m.group(1))
                ready.set()
        ready.set()

    p.reader = threading.Thread(target=pump, daemon=True)
    p.reader.start()
    if not ready.wait(timeout) or not p.port:
        p.stop()
        raise RuntimeError(f"dff serve {kind} did not start:\n{''.join(p.lines[-30:])}")
    return p

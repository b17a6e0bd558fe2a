"""Ports for tests that must name one (a health or metrics port, a dead address)."""

from __future__ import annotations

import random
import socket
from pathlib import Path


def _ephemeral_low(default: int = 32768) -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return default


_GIVEN: set[int] = set()


def free_port() -> int:
    """A loopback port that is free now and below the kernel's ephemeral range, so that no
    server binding port 0 meanwhile (every other server of the tests) can be given it. Binding
    port 0 and handing its number on, as these tests did, raced with exactly those servers."""
    high = _ephemeral_low()
    low = 10000 if high > 12000 else 1024
    rng = random.Random()
    for _ in range(500):
        port = rng.randrange(low, high)
        if port in _GIVEN:  # two ports asked for one server must differ
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _GIVEN.add(port)
        return port
    raise RuntimeError(f"no free port in {low}..{high}")

"""Several feature-server processes on one port: ``dff serve features --workers N``.

Why: a feature server's Python holds the GIL for ~0.45 ms per image (py-spy, the serving path
alone, 2-core AMD EPYC), whatever the cores and the accelerator do, so one process cannot
serve much more than ~2000 images a second. A GPU does several times that. N processes, each
with its own sessions, batcher and decoding threads, bind the same port with SO_REUSEPORT; the
kernel gives each incoming connection to one of them. Clients spread their streams over
several connections (``FeatureClient(connections_per_address=N)``) to reach them all.

The parent reserves the port (with ``--port 0`` it picks a free one and holds it until the
workers listen), starts the workers with the spawn method (no fork of a process that holds
threads), and then only watches:

* SIGTERM / SIGINT go to every worker, which drains its streams as a single server does, and
  the parent exits 0 once they have all stopped;
* a worker that exits on its own takes the group down (the others are stopped, exit status 1)
  for the orchestrator to restart: a half-sized group would look healthy and serve less.

Worker 0 serves the ``--health-port``; worker i serves Prometheus metrics on
``--metrics-port + i`` (each process counts its own).
"""

from __future__ import annotations

import logging
import multiprocessing
import queue
import signal
import socket
import threading
import time
from dataclasses import replace
from typing import Any

from dff_protos.errors import InvalidInput

from feature_server.service import ServerConfig

log = logging.getLogger(__name__)

#: How long the parent waits for every worker to listen (models load, sessions start).
START_TIMEOUT_S = 600.0


def _reserve_port(host: str, port: int) -> socket.socket:
    """A socket bound to (host, port) with SO_REUSEPORT and not listening: it keeps a free
    port (port 0) for the group without taking any connection."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


def _worker_main(config: ServerConfig, index: int, ready: Any, level: int) -> None:
    """One worker: a feature server on the group's port until SIGTERM."""
    from dff_protos import serving

    from feature_server.service import start_server

    logging.basicConfig(level=level, format=f"%(asctime)s worker {index} %(levelname)s "
                                           "%(name)s: %(message)s")
    try:
        running = start_server(config)
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, then re-raised
        ready.put((index, None, f"{type(exc).__name__}: {exc}"))
        raise
    ready.put((index, running.port, ""))
    raise SystemExit(serving.run_until_signal(running.stop))


def worker_configs(config: ServerConfig, workers: int, port: int) -> list[ServerConfig]:
    """The config of each worker: the group's port with SO_REUSEPORT; the health port on
    worker 0 only; metrics on consecutive ports."""
    out = []
    for i in range(workers):
        net = replace(config.network, port=port, reuse_port=True,
                      health_port=config.network.health_port if i == 0 else 0,
                      metrics_port=(config.network.metrics_port + i
                                    if config.network.metrics_port else 0))
        out.append(replace(config, port=port, network=net))
    return out


def serve_workers(config: ServerConfig, workers: int) -> int:
    """Run ``workers`` feature-server processes on ``config``'s port until SIGTERM/SIGINT
    (exit 0) or until one of them exits on its own (the others are stopped; exit 1)."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if not hasattr(socket, "SO_REUSEPORT"):
        raise InvalidInput("--workers needs SO_REUSEPORT (Linux): run one server per port "
                           "instead")
    host = config.host
    reserved = _reserve_port(host, config.port)
    port = reserved.getsockname()[1]
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Queue()
    procs = [ctx.Process(target=_worker_main, name=f"dff-features-{i}",
                         args=(cfg, i, ready, logging.getLogger().getEffectiveLevel()))
             for i, cfg in enumerate(worker_configs(config, workers, port))]
    stop = threading.Event()
    previous = {s: signal.signal(s, lambda signum, _frame: stop.set())
                for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        for p in procs:
            p.start()
        started = _wait_ready(procs, ready, workers, stop)
        reserved.close()  # every worker listens now (or the group is going down)
        if started:
            log.info("feature server listening on %s:%d (%d worker processes, pids %s)",
                     host, port, workers, [p.pid for p in procs])
        code = 0 if started or stop.is_set() else 1  # a stop asked for while starting is 0
        while started and not stop.wait(0.5):
            dead = [p for p in procs if not p.is_alive()]
            if dead:
                log.error("worker %s exited (code %s): stopping the group", dead[0].name,
                          dead[0].exitcode)
                code = 1
                break
        return _stop_all(procs, config.grace_s, code)
    finally:
        reserved.close()
        for s, handler in previous.items():
            signal.signal(s, handler)


def _wait_ready(procs: list[Any], ready: Any, workers: int, stop: threading.Event) -> bool:
    """True once every worker listens; False when one failed, exited or the group was
    stopped first."""
    listening = 0
    deadline = time.monotonic() + START_TIMEOUT_S
    while listening < workers:
        if stop.is_set() or time.monotonic() > deadline:
            return False
        try:
            index, port, error = ready.get(timeout=0.5)
        except queue.Empty:
            if any(not p.is_alive() for p in procs):
                log.error("a worker exited while starting: stopping the group")
                return False
            continue
        if port is None:
            log.error("worker %d could not start: %s", index, error)
            return False
        listening += 1
    return True


def _stop_all(procs: list[Any], grace_s: float, code: int) -> int:
    """SIGTERM to every worker still running (they drain), then wait; SIGKILL after the
    grace period and a margin."""
    for p in procs:
        if p.is_alive():
            p.terminate()
    deadline = time.monotonic() + grace_s + 15.0
    for p in procs:
        p.join(timeout=max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            log.error("worker %s did not stop in time: killed", p.name)
            p.kill()
            p.join(timeout=5)
            code = 1
    return code


__all__ = ["serve_workers", "worker_configs"]

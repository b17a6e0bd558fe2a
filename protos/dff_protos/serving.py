"""What every dff gRPC server does the same way: health + reflection registration, the
SERVING switch, and running until SIGTERM/SIGINT with a graceful stop."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from concurrent import futures
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

log = logging.getLogger(__name__)


def create_server(*, max_message_bytes: int, max_workers: int,
                  thread_name_prefix: str) -> grpc.Server:
    """A gRPC server with message limits from config (never INT32_MAX) and its thread pool."""
    options = [("grpc.max_receive_message_length", max_message_bytes),
               ("grpc.max_send_message_length", max_message_bytes),
               ("grpc.so_reuseport", 0)]  # a second server must not silently share a port
    pool = futures.ThreadPoolExecutor(max_workers=max_workers,
                                      thread_name_prefix=thread_name_prefix)
    return grpc.server(pool, options=options)


def start(server: grpc.Server, service_name: str, host: str, port: int
          ) -> tuple[int, health.HealthServicer]:
    """Add health + reflection, bind (port 0 = any free port), start, and go SERVING.
    Returns the bound port and the health servicer (for the graceful stop)."""
    health_servicer = add_health_and_reflection(server, service_name)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"could not bind {host}:{port}")
    server.start()
    mark_serving(health_servicer, service_name)
    return bound, health_servicer


def add_health_and_reflection(server: grpc.Server, service_name: str) -> health.HealthServicer:
    """Register grpc.health.v1 and server reflection for ``service_name`` (a full name taken
    from a generated DESCRIPTOR); returns the health servicer, not yet SERVING."""
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (service_name, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
         reflection.SERVICE_NAME), server)
    return health_servicer


def mark_serving(health_servicer: health.HealthServicer, service_name: str) -> None:
    """The overall status ("") and the service's own status go SERVING."""
    for name in ("", service_name):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)


def run_until_signal(stop: Callable[[], Any]) -> int:
    """Block until SIGTERM or SIGINT, then call ``stop`` (which drains gracefully); returns 0."""
    event = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("received signal %d", signum)
        event.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        while not event.wait(0.5):
            pass
        stop()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return 0

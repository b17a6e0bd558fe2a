"""What every dff gRPC server does the same way: network options (bind, TLS, tokens,
keepalive, connection age), health + reflection registration, a plaintext health-only port, the
metrics endpoint, the SERVING switch, bounded waits for stream slots, idle-stream timeouts, and
running until SIGTERM/SIGINT with a graceful stop."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import queue
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from dff_protos.errors import DeadlineExceeded, InvalidInput, ResourceExhausted
from dff_protos.metrics import Metrics
from dff_protos.security import AuthInterceptor, ServerSecurity, wrap_handler

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class NetworkConfig:
    """How a server meets the network (the same for both servers)."""

    host: str = "127.0.0.1"
    port: int = 0
    health_port: int = 0  # plaintext grpc.health.v1-only port for probes; 0 = off
    metrics_port: int = 0  # Prometheus HTTP; 0 = off
    reflection: bool = True
    security: ServerSecurity = field(default_factory=ServerSecurity)
    keepalive_s: float = 60.0  # server pings idle connections this often
    keepalive_timeout_s: float = 20.0
    max_connection_age_s: float = 1800.0  # then GOAWAY (clients reconnect / rebalance)
    max_connection_age_grace_s: float = 7200.0  # streams still running get this long
    max_connection_idle_s: float = 300.0
    # several processes serve one port (SO_REUSEPORT; see feature_server.workers): only for
    # such a group, as otherwise a second server would silently share the port
    reuse_port: bool = False


MAX_PORT = 65535


class EnvDefault(str):
    """A flag's default read from an environment variable: argparse applies the flag's
    ``type`` to a string default only when the command that has the flag runs, so a bad value
    fails that command alone, and the error names the variable (see ``int_arg``)."""

    var = ""


def env_default(var: str, fallback: str) -> str:
    """``$var`` (an EnvDefault remembering its name) or ``fallback`` when unset or empty."""
    value = os.environ.get(var, "").strip()
    if not value:
        return fallback
    out = EnvDefault(value)
    out.var = var
    return out


@dataclass(frozen=True)
class BadArg:
    """What a checking ``type`` (``int_arg``, ``float_arg``) gives for a value it refuses,
    instead of raising: argparse would print its usage text; ``check_args`` (called by
    ``network_from_args``, before anything is loaded or bound) reports it in one line."""

    message: str

    def __str__(self) -> str:
        return self.message


def _named(flag: str, text: str) -> str:
    """'--flag VALUE', or 'VAR 'VALUE' (the default of --flag)' for an environment value."""
    if isinstance(text, EnvDefault):
        return f"{text.var} {str(text)!r} (the default of {flag})"
    return f"{flag} {text}"


def _bounds(minimum: float | None, maximum: float | None, above: bool = False) -> str:
    low = "" if minimum is None else f"{'>' if above else '>='} {minimum:g}"
    if maximum is None:
        return f"must be {low}"
    if minimum is None:
        return f"must be <= {maximum:g}"
    return f"must be in {minimum:g}..{maximum:g}"


def int_arg(flag: str, minimum: int | None = None, maximum: int | None = None,
            what: str = "an integer") -> Callable[[str], int | BadArg]:
    """An argparse ``type``: an int within [minimum, maximum], else a BadArg naming ``flag``
    (or the environment variable the default came from)."""
    def parse(text: str) -> int | BadArg:
        try:
            value = int(str(text).strip())
        except ValueError:
            return BadArg(f"{_named(flag, text)}: not {what}")
        if (minimum is not None and value < minimum) or (maximum is not None
                                                          and value > maximum):
            return BadArg(f"{_named(flag, text)}: {_bounds(minimum, maximum)}")
        return value
    parse.__name__ = "int"  # argparse names the type in its own messages
    return parse


def float_arg(flag: str, minimum: float | None = None, maximum: float | None = None,
              above: bool = False) -> Callable[[str], float | BadArg]:
    """An argparse ``type``: a finite float >= minimum (> minimum with ``above``) and <=
    maximum, else a BadArg naming ``flag``."""
    def parse(text: str) -> float | BadArg:
        try:
            value = float(str(text).strip())
        except ValueError:
            return BadArg(f"{_named(flag, text)}: not a number")
        if value != value or value in (float("inf"), float("-inf")):
            return BadArg(f"{_named(flag, text)}: not a finite number")
        if minimum is not None and (value < minimum or (above and value == minimum)):
            return BadArg(f"{_named(flag, text)}: {_bounds(minimum, None, above)}")
        if maximum is not None and value > maximum:
            return BadArg(f"{_named(flag, text)}: {_bounds(None, maximum)}")
        return value
    parse.__name__ = "float"
    return parse


def port_arg(flag: str) -> Callable[[str], int | BadArg]:
    """An argparse ``type`` for a port to listen on: 0..65535 (0 = any free port / off)."""
    return int_arg(flag, 0, MAX_PORT, "a port number (0..65535)")  # range: "must be in 0..65535"


def check_args(args: argparse.Namespace) -> None:
    """InvalidInput (one line) for the first flag value a checking type refused."""
    for value in vars(args).values():
        if isinstance(value, BadArg):
            raise InvalidInput(value.message)


def host_port(host: str, port: int | str) -> str:
    """'host:port', with an IPv6 literal in brackets ('[::1]:50051')."""
    if ":" in host and not host.startswith("["):
        return f"[{host}]:{port}"
    return f"{host}:{port}"


def split_address(address: str) -> tuple[str, str | None]:
    """(host, port text or None) of a gRPC target 'host:port', '[v6]:port', 'dns:///h:p',
    'ipv4:h:p' / 'ipv6:[h]:p'; a bare IPv6 literal or a 'unix:' target has no port."""
    target = address.strip()
    if target.startswith(("unix:", "unix-abstract:", "vsock:")):
        return target, None
    target = target.split("///", 1)[-1] if "///" in target else target
    for scheme in ("ipv4:", "ipv6:", "dns:"):
        if target.startswith(scheme):
            target = target[len(scheme):]
            break
    if target.startswith("["):
        host, _, rest = target[1:].partition("]")
        return host, (rest[1:] if rest.startswith(":") else None)
    if target.count(":") == 1:
        host, port = target.split(":")
        return host, port
    return target, None


def check_address(address: str, flag: str) -> None:
    """InvalidInput naming ``flag`` when the port of the target ``address`` is not a number
    in 1..65535 (gRPC would otherwise take 'h:70000' as port 4464, and 'h:abc' never
    connects), or the host is empty."""
    host, port = split_address(address)
    if port is None:
        return
    if not host:
        raise InvalidInput(f"{flag} {address}: no host (expected HOST:PORT)")
    if not port.isdigit():
        raise InvalidInput(f"{flag} {address}: {port!r} is not a port number (expected "
                           "HOST:PORT)")
    if not 1 <= int(port) <= MAX_PORT:
        raise InvalidInput(f"{flag} {address}: port {port} is out of range (1..65535)")


def add_network_args(p: argparse.ArgumentParser, *, port: int, health_port: int,
                     metrics_port: int) -> None:
    """--host/--port/--health-port/--metrics-port/--no-reflection/keepalive flags (env
    DFF_HOST, DFF_HEALTH_PORT, DFF_METRICS_PORT). The conventional ports are in the help.
    Values out of range (and bad environment values) are reported by ``network_from_args``."""
    from dff_protos.security import add_server_security_args

    env = os.environ.get
    p.add_argument("--host", default=env("DFF_HOST") or "127.0.0.1",
                   help="address to bind (default %(default)s; 0.0.0.0 = every interface; "
                        "env DFF_HOST)")
    p.add_argument("--port", type=port_arg("--port"), default=port,
                   help="gRPC port (0 = any free port; default %(default)s)")
    p.add_argument("--health-port", type=port_arg("--health-port"),
                   default=env_default("DFF_HEALTH_PORT", "0"),
                   help=f"plaintext grpc.health.v1-only port for probes (0 = off; "
                        f"conventionally {health_port}; env DFF_HEALTH_PORT)")
    p.add_argument("--metrics-port", type=port_arg("--metrics-port"),
                   default=env_default("DFF_METRICS_PORT", "0"),
                   help=f"Prometheus /metrics HTTP port (0 = off; conventionally "
                        f"{metrics_port}; env DFF_METRICS_PORT)")
    p.add_argument("--no-reflection", action="store_true", help="do not serve reflection")
    p.add_argument("--keepalive-s", type=float_arg("--keepalive-s", 0, above=True),
                   default=60.0, help="ping idle connections this often (seconds)")
    p.add_argument("--max-connection-age-s", type=float_arg("--max-connection-age-s", 0,
                                                            above=True),
                   default=1800.0,
                   help="close connections after this long (GOAWAY; running streams get "
                        "--max-connection-age-grace-s more)")
    p.add_argument("--max-connection-age-grace-s",
                   type=float_arg("--max-connection-age-grace-s", 0), default=7200.0,
                   help="how long streams running at the connection's max age may go on")
    add_server_security_args(p)


#: Loggers whose INFO line says where a server listens: shown at the default log level, so
#: that a script that asked for --port 0 can read the port (the worker group's parent logs
#: the group's line on feature_server.workers, which logs nothing else at INFO).
LISTEN_LOGGERS = ("dff.listening", "feature_server.workers")
listen_log = logging.getLogger("dff.listening")


def announce_listening() -> None:
    """Let the 'listening on HOST:PORT' line through at the default (WARNING) level."""
    for name in LISTEN_LOGGERS:
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET or logger.level > logging.INFO:
            logger.setLevel(logging.INFO)


def network_from_args(args: argparse.Namespace) -> NetworkConfig:
    """The NetworkConfig of a server's flags; InvalidInput (one line naming the flag or the
    environment variable) for a value out of range - every port 0..65535, and with
    ``--workers N`` the N consecutive metrics ports too - or TLS material that cannot serve.
    Also lets the server's 'listening on' line through at the default log level."""
    from dff_protos.security import server_security_from_args

    check_args(args)
    workers = getattr(args, "workers", 1)
    if isinstance(workers, int) and workers > 1 and args.metrics_port and \
            args.metrics_port + workers - 1 > MAX_PORT:
        raise InvalidInput(f"--metrics-port {args.metrics_port}: with --workers {workers} the "
                           f"workers take ports {args.metrics_port}.."
                           f"{args.metrics_port + workers - 1}; the highest port is 65535")
    network = NetworkConfig(host=args.host, port=args.port, health_port=args.health_port,
                            metrics_port=args.metrics_port, reflection=not args.no_reflection,
                            security=server_security_from_args(args),
                            keepalive_s=args.keepalive_s,
                            max_connection_age_s=args.max_connection_age_s,
                            max_connection_age_grace_s=args.max_connection_age_grace_s)
    announce_listening()
    return network


class MetricsInterceptor(grpc.ServerInterceptor):
    """Counts every RPC by method and final status code."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def intercept_service(self, continuation: Callable[[Any], Any],
                          handler_call_details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method.rsplit("/", 1)[-1]
        metrics = self.metrics

        def final(context: grpc.ServicerContext, failed: bool) -> None:
            code = context.code() if hasattr(context, "code") else None
            if code is None and not context.is_active():
                # the call ended before the handler did: the caller cancelled it (or went
                # away), or its deadline passed - not a failure here, and not an OK answer
                remaining = context.time_remaining()
                code = (grpc.StatusCode.DEADLINE_EXCEEDED
                        if remaining is not None and remaining <= 0
                        else grpc.StatusCode.CANCELLED)
            if code is None:
                code = grpc.StatusCode.UNKNOWN if failed else grpc.StatusCode.OK
            name = code.name if isinstance(code, grpc.StatusCode) else str(code)
            metrics.request(method, name)

        def wrap(behaviour: Callable[..., Any]) -> Callable[..., Any]:
            if handler.response_streaming:
                def run_stream(request: Any, context: grpc.ServicerContext) -> Any:
                    try:
                        yield from behaviour(request, context)
                    except BaseException:
                        final(context, True)
                        raise
                    final(context, False)
                return run_stream

            def run_unary(request: Any, context: grpc.ServicerContext) -> Any:
                try:
                    out = behaviour(request, context)
                except BaseException:
                    final(context, True)
                    raise
                final(context, False)
                return out
            return run_unary

        return wrap_handler(handler, wrap)


def create_server(*, max_message_bytes: int, max_workers: int, thread_name_prefix: str,
                  network: NetworkConfig | None = None, metrics: Metrics | None = None
                  ) -> grpc.Server:
    """A gRPC server with message limits from config (never INT32_MAX), keepalive and
    connection-age limits, the token interceptor, and its thread pool."""
    net = network or NetworkConfig()
    options = [("grpc.max_receive_message_length", max_message_bytes),
               ("grpc.max_send_message_length", max_message_bytes),
               # a second server must not silently share a port, unless it is one of a group
               ("grpc.so_reuseport", 1 if net.reuse_port else 0),
               ("grpc.keepalive_time_ms", int(net.keepalive_s * 1000)),
               ("grpc.keepalive_timeout_ms", int(net.keepalive_timeout_s * 1000)),
               ("grpc.keepalive_permit_without_calls", 1),
               ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
               ("grpc.http2.max_ping_strikes", 3),
               ("grpc.max_connection_idle_ms", int(net.max_connection_idle_s * 1000)),
               ("grpc.max_connection_age_ms", int(net.max_connection_age_s * 1000)),
               ("grpc.max_connection_age_grace_ms", int(net.max_connection_age_grace_s * 1000))]
    pool = futures.ThreadPoolExecutor(max_workers=max_workers,
                                      thread_name_prefix=thread_name_prefix)
    interceptors: list[grpc.ServerInterceptor] = []
    if metrics is not None:
        interceptors.append(MetricsInterceptor(metrics))
    interceptors.append(AuthInterceptor(net.security.tokens))
    return grpc.server(pool, options=options, interceptors=interceptors)


@dataclass
class Started:
    """What ``start`` gives back: bound ports and what the graceful stop needs."""

    port: int
    health: health.HealthServicer
    health_server: grpc.Server | None = None
    health_port: int = 0
    metrics: Metrics | None = None
    metrics_port: int = 0

    def stop_extras(self) -> None:
        if self.health_server is not None:
            self.health_server.stop(0)
        if self.metrics is not None:
            self.metrics.close()


def start(server: grpc.Server, service_name: str, host: str, port: int,
          network: NetworkConfig | None = None, metrics: Metrics | None = None) -> Started:
    """Add health (+ reflection unless switched off), bind (port 0 = any free port; TLS when
    configured), start, go SERVING; also the plaintext health-only port and the metrics
    endpoint when asked for."""
    net = network or NetworkConfig(host=host, port=port)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    # the process answers: what a liveness probe asks (the overall status is readiness, and an
    # engine is NOT_SERVING while its feature servers are down - no reason to restart it)
    health_servicer.set(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.SERVING)
    if net.reflection:
        reflection.enable_server_reflection(
            (service_name, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME), server)
    address = host_port(host, port)
    creds = net.security.credentials()
    bound = (server.add_secure_port(address, creds) if creds is not None
             else server.add_insecure_port(address))
    if bound == 0:
        raise OSError(f"could not bind {address}")
    if net.security.tokens and not net.security.tls and host not in ("127.0.0.1", "localhost",
                                                                      "::1", "[::1]"):
        log.warning("bearer tokens without TLS on %s: tokens cross the network in clear text "
                    "(give --tls-cert/--tls-key)", host)
    started = Started(bound, health_servicer)
    if net.health_port:
        hs = grpc.server(futures.ThreadPoolExecutor(max_workers=4,
                                                    thread_name_prefix="health"))
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, hs)
        try:
            hp = hs.add_insecure_port(host_port(host, net.health_port))
        except RuntimeError:  # some gRPC versions raise instead of returning 0
            hp = 0
        if hp == 0:
            raise InvalidInput(f"--health-port {net.health_port}: could not bind "
                               f"{host_port(host, net.health_port)} (in use, or not an "
                               "address of this machine)")
        hs.start()
        started.health_server, started.health_port = hs, hp
    if metrics is not None and net.metrics_port:
        try:
            started.metrics_port = metrics.serve_http(host, net.metrics_port)
        except OSError as exc:
            started.stop_extras()
            raise InvalidInput(f"--metrics-port {net.metrics_port}: could not bind "
                               f"{host_port(host, net.metrics_port)}: "
                               f"{exc.strerror or exc}") from None
        started.metrics = metrics
    server.start()
    mark_serving(health_servicer, service_name)
    listen_log.info("listening on %s (%s)%s%s", host_port(host, bound),
                    net.security.describe(),
                    f", health-only port {started.health_port}" if started.health_port
                    else "",
                    f", metrics port {started.metrics_port}" if started.metrics_port else "")
    return started


#: grpc.health.v1 service name that is SERVING while the process runs (until its shutdown)
LIVENESS_SERVICE = "liveness"


def mark_serving(health_servicer: health.HealthServicer, service_name: str,
                 serving: bool = True) -> None:
    """The overall status ("") and the service's own status go SERVING (or NOT_SERVING)."""
    status = (health_pb2.HealthCheckResponse.SERVING if serving
              else health_pb2.HealthCheckResponse.NOT_SERVING)
    for name in ("", service_name):
        health_servicer.set(name, status)


class StreamSlots:
    """At most ``limit`` concurrent streams; a caller waits up to ``wait_s`` for a slot (at
    most ``max_waiting`` callers wait at once) before RESOURCE_EXHAUSTED."""

    def __init__(self, limit: int, wait_s: float, max_waiting: int,
                 metrics: Metrics | None = None) -> None:
        self.limit, self.wait_s, self.max_waiting = limit, wait_s, max_waiting
        self._slots = threading.BoundedSemaphore(limit)
        self._lock = threading.Lock()
        self._waiting = 0
        self._metrics = metrics

    def acquire(self, what: str) -> None:
        t0 = time.monotonic()
        if self._slots.acquire(blocking=False):
            self._observe(t0)
            return
        with self._lock:
            if self._waiting >= self.max_waiting:
                raise ResourceExhausted(f"all {self.limit} {what} slots are busy and "
                                        f"{self._waiting} callers wait already; retry later")
            self._waiting += 1
        try:
            ok = self._slots.acquire(timeout=self.wait_s)
        finally:
            with self._lock:
                self._waiting -= 1
        if not ok:
            raise ResourceExhausted(f"all {self.limit} {what} slots stayed busy for "
                                    f"{self.wait_s:g}s; retry later")
        self._observe(t0)

    def _observe(self, t0: float) -> None:
        if self._metrics is not None:
            self._metrics.queue_wait.labels(self._metrics.server).observe(time.monotonic() - t0)

    def release(self) -> None:
        self._slots.release()


_END = object()


def idle_timeout_iter(iterator: Iterator[T], idle_s: float, what: str = "request stream"
                      ) -> Iterator[T]:
    """The items of a (blocking) request iterator; raises DeadlineExceeded when the caller
    sends nothing for ``idle_s`` seconds (an idle stream gives its slot back)."""
    q: queue.Queue[Any] = queue.Queue(maxsize=2)
    stop = threading.Event()

    def pump() -> None:
        try:
            for item in iterator:
                while not stop.is_set():
                    try:
                        q.put(("item", item), timeout=0.5)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(("end", None))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            q.put(("error", exc))

    threading.Thread(target=pump, name="request-reader", daemon=True).start()
    try:
        while True:
            try:
                kind, value = q.get(timeout=idle_s)
            except queue.Empty:
                raise DeadlineExceeded(f"the {what} was idle for {idle_s:g}s; closed") from None
            if kind == "end":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        stop.set()


def bind_failure(exc: BaseException) -> str | None:
    """A one-line reason when ``exc`` is a failure to bind the server's port (the port is in
    use, or the address is not this machine's), else None: the CLIs print it instead of a
    traceback."""
    text = str(exc)
    if isinstance(exc, OSError) and exc.errno in (errno.EADDRINUSE, errno.EADDRNOTAVAIL,
                                                   errno.EACCES):
        return f"could not bind the port: {exc.strerror}"
    if isinstance(exc, (OSError, RuntimeError)) and (
            "Failed to bind" in text or text.startswith("could not bind")):
        return "could not bind the port (in use, or not an address of this machine)"
    return None


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

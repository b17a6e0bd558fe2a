"""A grpc.health.v1 probe for containers (like grpc_health_probe, in Python).

    python -m exporter.healthcheck [ADDR] [--service NAME] [--timeout SECONDS]
                                   [--tls-ca FILE [--tls-cert FILE --tls-key FILE]]

Exit status 0 when the server answers SERVING, 1 otherwise (NOT_SERVING, unreachable, timeout,
unknown service), 2 for a usage error (a port out of 1..65535, half-given TLS flags). ADDR
defaults to localhost:50051; the empty service name asks about the server as a whole. A TLS
server is asked over TLS with --tls-ca (env DFF_CLIENT_TLS_CA); the plaintext health-only port
(``--health-port``) needs no flags. Used by the Dockerfiles'
HEALTHCHECK; Kubernetes uses its native gRPC probe.
"""

from __future__ import annotations

import argparse
import sys


def check(address: str, service: str = "", timeout: float = 3.0,
          security: object = None) -> tuple[bool, str]:
    """(serving?, a one-line status) of the gRPC health service at address (``security``: a
    dff_protos.security.ClientSecurity; None = plaintext)."""
    import grpc
    from dff_protos.security import ClientSecurity
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    sec = security if isinstance(security, ClientSecurity) else ClientSecurity()
    with sec.channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as exc:
            return False, f"{address}: {exc.code().name}: {exc.details()}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
    return resp.status == health_pb2.HealthCheckResponse.SERVING, f"{address}: {status}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m exporter.healthcheck",
                                description="Ask a gRPC server's grpc.health.v1 service "
                                            "whether it is SERVING (exit 0) or not (exit 1).")
    p.add_argument("address", nargs="?", default="localhost:50051", help="host:port")
    p.add_argument("--service", default="", help="service name ('' = the whole server)")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds (default 3)")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing")
    from dff_protos.security import add_client_security_args, client_security_from_args

    add_client_security_args(p)
    args = p.parse_args(argv)
    from dff_protos.errors import DFFError
    from dff_protos.serving import check_address

    try:
        # gRPC would take 'host:70000' as port 4464 and probe that
        check_address(args.address, "ADDR")
        security = client_security_from_args(args)
    except DFFError as exc:
        print(f"{p.prog}: error: {exc}", file=sys.stderr)
        return 2
    ok, text = check(args.address, args.service, args.timeout, security)
    if not args.quiet:
        print(text, file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

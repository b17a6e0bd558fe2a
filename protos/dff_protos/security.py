"""TLS, mutual TLS and role tokens for both dff servers and every client.

Servers (``dff serve features``, ``dff serve engine``):

- ``--tls-cert FILE --tls-key FILE`` serve TLS; ``--tls-client-ca FILE`` also requires a client
  certificate signed by that CA (mutual TLS).
- ``--auth-tokens FILE``: one ``TOKEN ROLE`` per line (``#`` starts a comment), roles ``read``
  (Extract, DescribeModel, List, Get, Explain, reflection), ``write`` (read + Discover) and
  ``admin`` (write + Delete). A call without a known ``authorization: Bearer TOKEN`` gets
  UNAUTHENTICATED, a call above its token's role PERMISSION_DENIED. Tokens are compared in
  constant time and never logged. grpc.health.v1 needs no token (probes carry none).
- Environment fallbacks: DFF_TLS_CERT, DFF_TLS_KEY, DFF_TLS_CLIENT_CA, DFF_AUTH_TOKENS.

Clients (``--tls-ca FILE [--tls-cert FILE --tls-key FILE]``, ``--token-file FILE``; env
DFF_CLIENT_TLS_CA, DFF_CLIENT_TLS_CERT, DFF_CLIENT_TLS_KEY, DFF_TOKEN_FILE, DFF_TOKEN) build
their channels with :meth:`ClientSecurity.channel`. A process-wide default (set by the CLI,
else read from the environment) is used by clients that are not given one explicitly.

Every DeleteConceptSet is written to the ``dff.audit`` logger with the caller's role and peer,
refused attempts (UNAUTHENTICATED, PERMISSION_DENIED) too.
"""

from __future__ import annotations

import argparse
import contextvars
import hmac
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from dff_protos.errors import InvalidInput

log = logging.getLogger(__name__)
audit_log = logging.getLogger("dff.audit")

ROLES = ("read", "write", "admin")
_RANK = {role: n for n, role in enumerate(ROLES)}

# the least role each method needs; methods not listed need admin (deny by default)
METHOD_ROLES: dict[str, str | None] = {
    "/grpc.health.v1.Health/Check": None,
    "/grpc.health.v1.Health/Watch": None,
    "/grpc.health.v1.Health/List": None,
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": "read",
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo": "read",
    "/dff.v1.FeatureService/Extract": "read",
    "/dff.v1.FeatureService/DescribeModel": "read",
    "/dff.v1.ConceptEngine/Discover": "write",
    "/dff.v1.ConceptEngine/Explain": "read",
    "/dff.v1.ConceptEngine/ListConceptSets": "read",
    "/dff.v1.ConceptEngine/GetConceptSet": "read",
    "/dff.v1.ConceptEngine/DeleteConceptSet": "admin",
}
AUDITED = frozenset({"/dff.v1.ConceptEngine/DeleteConceptSet"})

_ROLE: contextvars.ContextVar[str] = contextvars.ContextVar("dff_role", default="anonymous")


def current_role() -> str:
    """The role of the caller of the RPC running in this thread ('anonymous' when tokens are
    off)."""
    return _ROLE.get()


def _env(name: str) -> str | None:
    value = os.environ.get(name, "").strip()
    return value or None


def _read(path: str | None, what: str) -> bytes | None:
    if not path:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise InvalidInput(f"cannot read the {what} {path}: {exc.strerror or exc}") from None


# ---------------------------------------------------------------------- tokens
def parse_tokens(text: str, source: str = "token file") -> dict[str, str]:
    """``TOKEN ROLE`` lines -> {token: role}. Comments (#) and blank lines are skipped; a bad
    line is refused naming its number (never its token)."""
    tokens: dict[str, str] = {}
    lines: dict[str, int] = {}  # token -> the line that gave it
    text = text.removeprefix("\ufeff")  # a BOM would become part of the first token
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2 or parts[1] not in _RANK:
            raise InvalidInput(f"{source} line {n}: expected 'TOKEN ROLE' with ROLE one of "
                               f"{', '.join(ROLES)}")
        if len(parts[0]) < 16:
            raise InvalidInput(f"{source} line {n}: a token needs at least 16 characters")
        if parts[0] in lines:
            # which role would it have? refuse rather than let the last line win
            raise InvalidInput(f"{source} lines {lines[parts[0]]} and {n}: the same token is "
                               "listed twice (each token once, with one role)")
        lines[parts[0]] = n
        tokens[parts[0]] = parts[1]
    if not tokens:
        raise InvalidInput(f"{source} holds no token")
    return tokens


def load_tokens(path: str) -> dict[str, str]:
    data = _read(path, "token file")
    assert data is not None
    return parse_tokens(data.decode("utf-8-sig", errors="replace"), path)


def read_client_token(path: str | None) -> str | None:
    """A client's token: the first non-comment field of ``path`` (a line 'TOKEN' or
    'TOKEN ROLE')."""
    data = _read(path, "token file")
    if data is None:
        return None
    for raw in data.decode("utf-8-sig", errors="replace").splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            return line.split()[0]
    raise InvalidInput(f"token file {path} holds no token")


def role_for(tokens: Mapping[str, str], presented: str) -> str | None:
    """The role of ``presented``, comparing against every token in constant time."""
    found: str | None = None
    encoded = presented.encode()
    for token, role in tokens.items():
        if hmac.compare_digest(token.encode(), encoded):
            found = role
    return found


def _reset(token: contextvars.Token[str]) -> None:
    try:
        _ROLE.reset(token)
    except ValueError:  # a generator finished in another context: nothing to restore
        _ROLE.set("anonymous")


def allowed(role: str, needed: str | None) -> bool:
    return needed is None or _RANK[role] >= _RANK[needed]


# ---------------------------------------------------------------------- server side
@dataclass(frozen=True)
class ServerSecurity:
    """TLS material and tokens of a server (all optional: nothing = plaintext, no tokens)."""

    cert: bytes | None = None
    key: bytes | None = None
    client_ca: bytes | None = None
    tokens: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise InvalidInput("--tls-cert and --tls-key go together")
        if self.client_ca is not None and self.cert is None:
            raise InvalidInput("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")

    @property
    def tls(self) -> bool:
        return self.cert is not None

    @property
    def mtls(self) -> bool:
        return self.client_ca is not None

    def credentials(self) -> grpc.ServerCredentials | None:
        if self.cert is None or self.key is None:
            return None
        return grpc.ssl_server_credentials(
            [(self.key, self.cert)], root_certificates=self.client_ca,
            require_client_auth=self.client_ca is not None)

    def describe(self) -> str:
        mode = "mutual TLS" if self.mtls else "TLS" if self.tls else "plaintext"
        auth = f"{len(self.tokens)} token(s)" if self.tokens else "no tokens"
        return f"{mode}, {auth}"

    @classmethod
    def from_files(cls, cert: str | None = None, key: str | None = None,
                   client_ca: str | None = None, tokens: str | None = None) -> ServerSecurity:
        security = cls(cert=_read(cert, "TLS certificate"), key=_read(key, "TLS key"),
                       client_ca=_read(client_ca, "client CA"),
                       tokens=load_tokens(tokens) if tokens else {})
        if cert and key:
            check_tls_files(cert, key, client_ca)
        return security


def _ssl_reason(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or str(exc)
    return str(reason).strip() or type(exc).__name__


def _check_certificates(path: str, flag: str, what: str) -> None:
    """InvalidInput naming ``flag`` when ``path`` holds no PEM certificate."""
    import ssl

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    text = ""
    try:
        text = Path(path).read_text("ascii", errors="replace")
        ctx.load_verify_locations(cadata=text)
    except (ssl.SSLError, ValueError, OSError) as exc:
        hint = " (it holds a private key: are --tls-cert and --tls-key swapped?)" \
            if flag.endswith("tls-cert") and "PRIVATE KEY-----" in text else \
            " (it holds a private key, not a certificate)" if "PRIVATE KEY-----" in text \
            else ""
        raise InvalidInput(f"{flag} {path}: not a PEM {what}: {_ssl_reason(exc)}"
                           f"{hint}") from None


def check_tls_files(cert: str, key: str, client_ca: str | None = None) -> None:
    """InvalidInput naming the file and the problem when the TLS material cannot serve: a
    certificate that is not one, a key that is not one or does not match the certificate, a
    client CA that holds no certificate. (gRPC itself only fails to add the port, which reads
    like a port in use.)"""
    import ssl

    _check_certificates(cert, "--tls-cert", "certificate")
    key_text = Path(key).read_text("ascii", errors="replace")
    if "PRIVATE KEY-----" not in key_text:
        hint = " (it holds a certificate: are --tls-cert and --tls-key swapped?)" \
            if "CERTIFICATE-----" in key_text else ""
        raise InvalidInput(f"--tls-key {key}: not a PEM private key{hint}")
    try:
        # never an interactive prompt for an encrypted key's passphrase
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, key, password=lambda: "")
    except (ssl.SSLError, ValueError, OSError) as exc:
        reason = _ssl_reason(exc)
        problem = ("does not match the certificate" if "MISMATCH" in reason.upper()
                   else f"cannot be used with the certificate ({reason})")
        raise InvalidInput(f"--tls-key {key} {problem} --tls-cert {cert}") from None
    if client_ca:
        _check_certificates(client_ca, "--tls-client-ca", "CA certificate")


def add_server_security_args(p: argparse.ArgumentParser) -> None:
    """--tls-cert/--tls-key/--tls-client-ca/--auth-tokens (env fallbacks)."""
    g = p.add_argument_group("security (env DFF_TLS_CERT, DFF_TLS_KEY, DFF_TLS_CLIENT_CA, "
                             "DFF_AUTH_TOKENS)")
    g.add_argument("--tls-cert", metavar="FILE", default=_env("DFF_TLS_CERT"),
                   help="PEM certificate chain: serve TLS")
    g.add_argument("--tls-key", metavar="FILE", default=_env("DFF_TLS_KEY"),
                   help="PEM private key of --tls-cert")
    g.add_argument("--tls-client-ca", metavar="FILE", default=_env("DFF_TLS_CLIENT_CA"),
                   help="PEM CA: require client certificates signed by it (mutual TLS)")
    g.add_argument("--auth-tokens", metavar="FILE", default=_env("DFF_AUTH_TOKENS"),
                   help="lines 'TOKEN ROLE' (read|write|admin): require a bearer token")


def server_security_from_args(args: argparse.Namespace) -> ServerSecurity:
    return ServerSecurity.from_files(args.tls_cert, args.tls_key, args.tls_client_ca,
                                     args.auth_tokens)


def _bearer(metadata: Sequence[Any] | None) -> str | None:
    for key, value in metadata or ():
        if key == "authorization":
            text = value.decode() if isinstance(value, bytes) else str(value)
            if text[:7].lower() == "bearer ":
                return text[7:].strip()
            return None
    return None


def _abort_handler(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str,
                   audit: Callable[[Any, grpc.ServicerContext], None] | None = None
                   ) -> grpc.RpcMethodHandler:
    def abort(_request: Any, context: grpc.ServicerContext) -> Any:
        if audit is not None:
            audit(_request, context)
        context.abort(code, message)

    # an audited refusal decodes the request, so that the audit line can name its id
    codec = {"request_deserializer": handler.request_deserializer,
             "response_serializer": handler.response_serializer} if audit is not None else {}
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(abort, **codec)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(abort, **codec)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(abort, **codec)
    return grpc.unary_unary_rpc_method_handler(abort, **codec)


def wrap_handler(handler: grpc.RpcMethodHandler,
                 wrap: Callable[[Callable[..., Any]], Callable[..., Any]]
                 ) -> grpc.RpcMethodHandler:
    """The same handler with its behaviour function wrapped."""
    for attr, factory in (("unary_unary", grpc.unary_unary_rpc_method_handler),
                          ("unary_stream", grpc.unary_stream_rpc_method_handler),
                          ("stream_unary", grpc.stream_unary_rpc_method_handler),
                          ("stream_stream", grpc.stream_stream_rpc_method_handler)):
        behaviour = getattr(handler, attr)
        if behaviour is not None:
            return factory(wrap(behaviour),
                           request_deserializer=handler.request_deserializer,
                           response_serializer=handler.response_serializer)
    return handler


class AuthInterceptor(grpc.ServerInterceptor):
    """Bearer-token check per method role (see METHOD_ROLES); audit line for AUDITED methods.
    With no tokens configured every call runs as 'anonymous' (Deletes are still audited)."""

    def __init__(self, tokens: Mapping[str, str]) -> None:
        self._tokens = dict(tokens)

    def intercept_service(self, continuation: Callable[[Any], Any],
                          handler_call_details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        needed = METHOD_ROLES.get(method, "admin")
        role = "anonymous"
        audited = method in AUDITED
        name = method.rsplit("/", 1)[-1]

        def refused(code: grpc.StatusCode, role: str) -> Callable[[Any, grpc.ServicerContext],
                                                                  None] | None:
            # a refused attempt at an audited method is audited too (never its token)
            if not audited:
                return None

            def audit(request: Any, context: grpc.ServicerContext) -> None:
                audit_log.warning("AUDIT refused %s (%s) id=%r role=%s peer=%s", name, code.name,
                                  getattr(request, "id", ""), role, context.peer())
            return audit

        if self._tokens and needed is not None:
            token = _bearer(handler_call_details.invocation_metadata)
            found = role_for(self._tokens, token) if token else None
            if found is None:
                log.info("refused %s: %s token", method, "unknown" if token else "missing")
                return _abort_handler(handler, grpc.StatusCode.UNAUTHENTICATED,
                                      "a valid 'authorization: Bearer TOKEN' is required",
                                      refused(grpc.StatusCode.UNAUTHENTICATED,
                                              f"none ({'unknown' if token else 'missing'} "
                                              "token)"))
            if not allowed(found, needed):
                log.info("refused %s: role %s, needs %s", method, found, needed)
                return _abort_handler(handler, grpc.StatusCode.PERMISSION_DENIED,
                                      f"{name} needs the {needed} role; this token has {found}",
                                      refused(grpc.StatusCode.PERMISSION_DENIED, found))
            role = found

        def enter(request: Any, context: grpc.ServicerContext) -> contextvars.Token[str]:
            if audited:
                audit_log.warning("AUDIT %s id=%r role=%s peer=%s", name,
                                  getattr(request, "id", ""), role, context.peer())
            return _ROLE.set(role)

        def wrap(behaviour: Callable[..., Any]) -> Callable[..., Any]:
            if handler.response_streaming:
                def run_stream(request: Any, context: grpc.ServicerContext) -> Any:
                    reset = enter(request, context)
                    try:
                        yield from behaviour(request, context)
                    finally:
                        _reset(reset)
                return run_stream

            def run_unary(request: Any, context: grpc.ServicerContext) -> Any:
                reset = enter(request, context)
                try:
                    return behaviour(request, context)
                finally:
                    _reset(reset)
            return run_unary

        return wrap_handler(handler, wrap)


# ---------------------------------------------------------------------- client side
class _TokenInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                        grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds ``authorization: Bearer TOKEN`` to every call."""

    def __init__(self, token: str) -> None:
        self._header = ("authorization", f"Bearer {token}")

    def _details(self, details: Any) -> Any:
        metadata = list(details.metadata or []) + [self._header]
        return details._replace(metadata=metadata) if hasattr(details, "_replace") else \
            _CallDetails(details.method, details.timeout, metadata, details.credentials,
                         getattr(details, "wait_for_ready", None),
                         getattr(details, "compression", None))

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)

    def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)


class _CallDetails(grpc.ClientCallDetails):
    def __init__(self, method: str, timeout: float | None, metadata: Any, credentials: Any,
                 wait_for_ready: Any, compression: Any) -> None:
        self.method = method
        self.timeout = timeout
        self.metadata = metadata
        self.credentials = credentials
        self.wait_for_ready = wait_for_ready
        self.compression = compression


@dataclass(frozen=True)
class ClientSecurity:
    """What a client needs: a CA to trust (TLS), its own certificate (mutual TLS), a token."""

    ca: bytes | None = None
    cert: bytes | None = None
    key: bytes | None = None
    token: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise InvalidInput("--tls-cert and --tls-key go together")
        if self.cert is not None and self.ca is None:
            raise InvalidInput("a client certificate (--tls-cert) needs --tls-ca")

    @property
    def tls(self) -> bool:
        return self.ca is not None

    def channel(self, target: str, options: Sequence[tuple[str, Any]] = ()) -> grpc.Channel:
        """A channel to ``target``: TLS when a CA is set, with the token on every call."""
        if self.ca is not None:
            creds = grpc.ssl_channel_credentials(root_certificates=self.ca,
                                                 private_key=self.key,
                                                 certificate_chain=self.cert)
            channel = grpc.secure_channel(target, creds, options=list(options))
        else:
            if self.token is not None and not _is_loopback(target):
                log.warning("sending a bearer token to %s without TLS (give --tls-ca)", target)
            channel = grpc.insecure_channel(target, options=list(options))
        if self.token is not None:
            channel = grpc.intercept_channel(channel, _TokenInterceptor(self.token))
        return channel

    @classmethod
    def from_files(cls, ca: str | None = None, cert: str | None = None, key: str | None = None,
                   token_file: str | None = None, token: str | None = None) -> ClientSecurity:
        return cls(ca=_read(ca, "TLS CA"), cert=_read(cert, "TLS certificate"),
                   key=_read(key, "TLS key"),
                   token=read_client_token(token_file) if token_file else token)

    @classmethod
    def from_env(cls, prefix: str = "DFF_CLIENT_") -> ClientSecurity:
        """DFF_CLIENT_TLS_CA / _CERT / _KEY, DFF_TOKEN_FILE, DFF_TOKEN."""
        return cls.from_files(_env(f"{prefix}TLS_CA"), _env(f"{prefix}TLS_CERT"),
                              _env(f"{prefix}TLS_KEY"), _env("DFF_TOKEN_FILE"),
                              _env("DFF_TOKEN"))


def _is_loopback(target: str) -> bool:
    host = target.split("///")[-1].rsplit(":", 1)[0].strip("[]")
    return host in ("localhost", "127.0.0.1", "::1") or host.startswith("127.")


def add_client_security_args(p: argparse.ArgumentParser | Any, prefix: str = "") -> None:
    """Client flags: ``--{prefix}tls-ca``, ``--{prefix}tls-cert``, ``--{prefix}tls-key``,
    ``--{prefix}token-file`` with env fallbacks (DFF_CLIENT_* / DFF_TOKEN_FILE, or
    DFF_FEATURE_* for prefix 'feature-')."""
    env = "DFF_FEATURE_" if prefix else "DFF_CLIENT_"
    token_env = "DFF_FEATURE_TOKEN_FILE" if prefix else "DFF_TOKEN_FILE"
    title = (f"{'feature-server ' if prefix else ''}client security (env {env}TLS_CA, "
             f"{env}TLS_CERT, {env}TLS_KEY, {token_env}{'' if prefix else ', DFF_TOKEN'})")
    # an argument group (not a parser) takes the flags itself: nested groups are deprecated
    g = p.add_argument_group(title) if isinstance(p, argparse.ArgumentParser) else p
    g.add_argument(f"--{prefix}tls-ca", metavar="FILE", default=_env(f"{env}TLS_CA"),
                   help="PEM CA of the server(s): connect with TLS")
    g.add_argument(f"--{prefix}tls-cert", metavar="FILE", default=_env(f"{env}TLS_CERT"),
                   help="PEM client certificate (mutual TLS)")
    g.add_argument(f"--{prefix}tls-key", metavar="FILE", default=_env(f"{env}TLS_KEY"),
                   help="PEM key of the client certificate")
    g.add_argument(f"--{prefix}token-file", metavar="FILE", default=_env(token_env),
                   help="file holding the bearer token sent to the server(s)")


def client_security_from_args(args: argparse.Namespace, prefix: str = "") -> ClientSecurity:
    """The ClientSecurity of the ``--{prefix}tls-*`` / ``--{prefix}token-file`` flags; a
    half-given pair is refused naming the flags as the command spells them."""
    a = prefix.replace("-", "_")
    token = None if prefix else _env("DFF_TOKEN")
    ca, cert, key = (getattr(args, f"{a}tls_{n}", None) for n in ("ca", "cert", "key"))
    if bool(cert) != bool(key):
        given, missing = ("cert", "key") if cert else ("key", "cert")
        raise InvalidInput(f"--{prefix}tls-{given} {cert or key}: needs --{prefix}tls-{missing} "
                           f"(--{prefix}tls-cert and --{prefix}tls-key go together)")
    if cert and not ca:
        raise InvalidInput(f"--{prefix}tls-cert {cert}: a client certificate needs "
                           f"--{prefix}tls-ca")
    return ClientSecurity.from_files(ca, cert, key, getattr(args, f"{a}token_file", None), token)


def check_client_tls_files(args: argparse.Namespace, prefix: str = "") -> None:
    """InvalidInput naming the flag when ``--{prefix}tls-ca`` / ``--{prefix}tls-cert`` is not
    a PEM certificate or ``--{prefix}tls-key`` holds no PEM private key (gRPC would only fail
    later, at every connection). Files that cannot be read are left to ``from_files``."""
    a = prefix.replace("-", "_")
    for name, what in (("ca", "CA certificate"), ("cert", "certificate")):
        path = getattr(args, f"{a}tls_{name}", None)
        if path and Path(path).is_file():
            _check_certificates(path, f"--{prefix}tls-{name}", what)
    key = getattr(args, f"{a}tls_key", None)
    if key and Path(key).is_file() and \
            "PRIVATE KEY-----" not in Path(key).read_text("ascii", errors="replace"):
        raise InvalidInput(f"--{prefix}tls-key {key}: not a PEM private key")


_default: ClientSecurity | None = None


def set_default_client_security(security: ClientSecurity | None) -> None:
    """The security used by clients built without one (the CLI sets it from its flags)."""
    global _default
    _default = security


def default_client_security() -> ClientSecurity:
    return _default if _default is not None else ClientSecurity.from_env()

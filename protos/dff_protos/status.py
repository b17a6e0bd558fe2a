"""The ONE place where domain errors become gRPC status codes (servers) - and back (clients)."""

from __future__ import annotations

import functools
import inspect
import logging

import grpc

from dff_protos import errors

log = logging.getLogger(__name__)

_CODES: list[tuple[type[BaseException], grpc.StatusCode]] = [
    (errors.ImageTooLarge, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.InvalidInput, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.NotFound, grpc.StatusCode.NOT_FOUND),
    (errors.NotReady, grpc.StatusCode.UNAVAILABLE),
    (errors.ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.TooFewImages, grpc.StatusCode.FAILED_PRECONDITION),
]


def status_for(exc: BaseException) -> grpc.StatusCode:
    for cls, code in _CODES:
        if isinstance(exc, cls):
            return code
    return grpc.StatusCode.INTERNAL


def error_from_rpc(exc: grpc.RpcError) -> errors.DFFError:
    """A client-side RpcError as the matching domain error (message kept)."""
    code = exc.code() if hasattr(exc, "code") else None
    details = exc.details() if hasattr(exc, "details") else str(exc)
    for cls, status in _CODES:
        if status == code:
            return cls(details)
    return errors.DFFError(f"{code}: {details}")


def _abort(context: grpc.ServicerContext, exc: BaseException, name: str):
    code = status_for(exc)
    if code == grpc.StatusCode.INTERNAL:
        log.exception("unhandled error in %s", name)
        context.abort(code, "internal error (see server log)")
    context.abort(code, str(exc))


def map_errors(method):
    """Decorator for servicer methods (unary or server-streaming): domain error -> status."""
    name = method.__qualname__
    if inspect.isgeneratorfunction(method):
        @functools.wraps(method)
        def stream_wrapper(self, request, context):
            try:
                yield from method(self, request, context)
            except errors.DFFError as exc:
                _abort(context, exc, name)
            except Exception as exc:  # noqa: BLE001 - becomes INTERNAL with a logged traceback
                _abort(context, exc, name)
        return stream_wrapper

    @functools.wraps(method)
    def unary_wrapper(self, request, context):
        try:
            return method(self, request, context)
        except errors.DFFError as exc:
            _abort(context, exc, name)
        except Exception as exc:  # noqa: BLE001
            _abort(context, exc, name)
    return unary_wrapper

"""The ONE map between domain errors and status codes, both ways, for whole calls (gRPC status)
and for single items of a stream (``ItemError``).

``TABLE`` lists every domain error kind with its gRPC code and its per-item code. Several
kinds share a code (ImageTooLarge and InvalidInput are both INVALID_ARGUMENT), so the precise
kind travels with the error: as the trailing-metadata key ``dff-error-kind`` of a failed call
and as ``ItemError.kind`` of a failed item. The reverse map takes that kind when it belongs to
the code that came (a kind cannot turn a code into another), else the code's default kind in
``DEFAULT_FOR_CODE`` - an explicit table, never "the first class with that code".
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable
from typing import Any, NamedTuple

import grpc

from dff_protos import errors
from dff_protos.v1 import common_pb2

log = logging.getLogger(__name__)

KIND_KEY = "dff-error-kind"
_ITEM = common_pb2.ItemError


class Entry(NamedTuple):
    cls: type[errors.DFFError]
    code: grpc.StatusCode
    item_code: common_pb2.ItemError.Code


# most specific first: status_for walks the MRO of the raised error, so order does not decide
TABLE: dict[str, Entry] = {e.cls.__name__: e for e in (
    Entry(errors.InvalidInput, grpc.StatusCode.INVALID_ARGUMENT, _ITEM.INVALID_ARGUMENT),
    Entry(errors.ImageTooLarge, grpc.StatusCode.INVALID_ARGUMENT, _ITEM.IMAGE_TOO_LARGE),
    Entry(errors.NotFound, grpc.StatusCode.NOT_FOUND, _ITEM.NOT_FOUND),
    Entry(errors.NotReady, grpc.StatusCode.UNAVAILABLE, _ITEM.INTERNAL),
    Entry(errors.Unavailable, grpc.StatusCode.UNAVAILABLE, _ITEM.INTERNAL),
    Entry(errors.ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED, _ITEM.INTERNAL),
    Entry(errors.TooFewImages, grpc.StatusCode.FAILED_PRECONDITION, _ITEM.INTERNAL),
    Entry(errors.DataLoss, grpc.StatusCode.DATA_LOSS, _ITEM.INTERNAL),
    Entry(errors.DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED, _ITEM.INTERNAL),
    Entry(errors.Unauthenticated, grpc.StatusCode.UNAUTHENTICATED, _ITEM.INTERNAL),
    Entry(errors.PermissionDenied, grpc.StatusCode.PERMISSION_DENIED, _ITEM.INTERNAL),
    Entry(errors.Unimplemented, grpc.StatusCode.UNIMPLEMENTED, _ITEM.INTERNAL),
    Entry(errors.QueryOfDeath, grpc.StatusCode.ABORTED, _ITEM.INTERNAL),
    Entry(errors.Cancelled, grpc.StatusCode.CANCELLED, _ITEM.INTERNAL),
    Entry(errors.Internal, grpc.StatusCode.INTERNAL, _ITEM.INTERNAL),
)}

# the reverse map: what a code means when no (valid) kind came with it
DEFAULT_FOR_CODE: dict[grpc.StatusCode, type[errors.DFFError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: errors.InvalidInput,
    grpc.StatusCode.OUT_OF_RANGE: errors.InvalidInput,
    grpc.StatusCode.NOT_FOUND: errors.NotFound,
    grpc.StatusCode.UNAVAILABLE: errors.Unavailable,
    grpc.StatusCode.RESOURCE_EXHAUSTED: errors.ResourceExhausted,
    grpc.StatusCode.FAILED_PRECONDITION: errors.TooFewImages,
    grpc.StatusCode.DATA_LOSS: errors.DataLoss,
    grpc.StatusCode.DEADLINE_EXCEEDED: errors.DeadlineExceeded,
    grpc.StatusCode.UNAUTHENTICATED: errors.Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: errors.PermissionDenied,
    grpc.StatusCode.UNIMPLEMENTED: errors.Unimplemented,
    grpc.StatusCode.ABORTED: errors.QueryOfDeath,
    grpc.StatusCode.CANCELLED: errors.Cancelled,
    grpc.StatusCode.INTERNAL: errors.Internal,
    grpc.StatusCode.UNKNOWN: errors.Internal,
}
# per-item codes with no kind attached (older servers)
DEFAULT_FOR_ITEM_CODE: dict[common_pb2.ItemError.Code, type[errors.DFFError]] = {
    _ITEM.INVALID_IMAGE: errors.InvalidInput,
    _ITEM.IMAGE_TOO_LARGE: errors.ImageTooLarge,
    _ITEM.INVALID_ARGUMENT: errors.InvalidInput,
    _ITEM.NOT_FOUND: errors.NotFound,
    _ITEM.INTERNAL: errors.Internal,
    _ITEM.CODE_UNSPECIFIED: errors.Internal,
}

_HINTS = {
    grpc.StatusCode.UNIMPLEMENTED: " (is this address the right kind of dff server? --engine "
                                   "takes a concept engine, --feature-server a feature server)",
}


def entry_for(exc: BaseException) -> Entry | None:
    """The table entry of the most specific domain class of ``exc`` (None: not a domain
    error, i.e. INTERNAL)."""
    for cls in type(exc).__mro__:
        entry = TABLE.get(cls.__name__)
        if entry is not None and entry.cls is cls:
            return entry
    return None


def status_for(exc: BaseException) -> grpc.StatusCode:
    entry = entry_for(exc)
    return entry.code if entry is not None else grpc.StatusCode.INTERNAL


def kind_for(exc: BaseException) -> str:
    entry = entry_for(exc)
    return entry.cls.__name__ if entry is not None else "Internal"


def error_for(code: grpc.StatusCode | None, details: str, kind: str = ""
              ) -> errors.DFFError:
    """The domain error for a status code (+ the precise kind when it belongs to the code)."""
    entry = TABLE.get(kind)
    if entry is not None and entry.code == code:
        cls: type[errors.DFFError] = entry.cls
    else:
        cls = DEFAULT_FOR_CODE.get(code, errors.DFFError) if code is not None else \
            errors.DFFError
    if cls is errors.DFFError:
        return errors.DFFError(f"{code.name if code else 'UNKNOWN'}: {details}")
    return cls(details + _HINTS.get(code, "") if code is not None else details)


def error_from_rpc(exc: grpc.RpcError) -> errors.DFFError:
    """A client-side RpcError as the matching domain error (message kept)."""
    code = exc.code() if hasattr(exc, "code") else None
    details = exc.details() if hasattr(exc, "details") else str(exc)
    kind = ""
    trailing = exc.trailing_metadata() if hasattr(exc, "trailing_metadata") else None
    for key, value in trailing or ():
        if key == KIND_KEY:
            kind = value.decode() if isinstance(value, bytes) else str(value)
    return error_for(code, details or "", kind)


# ---------------------------------------------------------------------- per item
def item_error(exc: BaseException, decoding: bool = False) -> common_pb2.ItemError:
    """A per-item error for a stream: the item failed, the stream goes on. A decode failure
    (InvalidInput while decoding) is INVALID_IMAGE; non-domain errors are INTERNAL and keep
    their text out of the answer (it is logged)."""
    entry = entry_for(exc)
    if entry is None or entry.cls is errors.Internal:
        log.error("internal error on an item", exc_info=exc)
        return common_pb2.ItemError(code=_ITEM.INTERNAL, kind="Internal",
                                    message="internal error (see server log)")
    code = entry.item_code
    if decoding and entry.cls is errors.InvalidInput:
        code = _ITEM.INVALID_IMAGE
    return common_pb2.ItemError(code=code, message=str(exc), kind=entry.cls.__name__)


def error_from_item(err: common_pb2.ItemError) -> errors.DFFError:
    """The domain error of an ItemError (its kind when known, else its code)."""
    entry = TABLE.get(err.kind)
    cls = entry.cls if entry is not None else DEFAULT_FOR_ITEM_CODE.get(err.code, errors.Internal)
    return cls(err.message)


# ---------------------------------------------------------------------- servers
def abort(context: grpc.ServicerContext, exc: BaseException, name: str) -> None:
    """End the call with the status of ``exc`` (INTERNAL hides the text and logs it)."""
    if isinstance(exc, grpc.RpcError) and not context.is_active():
        # the caller went away (cancelled, deadline, connection lost) while its request
        # stream was read: nothing to answer, nothing went wrong here
        log.debug("%s: the caller went away: %s", name, exc)
        return
    code = status_for(exc)
    if code == grpc.StatusCode.INTERNAL:
        log.exception("unhandled error in %s", name)
        context.set_trailing_metadata(((KIND_KEY, "Internal"),))
        context.abort(code, "internal error (see server log)")
    context.set_trailing_metadata(((KIND_KEY, kind_for(exc)),))
    context.abort(code, str(exc))


def map_errors(method: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator for servicer methods (unary or server-streaming): domain error -> status."""
    name = method.__qualname__
    if inspect.isgeneratorfunction(method):
        @functools.wraps(method)
        def stream_wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
            try:
                yield from method(self, request, context)
            except Exception as exc:  # noqa: BLE001 - INTERNAL with a logged traceback
                abort(context, exc, name)
        return stream_wrapper

    @functools.wraps(method)
    def unary_wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return method(self, request, context)
        except Exception as exc:  # noqa: BLE001
            abort(context, exc, name)
    return unary_wrapper

"""The one error map (dff_protos.status), both ways, for every domain error kind: through a
real gRPC call (status code + trailing kind) and through a per-item ItemError."""

from __future__ import annotations

import inspect
from concurrent import futures

import grpc
import pytest
from dff_protos import errors, status
from dff_protos.v1 import common_pb2

KINDS = sorted(status.TABLE)


def test_every_domain_error_is_in_the_table():
    domain = {name for name, cls in inspect.getmembers(errors, inspect.isclass)
              if issubclass(cls, errors.DFFError) and cls is not errors.DFFError}
    assert domain == set(status.TABLE)
    # every code a table entry uses has an explicit reverse default
    assert {e.code for e in status.TABLE.values()} <= set(status.DEFAULT_FOR_CODE)


@pytest.fixture(scope="module")
def raising_server():
    """A server whose one method raises the domain error named in the request."""

    def behaviour(request: bytes, context: grpc.ServicerContext) -> bytes:
        name, _, message = request.decode().partition(":")
        status.abort(context, status.TABLE[name].cls(message), "test")
        return b""

    handler = grpc.method_handlers_generic_handler("t.T", {
        "Raise": grpc.unary_unary_rpc_method_handler(behaviour)})
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield channel.unary_unary("/t.T/Raise")
    channel.close()
    server.stop(0)


@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_through_a_call(raising_server, kind):
    entry = status.TABLE[kind]
    with pytest.raises(grpc.RpcError) as err:
        raising_server(f"{kind}:it went wrong".encode(), timeout=10)
    assert err.value.code() == entry.code
    back = status.error_from_rpc(err.value)
    assert type(back) is entry.cls
    if entry.cls is errors.Internal:
        assert "internal error" in str(back)  # the server hides the text of INTERNAL
    else:
        assert str(back).startswith("it went wrong")


@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_through_an_item_error(kind):
    entry = status.TABLE[kind]
    item = status.item_error(entry.cls("bad item"))
    assert item.kind == kind
    back = status.error_from_item(item)
    assert type(back) is entry.cls


def test_reverse_is_not_first_match():
    # an INVALID_ARGUMENT without a kind is InvalidInput, never ImageTooLarge
    assert type(status.error_for(grpc.StatusCode.INVALID_ARGUMENT, "unknown layer")) is \
        errors.InvalidInput
    assert type(status.error_for(grpc.StatusCode.INVALID_ARGUMENT, "x", "ImageTooLarge")) is \
        errors.ImageTooLarge
    # a kind cannot change the code's meaning
    assert type(status.error_for(grpc.StatusCode.NOT_FOUND, "x", "ImageTooLarge")) is \
        errors.NotFound
    assert type(status.error_for(grpc.StatusCode.UNAVAILABLE, "down")) is errors.Unavailable
    older = common_pb2.ItemError(code=common_pb2.ItemError.INVALID_ARGUMENT, message="m")
    assert type(status.error_from_item(older)) is errors.InvalidInput


def test_decode_failures_are_invalid_image_and_bugs_stay_internal():
    item = status.item_error(errors.InvalidInput("corrupt"), decoding=True)
    assert item.code == common_pb2.ItemError.INVALID_IMAGE and item.kind == "InvalidInput"
    bug = status.item_error(ZeroDivisionError("secret detail"))
    assert bug.code == common_pb2.ItemError.INTERNAL and "secret" not in bug.message
    assert status.status_for(KeyError("x")) == grpc.StatusCode.INTERNAL


def test_unimplemented_says_which_server_to_use():
    err = status.error_for(grpc.StatusCode.UNIMPLEMENTED, "Method not found!")
    assert isinstance(err, errors.Unimplemented) and "--engine" in str(err)

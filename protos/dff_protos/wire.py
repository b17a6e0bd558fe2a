"""Tensors on the wire: numpy <-> dff.v1.Tensor (raw little-endian bytes, shape, dtype)."""

from __future__ import annotations

import math

import numpy as np

from dff_protos.errors import InvalidInput
from dff_protos.v1 import common_pb2

_TO_NUMPY: dict[int, np.dtype] = {
    common_pb2.DTYPE_UNSPECIFIED: np.dtype("<f4"),
    common_pb2.FLOAT32: np.dtype("<f4"),
    common_pb2.FLOAT16: np.dtype("<f2"),
    common_pb2.UINT8: np.dtype("u1"),  # decoded pixels (features.DecodedImage)
}
#: the most bytes an error message spells out (a shape may claim any number)
MAX_TENSOR_BYTES = 2**62


def dtype_from_name(name: str) -> common_pb2.DType:
    """'float16'/'float32' -> the DType enum value."""
    try:
        return {"float32": common_pb2.FLOAT32, "float16": common_pb2.FLOAT16}[name]
    except KeyError:
        raise InvalidInput(f"unknown wire dtype {name!r} (float32 or float16)") from None


def to_tensor(array: np.ndarray, dtype: common_pb2.DType = common_pb2.FLOAT32
              ) -> common_pb2.Tensor:
    """Encode an array (any float dtype) as a Tensor of the given wire dtype."""
    return fill_tensor(common_pb2.Tensor(), array, dtype)


def fill_tensor(tensor: common_pb2.Tensor, array: np.ndarray,
                dtype: common_pb2.DType = common_pb2.FLOAT32) -> common_pb2.Tensor:
    """Write an array into a Tensor message in place (e.g. one made by ``repeated.add()``):
    the bytes are copied once into the message, not again into each enclosing message."""
    np_dtype = _TO_NUMPY[dtype]
    tensor.data = np.ascontiguousarray(array, dtype=np_dtype).tobytes()
    tensor.shape[:] = list(array.shape)
    tensor.dtype = dtype or common_pb2.FLOAT32
    return tensor


def from_tensor(tensor: common_pb2.Tensor, *, as_float32: bool = True) -> np.ndarray:
    """Decode a Tensor; float16 is widened to float32 unless as_float32 is False."""
    try:
        np_dtype = _TO_NUMPY[tensor.dtype]
    except KeyError:
        raise InvalidInput(f"unknown tensor dtype {tensor.dtype}") from None
    shape = tuple(int(s) for s in tensor.shape)
    if any(s < 0 for s in shape):
        raise InvalidInput(f"tensor of shape {list(shape)}: a dimension is negative")
    # in Python ints: an int64 product wraps (3 x (2^63-1) x (2^63-1) is 3 in int64)
    expected = math.prod(shape) * np_dtype.itemsize
    data = tensor.data  # each access copies the bytes out of the message: once
    if len(data) != expected:
        need = f"{expected} bytes" if expected <= MAX_TENSOR_BYTES else \
            f"more than {MAX_TENSOR_BYTES} bytes"
        raise InvalidInput(
            f"tensor of shape {list(shape)} and dtype {np_dtype.name} needs {need}, "
            f"got {len(data)}")
    array = np.frombuffer(data, dtype=np_dtype).reshape(shape)
    if as_float32 and array.dtype != np.float32:
        return array.astype(np.float32)
    return array


def item_error(exc: BaseException) -> common_pb2.ItemError:
    """A per-item error for a stream (see :func:`dff_protos.status.item_error`)."""
    from dff_protos.status import item_error as _item_error

    return _item_error(exc)

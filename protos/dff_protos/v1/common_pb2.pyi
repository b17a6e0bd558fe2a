from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    FLOAT32: _ClassVar[DType]
    FLOAT16: _ClassVar[DType]
    UINT8: _ClassVar[DType]

class ResizeMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RESIZE_MODE_UNSPECIFIED: _ClassVar[ResizeMode]
    SQUASH: _ClassVar[ResizeMode]
    KEEP_ASPECT: _ClassVar[ResizeMode]
    SHORTER_CROP: _ClassVar[ResizeMode]
DTYPE_UNSPECIFIED: DType
FLOAT32: DType
FLOAT16: DType
UINT8: DType
RESIZE_MODE_UNSPECIFIED: ResizeMode
SQUASH: ResizeMode
KEEP_ASPECT: ResizeMode
SHORTER_CROP: ResizeMode

class Tensor(_message.Message):
    __slots__ = ("data", "shape", "dtype")
    DATA_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: DType
    def __init__(self, data: _Optional[bytes] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[_Union[DType, str]] = ...) -> None: ...

class ResizePolicy(_message.Message):
    __slots__ = ("mode", "size")
    MODE_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    mode: ResizeMode
    size: int
    def __init__(self, mode: _Optional[_Union[ResizeMode, str]] = ..., size: _Optional[int] = ...) -> None: ...

class ImageInput(_message.Message):
    __slots__ = ("id", "data")
    ID_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    id: str
    data: bytes
    def __init__(self, id: _Optional[str] = ..., data: _Optional[bytes] = ...) -> None: ...

class ImageInfo(_message.Message):
    __slots__ = ("original_height", "original_width", "input_height", "input_width")
    ORIGINAL_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    ORIGINAL_WIDTH_FIELD_NUMBER: _ClassVar[int]
    INPUT_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    INPUT_WIDTH_FIELD_NUMBER: _ClassVar[int]
    original_height: int
    original_width: int
    input_height: int
    input_width: int
    def __init__(self, original_height: _Optional[int] = ..., original_width: _Optional[int] = ..., input_height: _Optional[int] = ..., input_width: _Optional[int] = ...) -> None: ...

class ItemError(_message.Message):
    __slots__ = ("code", "message", "kind")
    class Code(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        CODE_UNSPECIFIED: _ClassVar[ItemError.Code]
        INVALID_IMAGE: _ClassVar[ItemError.Code]
        IMAGE_TOO_LARGE: _ClassVar[ItemError.Code]
        INVALID_ARGUMENT: _ClassVar[ItemError.Code]
        NOT_FOUND: _ClassVar[ItemError.Code]
        INTERNAL: _ClassVar[ItemError.Code]
    CODE_UNSPECIFIED: ItemError.Code
    INVALID_IMAGE: ItemError.Code
    IMAGE_TOO_LARGE: ItemError.Code
    INVALID_ARGUMENT: ItemError.Code
    NOT_FOUND: ItemError.Code
    INTERNAL: ItemError.Code
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    code: ItemError.Code
    message: str
    kind: str
    def __init__(self, code: _Optional[_Union[ItemError.Code, str]] = ..., message: _Optional[str] = ..., kind: _Optional[str] = ...) -> None: ...

from dff_protos.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ExtractOptions(_message.Message):
    __slots__ = ("model", "layers", "wire_dtype", "resize", "return_probabilities", "top_k", "classifier", "sparse", "precision")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    WIRE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    RESIZE_FIELD_NUMBER: _ClassVar[int]
    RETURN_PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    CLASSIFIER_FIELD_NUMBER: _ClassVar[int]
    SPARSE_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    model: str
    layers: _containers.RepeatedScalarFieldContainer[str]
    wire_dtype: _common_pb2.DType
    resize: _common_pb2.ResizePolicy
    return_probabilities: bool
    top_k: int
    classifier: str
    sparse: bool
    precision: str
    def __init__(self, model: _Optional[str] = ..., layers: _Optional[_Iterable[str]] = ..., wire_dtype: _Optional[_Union[_common_pb2.DType, str]] = ..., resize: _Optional[_Union[_common_pb2.ResizePolicy, _Mapping]] = ..., return_probabilities: _Optional[bool] = ..., top_k: _Optional[int] = ..., classifier: _Optional[str] = ..., sparse: _Optional[bool] = ..., precision: _Optional[str] = ...) -> None: ...

class ExtractRequest(_message.Message):
    __slots__ = ("options", "image", "pixels", "prepared")
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    PIXELS_FIELD_NUMBER: _ClassVar[int]
    PREPARED_FIELD_NUMBER: _ClassVar[int]
    options: ExtractOptions
    image: _common_pb2.ImageInput
    pixels: DecodedImage
    prepared: PreparedImage
    def __init__(self, options: _Optional[_Union[ExtractOptions, _Mapping]] = ..., image: _Optional[_Union[_common_pb2.ImageInput, _Mapping]] = ..., pixels: _Optional[_Union[DecodedImage, _Mapping]] = ..., prepared: _Optional[_Union[PreparedImage, _Mapping]] = ...) -> None: ...

class DecodedImage(_message.Message):
    __slots__ = ("id", "pixels")
    ID_FIELD_NUMBER: _ClassVar[int]
    PIXELS_FIELD_NUMBER: _ClassVar[int]
    id: str
    pixels: _common_pb2.Tensor
    def __init__(self, id: _Optional[str] = ..., pixels: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ...) -> None: ...

class PreparedImage(_message.Message):
    __slots__ = ("id", "features_input", "classifier_input", "original_height", "original_width")
    ID_FIELD_NUMBER: _ClassVar[int]
    FEATURES_INPUT_FIELD_NUMBER: _ClassVar[int]
    CLASSIFIER_INPUT_FIELD_NUMBER: _ClassVar[int]
    ORIGINAL_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    ORIGINAL_WIDTH_FIELD_NUMBER: _ClassVar[int]
    id: str
    features_input: _common_pb2.Tensor
    classifier_input: _common_pb2.Tensor
    original_height: int
    original_width: int
    def __init__(self, id: _Optional[str] = ..., features_input: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., classifier_input: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., original_height: _Optional[int] = ..., original_width: _Optional[int] = ...) -> None: ...

class SparseActivation(_message.Message):
    __slots__ = ("shape", "indptr", "indices", "values")
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    INDPTR_FIELD_NUMBER: _ClassVar[int]
    INDICES_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    shape: _containers.RepeatedScalarFieldContainer[int]
    indptr: bytes
    indices: bytes
    values: _common_pb2.Tensor
    def __init__(self, shape: _Optional[_Iterable[int]] = ..., indptr: _Optional[bytes] = ..., indices: _Optional[bytes] = ..., values: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ...) -> None: ...

class Activation(_message.Message):
    __slots__ = ("layer", "tensor", "sparse")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    SPARSE_FIELD_NUMBER: _ClassVar[int]
    layer: str
    tensor: _common_pb2.Tensor
    sparse: SparseActivation
    def __init__(self, layer: _Optional[str] = ..., tensor: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., sparse: _Optional[_Union[SparseActivation, _Mapping]] = ...) -> None: ...

class ClassScore(_message.Message):
    __slots__ = ("index", "name", "probability")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    index: int
    name: str
    probability: float
    def __init__(self, index: _Optional[int] = ..., name: _Optional[str] = ..., probability: _Optional[float] = ...) -> None: ...

class ExtractResponse(_message.Message):
    __slots__ = ("id", "activations", "probabilities", "top_k", "info", "error")
    ID_FIELD_NUMBER: _ClassVar[int]
    ACTIVATIONS_FIELD_NUMBER: _ClassVar[int]
    PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    INFO_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    id: str
    activations: _containers.RepeatedCompositeFieldContainer[Activation]
    probabilities: _common_pb2.Tensor
    top_k: _containers.RepeatedCompositeFieldContainer[ClassScore]
    info: _common_pb2.ImageInfo
    error: _common_pb2.ItemError
    def __init__(self, id: _Optional[str] = ..., activations: _Optional[_Iterable[_Union[Activation, _Mapping]]] = ..., probabilities: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., top_k: _Optional[_Iterable[_Union[ClassScore, _Mapping]]] = ..., info: _Optional[_Union[_common_pb2.ImageInfo, _Mapping]] = ..., error: _Optional[_Union[_common_pb2.ItemError, _Mapping]] = ...) -> None: ...

class DescribeModelRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class LayerInfo(_message.Message):
    __slots__ = ("name", "channels", "stride", "shape_at_224")
    NAME_FIELD_NUMBER: _ClassVar[int]
    CHANNELS_FIELD_NUMBER: _ClassVar[int]
    STRIDE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_AT_224_FIELD_NUMBER: _ClassVar[int]
    name: str
    channels: int
    stride: int
    shape_at_224: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, name: _Optional[str] = ..., channels: _Optional[int] = ..., stride: _Optional[int] = ..., shape_at_224: _Optional[_Iterable[int]] = ...) -> None: ...

class Preprocessing(_message.Message):
    __slots__ = ("color_order", "mean", "std", "default_resize", "description", "resize_shorter")
    COLOR_ORDER_FIELD_NUMBER: _ClassVar[int]
    MEAN_FIELD_NUMBER: _ClassVar[int]
    STD_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_RESIZE_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    RESIZE_SHORTER_FIELD_NUMBER: _ClassVar[int]
    color_order: str
    mean: _containers.RepeatedScalarFieldContainer[float]
    std: _containers.RepeatedScalarFieldContainer[float]
    default_resize: _common_pb2.ResizePolicy
    description: str
    resize_shorter: int
    def __init__(self, color_order: _Optional[str] = ..., mean: _Optional[_Iterable[float]] = ..., std: _Optional[_Iterable[float]] = ..., default_resize: _Optional[_Union[_common_pb2.ResizePolicy, _Mapping]] = ..., description: _Optional[str] = ..., resize_shorter: _Optional[int] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "kind", "layers", "preprocessing", "weights_sha256", "source", "num_classes", "class_names", "onnx_sha256", "class_wnids", "precision", "base_model")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    PREPROCESSING_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_SHA256_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    NUM_CLASSES_FIELD_NUMBER: _ClassVar[int]
    CLASS_NAMES_FIELD_NUMBER: _ClassVar[int]
    ONNX_SHA256_FIELD_NUMBER: _ClassVar[int]
    CLASS_WNIDS_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: str
    layers: _containers.RepeatedCompositeFieldContainer[LayerInfo]
    preprocessing: Preprocessing
    weights_sha256: str
    source: str
    num_classes: int
    class_names: _containers.RepeatedScalarFieldContainer[str]
    onnx_sha256: str
    class_wnids: _containers.RepeatedScalarFieldContainer[str]
    precision: str
    base_model: str
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[str] = ..., layers: _Optional[_Iterable[_Union[LayerInfo, _Mapping]]] = ..., preprocessing: _Optional[_Union[Preprocessing, _Mapping]] = ..., weights_sha256: _Optional[str] = ..., source: _Optional[str] = ..., num_classes: _Optional[int] = ..., class_names: _Optional[_Iterable[str]] = ..., onnx_sha256: _Optional[str] = ..., class_wnids: _Optional[_Iterable[str]] = ..., precision: _Optional[str] = ..., base_model: _Optional[str] = ...) -> None: ...

class ServerLimits(_message.Message):
    __slots__ = ("max_message_bytes", "max_pixels", "max_batch_size", "max_concurrent_streams")
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_PIXELS_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_CONCURRENT_STREAMS_FIELD_NUMBER: _ClassVar[int]
    max_message_bytes: int
    max_pixels: int
    max_batch_size: int
    max_concurrent_streams: int
    def __init__(self, max_message_bytes: _Optional[int] = ..., max_pixels: _Optional[int] = ..., max_batch_size: _Optional[int] = ..., max_concurrent_streams: _Optional[int] = ...) -> None: ...

class DescribeModelResponse(_message.Message):
    __slots__ = ("models", "execution_provider", "available_providers", "server_version", "limits", "precisions", "default_precision", "accepts_decoded_images", "accepts_prepared_images", "accepts_prepared_float16", "half_io")
    MODELS_FIELD_NUMBER: _ClassVar[int]
    EXECUTION_PROVIDER_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_PROVIDERS_FIELD_NUMBER: _ClassVar[int]
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    PRECISIONS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_PRECISION_FIELD_NUMBER: _ClassVar[int]
    ACCEPTS_DECODED_IMAGES_FIELD_NUMBER: _ClassVar[int]
    ACCEPTS_PREPARED_IMAGES_FIELD_NUMBER: _ClassVar[int]
    ACCEPTS_PREPARED_FLOAT16_FIELD_NUMBER: _ClassVar[int]
    HALF_IO_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    execution_provider: str
    available_providers: _containers.RepeatedScalarFieldContainer[str]
    server_version: str
    limits: ServerLimits
    precisions: _containers.RepeatedScalarFieldContainer[str]
    default_precision: str
    accepts_decoded_images: bool
    accepts_prepared_images: bool
    accepts_prepared_float16: bool
    half_io: bool
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ..., execution_provider: _Optional[str] = ..., available_providers: _Optional[_Iterable[str]] = ..., server_version: _Optional[str] = ..., limits: _Optional[_Union[ServerLimits, _Mapping]] = ..., precisions: _Optional[_Iterable[str]] = ..., default_precision: _Optional[str] = ..., accepts_decoded_images: _Optional[bool] = ..., accepts_prepared_images: _Optional[bool] = ..., accepts_prepared_float16: _Optional[bool] = ..., half_io: _Optional[bool] = ...) -> None: ...

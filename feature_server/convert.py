"""dff.v1 FeatureService messages <-> domain objects, both directions, in one place.

The servicer (:mod:`feature_server.service`) and the client (:mod:`feature_server.client`) use
these functions, so a field added to ``features.proto`` is mapped once (round-trip tested).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from dff_protos import status, wire
from dff_protos.errors import InvalidInput
from dff_protos.v1 import common_pb2, features_pb2

from feature_server.extractor import Activation, ExtractOptions, ExtractResult, ImageData
from feature_server.images import DecodeLimits, check_pixels
from feature_server.models.registry import DEFAULT_CLASSIFIER, DEFAULT_FEATURE_MODEL
from feature_server.sparse import SparseActivation

if TYPE_CHECKING:
    from feature_server.service import ServerConfig

log = logging.getLogger(__name__)

_RESIZE_FROM_PROTO = {common_pb2.RESIZE_MODE_UNSPECIFIED: "squash",
                      common_pb2.SQUASH: "squash", common_pb2.KEEP_ASPECT: "keep_aspect"}
_DTYPE_FROM_PROTO: dict[int, str] = {
    common_pb2.DTYPE_UNSPECIFIED: "float32", common_pb2.FLOAT32: "float32",
    common_pb2.FLOAT16: "float16"}
_RESIZE_TO_PROTO: dict[str, common_pb2.ResizeMode] = {
    "squash": common_pb2.SQUASH, "keep_aspect": common_pb2.KEEP_ASPECT,
    "shorter_crop": common_pb2.SHORTER_CROP}
_RESIZE_NAME: dict[int, str] = {common_pb2.SQUASH: "squash", common_pb2.KEEP_ASPECT: "keep_aspect",
                                common_pb2.SHORTER_CROP: "shorter_crop"}


@dataclass(frozen=True)
class PreparedInputs:
    """Network inputs a client made itself (sent as a PreparedImage): float32 (3, h, w) each -
    or float16, sent as FLOAT16 (half the bytes) - None where the options do not ask for that
    network; the decoded image's (height, width)."""

    features_input: np.ndarray | None
    classifier_input: np.ndarray | None
    original_size: tuple[int, int]


def image_request(item_id: str, data: ImageData | PreparedInputs) -> features_pb2.ExtractRequest:
    """The request for one image: an ImageInput for an encoded file, a DecodedImage for uint8
    (H, W, 3) BGR pixels (checked here: InvalidInput before anything is sent), a
    PreparedImage for :class:`PreparedInputs`."""
    if isinstance(data, PreparedInputs):
        msg = features_pb2.PreparedImage(id=item_id, original_height=data.original_size[0],
                                         original_width=data.original_size[1])
        for field, array in (("features_input", data.features_input),
                             ("classifier_input", data.classifier_input)):
            if array is not None:
                wire.fill_tensor(getattr(msg, field), array,
                                 common_pb2.FLOAT16 if array.dtype == np.float16
                                 else common_pb2.FLOAT32)
        return features_pb2.ExtractRequest(prepared=msg)
    if isinstance(data, np.ndarray):
        check_pixels(data.shape, data.dtype, DecodeLimits(max_pixels=2**62))
        return features_pb2.ExtractRequest(pixels=features_pb2.DecodedImage(
            id=item_id, pixels=wire.to_tensor(data, common_pb2.UINT8)))
    return features_pb2.ExtractRequest(image=common_pb2.ImageInput(id=item_id, data=data))


def pixels_from_proto(msg: common_pb2.Tensor, limits: DecodeLimits) -> np.ndarray:
    """A DecodedImage's pixels as a (H, W, 3) uint8 view of the message's bytes: dtype, shape,
    byte count and the pixel limit are checked before anything is allocated (InvalidInput,
    ImageTooLarge)."""
    if msg.dtype != common_pb2.UINT8:
        known = msg.dtype in common_pb2.DType.values()
        name = common_pb2.DType.Name(msg.dtype) if known else f"dtype {msg.dtype}"
        raise InvalidInput(f"decoded pixels must be UINT8, got {name}")
    check_pixels(tuple(msg.shape), np.uint8, limits)
    return wire.from_tensor(msg, as_float32=False)


def prepared_from_proto(msg: features_pb2.PreparedImage) -> PreparedInputs:
    """A PreparedImage's inputs as float32 or float16 arrays: views of the message's bytes.
    Dtype, rank and byte count are checked before anything is allocated; shapes are checked,
    and the arrays converted to what the model takes, by Extractor.adopt (a float16 input to a
    float32 model is widened exactly there; a half-IO model takes it as it is)."""
    def tensor(field: str) -> np.ndarray | None:
        if not msg.HasField(field):
            return None
        t = getattr(msg, field)
        if t.dtype not in (common_pb2.FLOAT32, common_pb2.FLOAT16, common_pb2.DTYPE_UNSPECIFIED):
            raise InvalidInput(f"prepared image: {field} must be FLOAT32 or FLOAT16")
        if len(t.shape) != 3 or any(v < 1 for v in t.shape):
            raise InvalidInput(f"prepared image: {field} must have shape (3, h, w), got "
                               f"{list(t.shape)}")
        return wire.from_tensor(t, as_float32=False)

    return PreparedInputs(tensor("features_input"), tensor("classifier_input"),
                          (int(msg.original_height), int(msg.original_width)))


def _enum_name(enum: Any, value: int) -> str:
    """What a client sent for an enum field: its name, or 'unknown N' when it has none."""
    return enum.Name(value) if value in enum.values() else f"{value} (unknown)"


def options_from_proto(msg: features_pb2.ExtractOptions) -> ExtractOptions:
    """ExtractOptions of a request; InvalidInput naming the value the client sent for a resize
    mode or wire dtype this server does not take."""
    wire_dtype = _DTYPE_FROM_PROTO.get(msg.wire_dtype)
    if wire_dtype is None:
        raise InvalidInput(f"wire_dtype {_enum_name(common_pb2.DType, msg.wire_dtype)} is not "
                           "an activation wire dtype (FLOAT32 or FLOAT16)")
    resize_mode = _RESIZE_FROM_PROTO.get(msg.resize.mode)
    if resize_mode is None:
        raise InvalidInput(f"resize mode {_enum_name(common_pb2.ResizeMode, msg.resize.mode)} "
                           "is not taken by Extract (SQUASH or KEEP_ASPECT)")
    return ExtractOptions(
        model=msg.model or DEFAULT_FEATURE_MODEL,
        layers=tuple(msg.layers) or ("conv5_4",),
        wire_dtype=wire_dtype,
        resize_mode=resize_mode,
        size=msg.resize.size or 224,
        return_probabilities=msg.return_probabilities,
        top_k=msg.top_k,
        classifier=msg.classifier or DEFAULT_CLASSIFIER,
        precision=msg.precision,
        sparse=msg.sparse,
    )


def options_to_proto(options: ExtractOptions) -> features_pb2.ExtractOptions:
    return features_pb2.ExtractOptions(
        model=options.model, layers=list(options.layers),
        wire_dtype=wire.dtype_from_name(options.wire_dtype),
        resize=common_pb2.ResizePolicy(mode=_RESIZE_TO_PROTO[options.resize_mode],
                                       size=options.size),
        return_probabilities=options.return_probabilities, top_k=options.top_k,
        classifier=options.classifier, precision=options.precision, sparse=options.sparse)


def item_error(exc: BaseException, decoding: bool = False) -> common_pb2.ItemError:
    """A per-item error; decode failures (not size limits) are INVALID_IMAGE."""
    return status.item_error(exc, decoding)


def sparse_to_proto(msg: features_pb2.SparseActivation, act: SparseActivation,
                    dtype: common_pb2.DType) -> None:
    """Fill a SparseActivation message in place (values in the wire dtype)."""
    msg.shape[:] = list(act.shape)
    msg.indptr = np.ascontiguousarray(act.indptr, "<i4").tobytes()
    msg.indices = np.ascontiguousarray(act.indices, "<u2").tobytes()
    wire.fill_tensor(msg.values, act.values, dtype)


def sparse_from_proto(msg: features_pb2.SparseActivation) -> SparseActivation:
    """A SparseActivation message as checked :class:`SparseActivation` (float32 values):
    InvalidInput when its parts do not form an activation of its shape."""
    shape = tuple(int(v) for v in msg.shape)
    if len(shape) != 3:
        raise InvalidInput(f"sparse activation: shape {list(shape)} is not (C, h, w)")
    indptr, indices = msg.indptr, msg.indices
    if len(indptr) % 4 or len(indices) % 2:
        raise InvalidInput("sparse activation: row pointers or channel numbers cut short")
    values = wire.from_tensor(msg.values)
    if values.ndim != 1:
        raise InvalidInput(f"sparse activation: values of shape {values.shape}, not (nnz,)")
    return SparseActivation(shape, np.frombuffer(indptr, "<i4"), np.frombuffer(indices, "<u2"),
                            values).check()


def result_to_proto(result: ExtractResult, options: ExtractOptions
                    ) -> features_pb2.ExtractResponse:
    dtype = wire.dtype_from_name(options.wire_dtype)
    resp = features_pb2.ExtractResponse(id=result.id)
    for layer, act in result.activations.items():
        # filled in place: building an Activation and appending it copies the bytes twice more
        msg = resp.activations.add()
        msg.layer = layer
        if isinstance(act, SparseActivation):
            sparse_to_proto(msg.sparse, act, dtype)
        else:
            wire.fill_tensor(msg.tensor, act, dtype)
    if result.probabilities is not None:
        wire.fill_tensor(resp.probabilities, result.probabilities)
    for index, name, p in result.top_k:
        resp.top_k.append(features_pb2.ClassScore(index=index, name=name, probability=p))
    h, w = result.original_size
    ih, iw = result.input_size
    resp.info.CopyFrom(common_pb2.ImageInfo(original_height=h, original_width=w,
                                            input_height=ih, input_width=iw))
    return resp


def describe_to_proto(desc: dict, config: ServerConfig, server_version: str
                      ) -> features_pb2.DescribeModelResponse:
    resp = features_pb2.DescribeModelResponse(
        execution_provider=desc["execution_provider"],
        available_providers=desc["available_providers"], server_version=server_version,
        limits=features_pb2.ServerLimits(
            max_message_bytes=config.max_message_bytes, max_pixels=config.max_pixels,
            max_batch_size=config.max_batch_size,
            max_concurrent_streams=config.max_concurrent_streams),
        precisions=desc.get("precisions", []), default_precision=desc.get("default_precision", ""),
        accepts_decoded_images=desc.get("accepts_decoded_images", False),
        accepts_prepared_images=desc.get("accepts_prepared_images", False),
        accepts_prepared_float16=desc.get("accepts_prepared_float16", False),
        half_io=desc.get("half_io", False))
    for m in desc["models"]:
        pre = m["preprocessing"]
        info = features_pb2.ModelInfo(
            name=m["name"], kind=m["kind"], weights_sha256=m["weights_sha256"],
            onnx_sha256=m["onnx_sha256"], source=m["source"], num_classes=m["num_classes"],
            class_names=m["class_names"], class_wnids=m["class_wnids"],
            precision=m.get("precision", ""), base_model=m.get("base_model", ""),
            preprocessing=features_pb2.Preprocessing(
                color_order=pre["color_order"], mean=pre["mean"], std=pre["std"],
                default_resize=common_pb2.ResizePolicy(
                    mode=_RESIZE_TO_PROTO.get(pre["resize_mode"],
                                              common_pb2.RESIZE_MODE_UNSPECIFIED),
                    size=pre["size"]),
                description=pre["description"], resize_shorter=pre["resize_shorter"]))
        for name, layer in m["layers"].items():
            info.layers.append(features_pb2.LayerInfo(
                name=name, channels=layer["channels"], stride=layer["stride"],
                shape_at_224=layer["shape_at_224"]))
        resp.models.append(info)
    return resp


def result_from_proto(resp: features_pb2.ExtractResponse, item_id: str | None = None
                      ) -> ExtractResult:
    """An ExtractResponse as an ExtractResult (activations (C, h, w) float32, or checked
    SparseActivation rows). An answer whose tensors do not decode becomes that item's error
    (InvalidInput naming the reason); the stream goes on."""
    rid = resp.id if item_id is None else item_id
    if resp.HasField("error"):
        return ExtractResult(rid, error=status.error_from_item(resp.error))
    try:
        acts: dict[str, Activation] = {
            a.layer: (sparse_from_proto(a.sparse) if a.HasField("sparse")
                      else wire.from_tensor(a.tensor))
            for a in resp.activations}
        probs = wire.from_tensor(resp.probabilities) if resp.HasField("probabilities") else None
    except InvalidInput as exc:
        return ExtractResult(rid, error=InvalidInput(f"feature server answer for {rid!r}: {exc}"))
    except Exception as exc:  # noqa: BLE001 - a malformed answer fails its item, not the stream
        return ExtractResult(rid, error=InvalidInput(
            f"feature server answer for {rid!r} does not decode: {type(exc).__name__}: "
            f"{str(exc)[:200]}"))
    top = [(s.index, s.name, float(s.probability)) for s in resp.top_k]
    return ExtractResult(rid, acts, probs, top,
                         (resp.info.original_height, resp.info.original_width),
                         (resp.info.input_height, resp.info.input_width))


def _f32(values: Iterable[float]) -> list[float]:
    # float32 on the wire: back to the short decimal the metadata holds (103.939, not ...03)
    return [float(f"{v:.7g}") for v in values]


def describe_from_proto(resp: features_pb2.DescribeModelResponse) -> dict:
    """A DescribeModelResponse as the dict ``Extractor.describe()`` returns (plus server
    version and limits)."""
    models = []
    for m in resp.models:
        pre = m.preprocessing
        mode = _RESIZE_NAME.get(pre.default_resize.mode, "")
        if not mode:  # a server that predates SHORTER_CROP left the mode unspecified
            mode = "shorter_crop" if pre.resize_shorter > 0 else "squash"
        models.append({
            "name": m.name, "kind": m.kind, "source": m.source,
            "weights_sha256": m.weights_sha256, "onnx_sha256": m.onnx_sha256,
            "layers": {layer.name: {"channels": layer.channels, "stride": layer.stride,
                                    "shape_at_224": list(layer.shape_at_224)}
                       for layer in m.layers},
            "preprocessing": {"color_order": pre.color_order, "mean": _f32(pre.mean),
                              "std": _f32(pre.std), "resize_mode": mode,
                              "size": pre.default_resize.size,
                              "resize_shorter": pre.resize_shorter,
                              "description": pre.description},
            "num_classes": m.num_classes, "class_names": list(m.class_names),
            "class_wnids": list(m.class_wnids),
            "precision": m.precision, "base_model": m.base_model or m.name,
        })
    return {"models": models, "execution_provider": resp.execution_provider,
            "available_providers": list(resp.available_providers),
            "server_version": resp.server_version,
            "precisions": list(resp.precisions), "default_precision": resp.default_precision,
            "accepts_decoded_images": resp.accepts_decoded_images,
            "accepts_prepared_images": resp.accepts_prepared_images,
            "accepts_prepared_float16": resp.accepts_prepared_float16,
            "half_io": resp.half_io,
            "limits": {"max_message_bytes": resp.limits.max_message_bytes,
                       "max_pixels": resp.limits.max_pixels,
                       "max_batch_size": resp.limits.max_batch_size,
                       "max_concurrent_streams": resp.limits.max_concurrent_streams}}

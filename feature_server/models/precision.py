"""Reduced-precision variants of the VGG-19 feature model: int8 (static QDQ) and fp16.

Both are written directly from the fp32 conv weights with ``onnx.helper`` (no calibration run at
build time, so the build takes about a second):

* ``vgg19_int8``: the QDQ format that ONNX Runtime's own quantization tool writes for static
  quantization (``quantize_static(..., QuantFormat.QDQ, per_channel=True)``): every conv input
  goes through QuantizeLinear/DequantizeLinear with a uint8 activation scale; the weights are
  int8, symmetric, one scale per output channel; the bias is int32 with scale
  ``input_scale * weight_scale``. ONNX Runtime fuses these into integer convolutions (VNNI/AMX
  on CPUs that have them). The activation ranges are NOT computed at build time: they are the
  committed numbers in ``vgg19_int8_ranges.json`` (written by
  ``python -m feature_server.models.calibrate`` from real photos), so the build depends on no
  file outside the package. The network input range is exact (caffe preprocessing of 0..255
  pixels), the ReLU outputs are unsigned (zero point 0).
* ``vgg19_fp16``: weights and compute in float16 (the CUDA/TensorRT fast path); the graph keeps
  float32 input and float32 outputs (Cast nodes at both ends), so the server and the wire are
  unchanged. On a CPU without fp16 kernels ONNX Runtime computes it in float32 from the
  fp16-rounded weights.

Every variant is its own model in the registry (``<base>_<precision>``, e.g. ``vgg19_int8``),
with its own ONNX file and sha256; ``ModelSpec.extra`` holds ``precision`` and ``base_model``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "int8", "fp16")
#: what a user may ask for: ``auto`` = the source's default precision (int8 on CPU, fp16 on
#: CUDA, when that variant is built; else the model as built), or one of PRECISIONS
PRECISION_CHOICES: tuple[str, ...] = ("auto", *PRECISIONS)
RANGES_FILE = Path(__file__).with_name("vgg19_int8_ranges.json")
#: caffe preprocessing of 0..255 pixels: BGR minus the BGR mean -> this exact input range.
_CAFFE_MEAN = (103.939, 116.779, 123.68)


def variant_name(base: str, precision: str) -> str:
    """Registry name of ``base`` at ``precision`` ('fp32' is the base model itself)."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; one of {PRECISIONS}")
    return base if precision == "fp32" else f"{base}_{precision}"


def load_ranges(path: Path | None = None) -> dict[str, Any]:
    """The committed calibration: ``{"layers": {conv name: max}, ...}`` (see calibrate.py)."""
    path = RANGES_FILE if path is None else path
    data = json.loads(path.read_text())
    if not isinstance(data.get("layers"), dict) or not data["layers"]:
        raise ValueError(f"{path}: no per-layer activation ranges")
    return data


def _uint8_qparams(lo: float, hi: float) -> tuple[float, int]:
    """Scale and zero point of an asymmetric uint8 range that contains 0 (as ORT's tool)."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = (hi - lo) / 255.0 if hi > lo else 1.0
    zero = int(round(-lo / scale))
    return float(scale), int(min(max(zero, 0), 255))


#: Blocks whose conv layers the int8 model exposes as outputs. Each output needs a
#: DequantizeLinear and a layout transpose that ONNX Runtime runs whether or not the output is
#: asked for (all 16 cost ~15% throughput); DFF uses block 5 (conv5_4 by default).
INT8_OUTPUT_BLOCKS = (4, 5)


def vgg19_int8_onnx(weights: dict[str, tuple[np.ndarray, np.ndarray]],
                    ranges: dict[str, float], blocks: tuple[tuple[int, int, int], ...],
                    opset: int = 17) -> Any:
    """VGG-19 conv stack in QDQ int8; the convs (after ReLU) of :data:`INT8_OUTPUT_BLOCKS` are
    float32 graph outputs."""
    from onnx import TensorProto, helper, numpy_helper

    nodes: list[Any] = []
    inits: list[Any] = []
    outputs: list[Any] = []

    def const(name: str, array: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(array, name))
        return name

    def qdq(x: str, scale: float, zero: int, tag: str) -> str:
        """x -> QuantizeLinear -> DequantizeLinear (uint8, per tensor); the float name out."""
        s = const(f"{tag}.scale", np.array(scale, np.float32))
        z = const(f"{tag}.zero_point", np.array(zero, np.uint8))
        nodes.append(helper.make_node("QuantizeLinear", [x, s, z], [f"{tag}.q"],
                                      name=f"{tag}.quantize"))
        nodes.append(helper.make_node("DequantizeLinear", [f"{tag}.q", s, z], [f"{tag}.dq"],
                                      name=f"{tag}.dequantize"))
        return f"{tag}.dq"

    lo = -max(_CAFFE_MEAN)
    hi = 255.0 - min(_CAFFE_MEAN)
    in_scale, in_zero = _uint8_qparams(lo, hi)
    x = qdq("input", in_scale, in_zero, "input")
    x_scale = in_scale  # the scale of the current conv's (quantized) input
    for b, n, channels in blocks:
        for i in range(1, n + 1):
            name = f"conv{b}_{i}"
            w, bias = weights[name]
            w = np.asarray(w, np.float32)
            amax = np.abs(w).reshape(w.shape[0], -1).max(axis=1)
            w_scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
            wq = np.clip(np.round(w / w_scale[:, None, None, None]), -127, 127).astype(np.int8)
            b_scale = (np.float32(x_scale) * w_scale).astype(np.float32)
            bq = np.round(np.asarray(bias, np.float64) / b_scale).astype(np.int32)
            nodes.append(helper.make_node(
                "DequantizeLinear", [const(f"{name}.weight_q", wq),
                                     const(f"{name}.weight_scale", w_scale),
                                     const(f"{name}.weight_zero", np.zeros(len(w_scale), np.int8))],
                [f"{name}.weight"], name=f"{name}.weight_dq", axis=0))
            nodes.append(helper.make_node(
                "DequantizeLinear", [const(f"{name}.bias_q", bq),
                                     const(f"{name}.bias_scale", b_scale),
                                     const(f"{name}.bias_zero", np.zeros(len(b_scale), np.int32))],
                [f"{name}.bias"], name=f"{name}.bias_dq", axis=0))
            nodes.append(helper.make_node("Conv", [x, f"{name}.weight", f"{name}.bias"],
                                          [f"{name}_pre"], name=f"{name}_conv",
                                          kernel_shape=[3, 3], pads=[1, 1, 1, 1]))
            # No Relu node: quantizing to uint8 with zero point 0 saturates negatives at 0,
            # which is the ReLU (what ONNX Runtime's ReluQuantFusion would do).
            out_scale, _ = _uint8_qparams(0.0, float(ranges[name]))
            s = const(f"{name}.scale", np.array(out_scale, np.float32))
            z = const(f"{name}.zero_point", np.array(0, np.uint8))
            nodes.append(helper.make_node("QuantizeLinear", [f"{name}_pre", s, z],
                                          [f"{name}.q"], name=f"{name}.quantize"))
            nodes.append(helper.make_node("DequantizeLinear", [f"{name}.q", s, z],
                                          [f"{name}.dq"], name=f"{name}.dequantize"))
            if b in INT8_OUTPUT_BLOCKS:
                # a dedicated DequantizeLinear for the graph output (ORT's QDQ pattern)
                nodes.append(helper.make_node("DequantizeLinear", [f"{name}.q", s, z], [name],
                                              name=f"{name}.dequantize_out"))
                outputs.append(helper.make_tensor_value_info(
                    name, TensorProto.FLOAT, ["batch", channels, f"h{b}", f"w{b}"]))
            x, x_scale, last_qparams = f"{name}.dq", out_scale, (s, z)
        if b == blocks[-1][0]:
            break  # the pool after conv5_4 feeds nothing
        nodes.append(helper.make_node("MaxPool", [x], [f"pool{b}"], name=f"pool{b}",
                                      kernel_shape=[2, 2], strides=[2, 2]))
        s, z = last_qparams  # a max pool keeps the scale of its input
        nodes.append(helper.make_node("QuantizeLinear", [f"pool{b}", s, z], [f"pool{b}.q"],
                                      name=f"pool{b}.quantize"))
        nodes.append(helper.make_node("DequantizeLinear", [f"pool{b}.q", s, z],
                                      [f"pool{b}.dq"], name=f"pool{b}.dequantize"))
        x = f"pool{b}.dq"
    return _vgg_model("vgg19_int8", nodes, outputs, inits, opset)


def vgg19_fp16_onnx(weights: dict[str, tuple[np.ndarray, np.ndarray]],
                    blocks: tuple[tuple[int, int, int], ...], opset: int = 17) -> Any:
    """VGG-19 conv stack in float16 with float32 input and float32 outputs."""
    from onnx import TensorProto, helper, numpy_helper

    nodes: list[Any] = [helper.make_node("Cast", ["input"], ["input.fp16"], name="input_cast",
                                         to=TensorProto.FLOAT16)]
    inits: list[Any] = []
    outputs: list[Any] = []
    x = "input.fp16"
    for b, n, channels in blocks:
        for i in range(1, n + 1):
            name = f"conv{b}_{i}"
            w, bias = weights[name]
            inits += [numpy_helper.from_array(np.asarray(w, np.float16), f"{name}.weight"),
                      numpy_helper.from_array(np.asarray(bias, np.float16), f"{name}.bias")]
            nodes.append(helper.make_node("Conv", [x, f"{name}.weight", f"{name}.bias"],
                                          [f"{name}_pre"], name=f"{name}_conv",
                                          kernel_shape=[3, 3], pads=[1, 1, 1, 1]))
            nodes.append(helper.make_node("Relu", [f"{name}_pre"], [f"{name}.fp16"],
                                          name=f"{name}_relu"))
            nodes.append(helper.make_node("Cast", [f"{name}.fp16"], [name],
                                          name=f"{name}_cast", to=TensorProto.FLOAT))
            outputs.append(helper.make_tensor_value_info(
                name, TensorProto.FLOAT, ["batch", channels, f"h{b}", f"w{b}"]))
            x = f"{name}.fp16"
        if b == blocks[-1][0]:
            break
        nodes.append(helper.make_node("MaxPool", [x], [f"pool{b}"], name=f"pool{b}",
                                      kernel_shape=[2, 2], strides=[2, 2]))
        x = f"pool{b}"
    return _vgg_model("vgg19_fp16", nodes, outputs, inits, opset)


def _vgg_model(name: str, nodes: list[Any], outputs: list[Any], inits: list[Any],
               opset: int) -> Any:
    """The checked ONNX model of a VGG-19 variant graph (float32 NCHW input, dynamic size)."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(nodes, name, [helper.make_tensor_value_info(
        "input", TensorProto.FLOAT, ["batch", 3, "height", "width"])], outputs,
        initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                              producer_name="dff-concepts")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model

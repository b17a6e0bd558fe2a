"""Bring your own model: `dff models import` / `export-torch` register ONNX / torch CNNs, the
negative-value policy is applied in the graph and recorded, and discovery, extraction, the
feature server, the API, explain and the report run on them (issue 10 part 3)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest

import dff
from exporter.cli import main
from feature_server.models.importer import torch_to_onnx

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")

NETS = Path(__file__).parent / "nets"


@pytest.fixture(scope="module")
def nets():
    import sys

    sys.path.insert(0, str(NETS))
    import dff_test_nets

    yield dff_test_nets
    sys.path.remove(str(NETS))


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """A DFF_HOME with the built-in models linked in (so nothing is rebuilt) and room for
    imported ones."""
    from feature_server.models.registry import load_registry

    registry = load_registry()
    if not {"vgg19", "efficientnet_lite0"} <= set(registry):
        pytest.skip("models not built (run `dff models build`)")
    root = tmp_path_factory.mktemp("dff_home")
    (root / "models").mkdir()
    for spec in registry.values():
        if spec.name in ("vgg19", "efficientnet_lite0"):
            (root / "models" / spec.onnx_path.name).symlink_to(spec.onnx_path)
            shutil.copy(spec.onnx_path.with_suffix(".json"), root / "models")
    return root


@pytest.fixture()
def dff_home(home, monkeypatch):
    monkeypatch.setenv("DFF_HOME", str(home))
    return home


def _export_small(nets, path: Path) -> str:
    """The test's own small CNN as ONNX (input 'image', output 'logits'); returns the name of
    its last conv's output tensor (no ReLU after it)."""
    torch_to_onnx(nets.small_cnn(), path, 64, input_names=["image"], output_names=["logits"],
                  dynamic_axes={"image": {0: "b", 2: "h", 3: "w"}, "logits": {0: "b"}})
    graph = onnx.load(str(path)).graph
    return [n for n in graph.node if n.op_type == "Conv"][-1].output[0]


def _photo(shared_data) -> Path:
    return sorted((shared_data / "gymnast").glob("*.jpg"))[0]


def _torch_input(photo: Path, spec) -> np.ndarray:
    from feature_server.images import decode_image, preprocess

    return preprocess(decode_image(photo.read_bytes()), spec.preprocessing, "squash", 224)


def test_import_onnx_known_answers(nets, home, shared_data, tmp_path, capsys):
    from feature_server.extractor import ExtractOptions, Extractor
    from feature_server.models.registry import load_registry, sha256_file, verify

    path = tmp_path / "small.onnx"
    conv = _export_small(nets, path)
    common = ["--layers", f"feat={conv}", "--preprocessing", "raw", "--home", str(home)]
    assert main(["models", "import", str(path), "--name", "small", *common,
                 "--classifier-output", "logits"]) == 0
    assert main(["models", "import", str(path), "--name", "small_shift", *common,
                 "--negative", "shift"]) == 0
    out = capsys.readouterr().out
    assert "feat=clamp" in out and "feat=shift" in out
    reg = load_registry(home)
    spec, shift, cls = reg["small"], reg["small_shift"], reg["small_classifier"]
    assert spec.kind == "features" and cls.kind == "classifier"
    assert spec.weights_sha256 == sha256_file(path) and verify(spec) and verify(shift)
    assert spec.layers == {"feat": (16, 2)} and spec.input_name == "image"
    assert spec.extra["negative"] == {"feat": "clamp"}
    assert shift.extra["negative"] == {"feat": "shift"}
    assert "feat=clamp" in spec.source

    photo = _photo(shared_data)
    x = _torch_input(photo, spec)
    net = nets.small_cnn()
    with torch.no_grad():
        y = net.features(torch.from_numpy(x[None]))[0].numpy()
        probs = torch.softmax(net(torch.from_numpy(x[None])), 1)[0].numpy()
    assert y.min() < 0  # the layer really has negative values
    ext = Extractor({n: reg[n] for n in ("small", "small_shift", "small_classifier")})
    (res,) = ext.extract([("p", photo.read_bytes())],
                         ExtractOptions(model="small", layers=("feat",), classifier="small_"
                                        "classifier", return_probabilities=True))
    np.testing.assert_allclose(res.activations["feat"], np.maximum(y, 0), atol=1e-4)
    np.testing.assert_allclose(res.probabilities, probs, atol=1e-5)
    (res,) = ext.extract([("p", photo.read_bytes())],
                         ExtractOptions(model="small_shift", layers=("feat",)))
    np.testing.assert_allclose(res.activations["feat"],
                               y - y.min(axis=(1, 2), keepdims=True), atol=1e-4)


def test_import_refuses_what_it_cannot_use(nets, home, tmp_path, capsys):
    path = tmp_path / "small.onnx"
    conv = _export_small(nets, path)
    base = ["models", "import", str(path), "--home", str(home)]
    assert main([*base, "--name", "x1", "--layers", "nope"]) == 2
    assert "candidates" in capsys.readouterr().err
    assert main([*base, "--name", "vgg19", "--layers", conv]) == 2
    assert "built-in" in capsys.readouterr().err
    assert main([*base, "--name", "x2", "--layers", conv, "--preprocessing", "{bad"]) == 2
    assert main([*base, "--name", "x3", "--layers", conv]) == 0
    assert main([*base, "--name", "x3", "--layers", conv]) == 2
    assert "already registered" in capsys.readouterr().err
    fixed = tmp_path / "fixed.onnx"
    torch_to_onnx(nets.small_cnn(), fixed, 64, input_names=["image"])
    assert main(["models", "import", str(fixed), "--home", str(home), "--name", "x4",
                 "--layers", conv]) == 2
    assert "fixed batch size" in capsys.readouterr().err
    pre = tmp_path / "pre.json"
    pre.write_text(json.dumps({"color_order": "BGR", "mean": [1, 2, 3], "std": [4, 5, 6]}))
    assert main([*base, "--name", "x5", "--layers", conv, "--preprocessing", str(pre)]) == 0


@pytest.mark.slow
def test_resnet_block_end_to_end(nets, dff_home, shared_data, tmp_path, monkeypatch, capsys):
    """A ResNet-style network converted from torch, a non-VGG layer name, discovered with the
    API and the CLI, served by a feature server, explained, and recorded in provenance."""
    from feature_server.models.importer import state_dict_sha256
    from feature_server.models.registry import load_registry

    monkeypatch.syspath_prepend(str(NETS))
    assert main(["models", "export-torch", "dff_test_nets:tiny_resnet", "--name",
                 "tiny_resnet", "--layers", "stage2,stage2.bn2", "--classifier-output",
                 "logits"]) == 0
    spec = load_registry(dff_home)["tiny_resnet"]
    assert spec.extra["negative"] == {"stage2": "none", "stage2.bn2": "clamp"}
    assert spec.weights_sha256 == state_dict_sha256(nets.tiny_resnet())
    assert spec.layers["stage2"] == (32, 8)

    gymnast = shared_data / "gymnast"
    cs = dff.discover(gymnast, k=2, model="tiny_resnet", layer="stage2.bn2",
                      prediction_filter=False, progress=False)
    assert cs.k == 2 and cs.n_images == 6 and cs.bases.shape == (2, 32)
    prov = cs.provenance
    assert (prov["model"], prov["layer"]) == ("tiny_resnet", "stage2.bn2")
    assert prov["weights_sha256"] == spec.weights_sha256
    assert "stage2.bn2=clamp" in prov["model_source"]
    assert cs.heatmaps[0].shape == (2, 28, 28)
    ex = cs.explain(gymnast / cs.image_ids[0], progress=False)
    assert ex[0].error is None and ex[0].heatmaps.shape == (2, 28, 28)

    from feature_server.extractor import Extractor
    from feature_server.service import ServerConfig, start_server

    server = start_server(ServerConfig(host="127.0.0.1", port=0), Extractor.from_cache())
    try:
        remote = dff.discover(gymnast, k=2, model="tiny_resnet", layer="stage2.bn2",
                              prediction_filter=False, progress=False,
                              feature_server=f"127.0.0.1:{server.port}")
    finally:
        server.stop(0)
    np.testing.assert_allclose(remote.bases, cs.bases, rtol=1e-4, atol=1e-6)
    assert remote.provenance["model_source"] == prov["model_source"]

    out = tmp_path / "out"
    assert main(["discover", str(gymnast), "--out", str(out), "--model", "tiny_resnet",
                 "--layer", "stage2", "--k", "2", "--no-prediction-filter",
                 "--no-progress"]) == 0
    with h5py.File(out / "gymnast" / "concepts.h5") as f:
        stored = json.loads(f.attrs["provenance_json"])
    assert (stored["model"], stored["layer"]) == ("tiny_resnet", "stage2")
    assert "stage2=none" in stored["model_source"]
    assert "tiny_resnet" in (out / "gymnast" / "index.html").read_text()
    explained = tmp_path / "explained"
    assert main(["explain", str(gymnast / cs.image_ids[1]), "--concepts",
                 str(out / "gymnast" / "concepts.h5"), "--out", str(explained),
                 "--no-progress"]) == 0
    record = json.loads((explained / "explanations.json").read_text())
    assert record["k"] == 2 and len(record["images"]) == 1 and not record["errors"]
    h5 = tmp_path / "features.h5"
    assert main(["extract", str(gymnast / cs.image_ids[0]), "--out", str(h5), "--model",
                 "tiny_resnet", "--layers", "stage2,stage2.bn2"]) == 0
    assert "1 of 1 images" in capsys.readouterr().out
    with h5py.File(h5) as f:
        names = []
        f.visit(names.append)
    assert any("stage2.bn2" in n for n in names), names


def _conv_graph(path: Path, opset: int, relu: bool) -> None:
    """input x (N, 3, H, W) -> 1x1 conv to 2 channels: [R, 0.5 - R] (-> ReLU when relu)."""
    from onnx import TensorProto, helper, numpy_helper

    w = np.zeros((2, 3, 1, 1), np.float32)
    w[0, 0], w[1, 0] = 1.0, -1.0
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["conv"])]
    if relu:
        nodes.append(helper.make_node("Relu", ["conv"], ["act"]))
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                    ["n", 3, "h", "w"])],
        [helper.make_tensor_value_info("act" if relu else "conv", TensorProto.FLOAT, None)],
        initializer=[numpy_helper.from_array(w, "w"),
                     numpy_helper.from_array(np.array([0.0, 0.5], np.float32), "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    path.write_bytes(model.SerializeToString())


@pytest.mark.parametrize("opset", [13, 18])
@pytest.mark.parametrize("policy", ["clamp", "shift", "relu"])
def test_negative_policy_known_answers(tmp_path, opset, policy):
    import onnxruntime as ort

    from feature_server.models.importer import import_onnx

    src = tmp_path / "g.onnx"
    _conv_graph(src, opset, relu=policy == "relu")
    layer = "act" if policy == "relu" else "conv"
    (spec,) = import_onnx(src, "g", f"feat={layer}", preprocessing="raw", home=tmp_path,
                          negative="shift" if policy == "shift" else "clamp")
    assert spec.extra["negative"] == {"feat": "none" if policy == "relu" else policy}
    x = np.random.default_rng(3).normal(size=(2, 3, 5, 7)).astype(np.float32)
    (got,) = ort.InferenceSession(str(spec.onnx_path)).run(["feat"], {"x": x})
    y = np.stack([x[:, 0], 0.5 - x[:, 0]], axis=1)
    want = {"clamp": np.maximum(y, 0), "relu": np.maximum(y, 0),
            "shift": y - y.min(axis=(2, 3), keepdims=True)}[policy]
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert spec.layers == {"feat": (2, 1)}


@pytest.mark.slow
def test_plain_sequential_layers_and_weights_the_set_was_made_with(nets, dff_home,
                                                                   shared_data, tmp_path):
    """An nn.Sequential's all-digit submodule names are layers like any other; explaining
    with a model re-registered under the same name but other weights is refused (its channels
    are not what the bases describe), and so is the set's file through the CLI."""
    from dff_protos.errors import InvalidInput

    from feature_server.models.importer import export_torch, state_dict_sha256

    (spec,) = export_torch("dff_test_nets:plain_sequential", "plainseq", "1")
    assert spec.layers["1"] == (8, 4)
    gymnast = shared_data / "gymnast"
    cs = dff.discover(gymnast, k=2, model="plainseq", layer="1", prediction_filter=False,
                      progress=False, bootstrap=0)
    assert cs.provenance["weights_sha256"] == state_dict_sha256(nets.plain_sequential())
    first = gymnast / cs.image_ids[0]
    assert cs.explain(first, progress=False)[0].error is None
    saved = cs.save(tmp_path / "plainseq.h5")

    export_torch("dff_test_nets:other_plain_sequential", "plainseq", "1", force=True)
    with pytest.raises(InvalidInput, match="weights") as err:
        cs.explain(first, progress=False)
    assert cs.provenance["weights_sha256"][:16] in str(err.value)
    assert main(["explain", str(first), "--concepts", str(saved), "--out",
                 str(tmp_path / "explained"), "--no-progress"]) == 2


@pytest.mark.slow
def test_dead_and_empty_layers_are_refused_by_name(nets, dff_home, shared_data):
    from dff_protos.errors import InvalidInput

    from feature_server.models.importer import export_torch

    with pytest.raises(InvalidInput, match="'empty' has shape .*no values"):
        export_torch("dff_test_nets:dead_layer", "emptytap", "empty")
    export_torch("dff_test_nets:dead_layer", "deadnet", "relu", negative="clamp")
    with pytest.raises(InvalidInput, match="'relu' of deadnet is zero everywhere"):
        dff.discover(shared_data / "gymnast", k=2, model="deadnet", layer="relu",
                     prediction_filter=False, progress=False, bootstrap=0)


def test_a_damaged_model_file_is_data_loss_naming_it(tmp_path):
    """A cached model truncated or overwritten after it was registered: every request for it
    gets DataLoss naming the file and the fix, not protobuf's parser error."""
    from dff_protos.errors import DataLoss

    from feature_server.extractor import ExtractOptions, Extractor
    from feature_server.models.importer import import_onnx
    from feature_server.models.registry import load_registry

    src = tmp_path / "g.onnx"
    _conv_graph(src, 13, relu=True)
    (spec,) = import_onnx(src, "g", "feat=act", preprocessing="raw", home=tmp_path)
    data = spec.onnx_path.read_bytes()
    spec.onnx_path.write_bytes(data[: len(data) // 2])
    ok, png = cv2.imencode(".png", np.full((40, 40, 3), 90, np.uint8))
    options = ExtractOptions(model="g", layers=("feat",))
    try:  # the extractor makes the sessions it will need up front
        extractor = Extractor(load_registry(tmp_path))
        results = list(extractor.extract([("a.png", png.tobytes())], options))
    except DataLoss as exc:
        message = str(exc)
    else:
        assert len(results) == 1 and isinstance(results[0].error, DataLoss)
        message = str(results[0].error)
    assert str(spec.onnx_path) in message and "dff models build" in message

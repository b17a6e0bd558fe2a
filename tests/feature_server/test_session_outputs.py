"""A request for some conv layers runs a session over the graph cut to those layers: same
activations as the whole graph, fewer nodes, one session per distinct set of layers."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from dff_protos.errors import InvalidInput

from feature_server.extractor import ExtractOptions, Extractor
from feature_server.models.build import with_outputs


def test_with_outputs_keeps_only_what_the_outputs_need(registry):
    model = onnx.load(str(registry["vgg19_int8"].onnx_path))
    cut = with_outputs(model, ["conv4_1"])
    assert [o.name for o in cut.graph.output] == ["conv4_1"]
    assert 0 < len(cut.graph.node) < len(model.graph.node)
    assert len(cut.graph.initializer) < len(model.graph.initializer)
    onnx.checker.check_model(cut)
    assert len(model.graph.output) > 1  # the original is not touched
    with pytest.raises(InvalidInput, match="no output"):
        with_outputs(model, ["conv9_9"])


def test_cut_sessions_give_the_whole_graph_activations(registry):
    import onnxruntime as ort

    ex = Extractor(registry, batch_size=2, precisions=("int8",))
    x = np.random.default_rng(0).uniform(-100, 100, (2, 3, 64, 64)).astype(np.float32)
    whole = ort.InferenceSession(str(registry["vgg19_int8"].onnx_path),
                                 providers=["CPUExecutionProvider"])
    for layers in (["conv5_4"], ["conv4_1", "conv5_4"]):
        got = ex.run("vgg19_int8", x, layers)
        want = whole.run(layers, {"input": x})
        for g, w in zip(got, want, strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-4)
    keys = {key for key in ex._sessions if key[0] == "vgg19_int8"}
    assert keys == {("vgg19_int8", frozenset({"conv5_4"})),
                    ("vgg19_int8", frozenset({"conv4_1", "conv5_4"}))}


def test_default_session_is_cut_at_the_default_layer(registry):
    ex = Extractor(registry, batch_size=2, precisions=("int8",))
    assert ("vgg19_int8", frozenset(ExtractOptions().layers)) in ex._sessions
    session = ex._sessions[("vgg19_int8", frozenset(ExtractOptions().layers))]
    assert [o.name for o in session.get_outputs()] == list(ExtractOptions().layers)


def test_cut_sessions_are_bounded_per_model(registry):
    """A client naming every combination of layers cannot make a session (and a copy of the
    weights) per combination: past MAX_CUT_SESSIONS the whole graph serves the request."""
    from feature_server import extractor as extractor_module

    ex = Extractor(registry, batch_size=2, precisions=("int8",))
    layers = list(registry["vgg19_int8"].layers)
    x = np.random.default_rng(1).uniform(-100, 100, (1, 3, 32, 32)).astype(np.float32)
    for i in range(len(layers)):
        got = ex.run("vgg19_int8", x, [layers[i]])[0]
        assert got.shape[:2] == (1, registry["vgg19_int8"].layers[layers[i]][0])
    cut = [w for n, w in ex._sessions if n == "vgg19_int8" and w]
    assert len(cut) == extractor_module.MAX_CUT_SESSIONS
    assert ("vgg19_int8", frozenset()) in ex._sessions  # the whole graph took the rest


def test_graphs_with_subgraphs_are_not_cut_and_still_served(registry, tmp_path):
    """Control flow reads outer values that node inputs do not list, so such a graph is not
    cut: requests run on the whole graph, with the same activations."""
    import dataclasses

    from onnx import TensorProto, helper

    model = onnx.load(str(registry["vgg19_int8"].onnx_path))
    branch = helper.make_graph([helper.make_node("Identity", ["conv5_4"], ["b"])], "branch",
                               [], [helper.make_tensor_value_info("b", TensorProto.FLOAT, None)])
    flag = helper.make_tensor("flag", TensorProto.BOOL, [], [True])
    model.graph.initializer.append(flag)
    model.graph.node.append(helper.make_node("If", ["flag"], ["extra"], then_branch=branch,
                                             else_branch=branch))
    model.graph.output.append(helper.make_tensor_value_info("extra", TensorProto.FLOAT, None))
    with pytest.raises(ValueError, match="subgraphs"):
        with_outputs(model, ["conv5_4"])
    path = tmp_path / "with_if.onnx"
    onnx.save(model, str(path))
    spec = dataclasses.replace(registry["vgg19_int8"], onnx_path=path)
    ex = Extractor({**registry, "vgg19_int8": spec}, batch_size=1, precisions=("int8",))
    x = np.random.default_rng(2).uniform(-100, 100, (1, 3, 32, 32)).astype(np.float32)
    got = ex.run("vgg19_int8", x, ["conv5_4"])[0]
    plain = Extractor(registry, batch_size=1, precisions=("int8",))
    np.testing.assert_allclose(got, plain.run("vgg19_int8", x, ["conv5_4"])[0],
                               rtol=1e-5, atol=1e-4)
    assert "vgg19_int8" in ex._uncut
    assert [w for n, w in ex._sessions if n == "vgg19_int8"] == [frozenset()]


def test_default_batch_follows_the_provider(registry):
    from feature_server import extractor as extractor_module

    ex = Extractor(registry, precisions=("int8",))
    assert ex.execution_provider == "CPUExecutionProvider"
    assert ex.batch_size == extractor_module.CPU_BATCH == 8
    assert Extractor(registry, batch_size=3, precisions=("int8",)).batch_size == 3
    assert extractor_module.GPU_BATCH > extractor_module.CPU_BATCH


def test_server_batch_defaults_to_the_extractor_batch(registry):
    from feature_server.service import ServerConfig, start_server

    ex = Extractor(registry, precisions=("int8",))
    running = start_server(ServerConfig(host="127.0.0.1", port=0), ex)
    try:
        assert running.batcher.max_batch_size == ex.batch_size == 8
        assert running.config.max_batch_size == 8  # what DescribeModel reports
    finally:
        running.stop(grace=0)

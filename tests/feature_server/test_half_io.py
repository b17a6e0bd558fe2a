"""Half IO: the fp16 model taking its input and giving its activations in float16 (the default on
a GPU, DFF_HALF_IO=0/1 or Extractor(half_io=...) to choose).

The graph rewrite (models.build.with_half_io) drops the input Cast and the output Casts and
nothing else; the values are the same as the float32-IO model's: on the CPU (whose fp16 model
computes in float32) the half outputs are exactly the float32 ones rounded to float16, for
float16 inputs; on CUDA (the gpu test) they are the same, bit for bit. Float16 activations go
to dense and sparse answers, float32 and float16 wires, in process and served, without loss."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from dff_protos.errors import InvalidInput
from dff_protos.v1 import common_pb2
from onnx import TensorProto, helper

import feature_server.kernels as kernels_module
from feature_server.client import FeatureClient
from feature_server.extractor import ExtractOptions, Extractor, round_wire
from feature_server.models.build import with_half_io, with_outputs
from feature_server.service import ServerConfig, start_server
from feature_server.sparse import from_dense

DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
ANT = DATA / "imagenet_data" / "ant"
FP16 = ExtractOptions(model="vgg19_fp16", precision="fp16")


def photos(n: int) -> list[tuple[str, bytes]]:
    files = sorted(p for p in ANT.iterdir() if p.suffix.lower() in (".jpg", ".jpeg"))[:n]
    return [(p.name, p.read_bytes()) for p in files]


@pytest.fixture(scope="module")
def half(registry) -> Extractor:
    return Extractor(registry, precisions=("fp16",), batch_size=4, half_io=True)


@pytest.fixture(scope="module")
def full(registry) -> Extractor:
    return Extractor(registry, precisions=("fp16",), batch_size=4, half_io=False)


def test_the_rewrite_drops_the_casts_and_nothing_else(registry):
    model = onnx.load(str(registry["vgg19_fp16"].onnx_path))
    for graph_model in (model, with_outputs(model, ["conv5_4"]),
                        with_outputs(model, ["conv3_1", "conv5_4"])):
        halved = with_half_io(graph_model)
        assert halved is not None
        g, h = graph_model.graph, halved.graph
        assert h.input[0].name == "input"
        assert h.input[0].type.tensor_type.elem_type == TensorProto.FLOAT16
        assert [o.name for o in h.output] == [o.name for o in g.output]
        assert {o.type.tensor_type.elem_type for o in h.output} == {TensorProto.FLOAT16}
        assert len(h.node) == len(g.node) - 1 - len(g.output)
        assert sum(n.op_type == "Cast" for n in h.node) == 0
        assert ([n.op_type for n in h.node if n.op_type != "Cast"]
                == [n.op_type for n in g.node if n.op_type != "Cast"])
        assert len(h.initializer) == len(g.initializer)
    # the input model is left as it was
    assert model.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT


def test_graphs_of_another_form_are_left_alone(registry):
    # fp32 and int8 models have no Casts at their ends
    for name in ("vgg19", "vgg19_int8"):
        assert with_half_io(onnx.load(str(registry[name].onnx_path))) is None

    def tiny(extra_reader: bool = False, output_cast: bool = True):
        nodes = [helper.make_node("Cast", ["x"], ["x16"], to=TensorProto.FLOAT16),
                 helper.make_node("Relu", ["x16"], ["r16"])]
        if output_cast:
            nodes.append(helper.make_node("Cast", ["r16"], ["y"], to=TensorProto.FLOAT))
        else:
            nodes.append(helper.make_node("Cast", ["r16"], ["y"], to=TensorProto.DOUBLE))
        if extra_reader:  # the float32 input is also read as it is
            nodes.append(helper.make_node("Relu", ["x"], ["z"]))
        outputs = [helper.make_tensor_value_info(
            "y", TensorProto.FLOAT if output_cast else TensorProto.DOUBLE, [2])]
        if extra_reader:
            outputs.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, [2]))
        graph = helper.make_graph(nodes, "t", [helper.make_tensor_value_info(
            "x", TensorProto.FLOAT, [2])], outputs)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])

    ok = with_half_io(tiny())
    assert ok is not None and [n.op_type for n in ok.graph.node] == ["Relu"]
    assert list(ok.graph.node[0].input) == ["x"] and list(ok.graph.node[0].output) == ["y"]
    assert with_half_io(tiny(extra_reader=True)) is None
    assert with_half_io(tiny(output_cast=False)) is None


def test_half_outputs_are_the_float32_ones_rounded(half, full):
    assert half.half_io and not full.half_io
    assert half.input_dtype("vgg19_fp16", ["conv5_4"]) == np.float16
    assert full.input_dtype("vgg19_fp16", ["conv5_4"]) == np.float32
    assert half.describe()["half_io"] is True and full.describe()["half_io"] is False
    x = np.stack([full.prepare(i, d, FP16).features_input for i, d in photos(3)])
    x16 = x.astype(np.float16)
    for layers in (["conv5_4"], ["conv3_1", "conv5_4"]):
        got = half.run("vgg19_fp16", x16, layers)
        want = full.run("vgg19_fp16", x16.astype(np.float32), layers)
        for g, w in zip(got, want, strict=True):
            assert g.dtype == np.float16 and w.dtype == np.float32
            np.testing.assert_array_equal(g, w.astype(np.float16))
    # a float32 batch is rounded to float16 on the way in, as the model's own Cast would
    np.testing.assert_array_equal(half.run("vgg19_fp16", x, ["conv5_4"])[0],
                                  half.run("vgg19_fp16", x16, ["conv5_4"])[0])


def test_results_on_every_wire_and_form_agree(half, full):
    items = photos(5)
    results = {}
    for wire in ("float32", "float16"):
        for sparse in (False, True):
            opts = ExtractOptions(model="vgg19_fp16", wire_dtype=wire, sparse=sparse)
            for name, ex in (("half", half), ("full", full)):
                out = list(ex.extract(items, opts))
                assert all(r.error is None for r in out)
                results[name, wire, sparse] = [r.activations["conv5_4"] for r in out]
    for (name, wire, sparse), acts in results.items():
        # what reaches the caller in process is float32 whatever the wire (as before)
        assert {a.dtype for a in acts} == {np.dtype(np.float32)}, (name, wire, sparse)
    # half IO: every activation is float16-valued already, so the wire changes nothing, and
    # the sparse answers are the dense ones exactly
    ref = results["half", "float32", False]
    for key in (("half", "float16", False), ("half", "float32", True), ("half", "float16", True)):
        for a, b in zip(results[key], ref, strict=True):
            np.testing.assert_array_equal(np.asarray(a), b)
    for a in ref:
        np.testing.assert_array_equal(a, a.astype(np.float16))
    # against the float32-IO model (CPU: its input is not rounded to float16): close
    for a, b in zip(ref, results["full", "float32", False], strict=True):
        assert np.linalg.norm(a - b) / np.linalg.norm(b) < 2e-3


def test_prepared_inputs_take_the_models_dtype(registry, half, full):
    (i, d), = photos(1)
    x = full.prepare(i, d, FP16)
    assert x.features_input is not None and x.features_input.dtype == np.float32
    assert half.prepare(i, d, FP16).features_input.dtype == np.float16
    for given in (x.features_input, x.features_input.astype(np.float16)):
        adopted = half.adopt(i, given, None, x.original_size, FP16)
        assert adopted.features_input.dtype == np.float16
        np.testing.assert_array_equal(adopted.features_input, x.features_input.astype(np.float16))
        widened = full.adopt(i, given, None, x.original_size, FP16)
        assert widened.features_input.dtype == np.float32
        np.testing.assert_array_equal(widened.features_input,
                                      given.astype(np.float32))
    bad = x.features_input.astype(np.float16)
    bad[0, 0, 0] = np.inf
    with pytest.raises(InvalidInput, match="not finite"):
        half.adopt(i, bad, None, x.original_size, FP16)
    with pytest.raises(InvalidInput, match="float32 or float16"):
        half.adopt(i, x.features_input.astype(np.float64), None, x.original_size, FP16)
    # other precisions keep float32 on a half-IO extractor's fp32 model
    both = Extractor(registry, precisions=("fp16", "fp32"), half_io=True)
    assert both.input_dtype("vgg19", ["conv5_4"]) == np.float32
    fp32 = ExtractOptions(model="vgg19", precision="fp32")
    assert both.adopt(i, x.features_input.astype(np.float16), None, x.original_size,
                      fp32).features_input.dtype == np.float32


@pytest.mark.parametrize("compiled", [True, False])
def test_sparse_rows_of_float16_activations(monkeypatch, compiled):
    monkeypatch.setattr(kernels_module, "AVAILABLE", compiled)
    rng = np.random.default_rng(3)
    act = rng.standard_normal((512, 14, 14)).astype(np.float16)
    act[act < 1.5] = 0
    act[0, 0, 0] = -0.0  # a signed zero is a zero
    act[1, 0, 0] = np.nan  # NaN is not
    act[2, 0, 0] = np.float16(6e-8)  # the smallest subnormal is not either
    s = from_dense(act)
    assert s.values.dtype == np.float16
    ref = from_dense(act.astype(np.float32))
    np.testing.assert_array_equal(s.indptr, ref.indptr)
    np.testing.assert_array_equal(s.indices, ref.indices)
    np.testing.assert_array_equal(s.values.astype(np.float32), ref.values)
    np.testing.assert_array_equal(s.toarray(np.float16).view(np.uint16)[act != 0],
                                  act.view(np.uint16)[act != 0])
    row0 = s.indices[s.indptr[0]:s.indptr[1]]
    assert 0 not in row0 and 1 in row0 and 2 in row0


def test_round_wire_keeps_or_widens_float16():
    a = np.float16([0.0, 1.5, 65504.0, 6e-8])
    assert round_wire(a, "float16", widen=False) is a
    for wire, widen in (("float16", True), ("float32", True), ("float32", False)):
        b = round_wire(a, wire, widen=widen)
        assert b.dtype == np.float32
        np.testing.assert_array_equal(b, a.astype(np.float32))


@pytest.mark.slow
def test_served_half_io_answers_are_the_in_process_ones(half, address, prepared_dtypes):
    dtypes = prepared_dtypes
    items = photos(4)
    # a client left to choose sends float16 only where it is lossless: to a half-IO server's
    # fp16 model, not to the float32-IO one (the session's CPU server)
    with FeatureClient(address, timeout=120, prepare_locally=True) as client:
        assert client.prepared_dtype == "auto" and client.describe()["half_io"] is False
        assert all(r.error is None for r in client.extract(items[:1], FP16))
    assert dtypes == [common_pb2.FLOAT32]
    dtypes.clear()
    running = start_server(ServerConfig(host="127.0.0.1", port=0, max_batch_size=4,
                                        max_wait_ms=20), half)
    try:
        address = f"127.0.0.1:{running.port}"
        for wire in ("float32", "float16"):
            opts = ExtractOptions(model="vgg19_fp16", precision="fp16", wire_dtype=wire,
                                  sparse=True)
            want = {r.id: r.activations["conv5_4"] for r in half.extract(items, opts)}
            for prepare in (False, True):  # files; float16 inputs made by the client
                with FeatureClient(address, timeout=120, prepare_locally=prepare) as client:
                    assert client.describe()["half_io"] is True
                    got = list(client.extract(items, opts))
                assert all(r.error is None for r in got)
                for r in got:
                    np.testing.assert_array_equal(np.asarray(r.activations["conv5_4"]),
                                                  np.asarray(want[r.id]))
        assert dtypes == [common_pb2.FLOAT16] * (2 * len(items))
    finally:
        running.stop(grace=2)


def test_on_by_default_only_with_a_gpu_provider(registry, monkeypatch):
    monkeypatch.delenv("DFF_HALF_IO", raising=False)
    cpu = Extractor(registry, precisions=("fp16",), providers=["CPUExecutionProvider"])
    assert cpu.execution_provider == "CPUExecutionProvider" and not cpu.half_io
    monkeypatch.setenv("DFF_HALF_IO", "1")
    assert Extractor(registry, precisions=("fp16",)).half_io
    monkeypatch.setenv("DFF_HALF_IO", "0")
    assert not Extractor(registry, precisions=("fp16",), half_io=None).half_io
    assert Extractor(registry, precisions=("fp16",), half_io=True).half_io


@pytest.mark.gpu
def test_half_io_on_cuda_is_bit_identical(registry):
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("needs the CUDA execution provider")
    gpu = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    half = Extractor(registry, providers=gpu, precisions=("fp16",))
    full = Extractor(registry, providers=gpu, precisions=("fp16",), half_io=False)
    assert half.execution_provider == "CUDAExecutionProvider" and half.half_io
    items = photos(16)
    for sparse in (False, True):
        opts = ExtractOptions(model="vgg19_fp16", sparse=sparse)
        a = {r.id: np.asarray(r.activations["conv5_4"]) for r in half.extract(items, opts)}
        b = {r.id: np.asarray(r.activations["conv5_4"]) for r in full.extract(items, opts)}
        for item_id, _ in items:
            np.testing.assert_array_equal(a[item_id], b[item_id])


@pytest.mark.parametrize("compiled", [True, False])
def test_all_finite_reads_every_half_as_numpy_does(monkeypatch, compiled):
    monkeypatch.setattr(kernels_module, "AVAILABLE", compiled)
    halves = np.arange(65536, dtype=np.uint16).view(np.float16)
    want = np.isfinite(halves)
    got = np.array([kernels_module.all_finite(halves[i:i + 1]) for i in range(65536)])
    np.testing.assert_array_equal(got, want)
    singles = np.uint32([0x7F800000, 0xFF800000, 0x7FC00000, 0x7F800001, 0xFFFFFFFF,
                         0x7F7FFFFF, 0xFF7FFFFF, 0x00000001, 0x80000000, 0x3F800000]).view(
        np.float32)
    got32 = [kernels_module.all_finite(singles[i:i + 1]) for i in range(singles.size)]
    np.testing.assert_array_equal(got32, np.isfinite(singles))
    x = np.random.default_rng(5).standard_normal((3, 224, 224)).astype(np.float16)
    assert kernels_module.all_finite(x) and kernels_module.all_finite(x.astype(np.float32))
    for bad in (np.inf, -np.inf, np.nan):
        for where in ((0, 0, 0), (2, 223, 223), (1, 100, 7)):
            y = x.copy()
            y[where] = bad
            assert not kernels_module.all_finite(y)
            assert not kernels_module.all_finite(y.astype(np.float32))
    assert not kernels_module.all_finite(x[:, ::2].copy().astype(np.float16) * np.inf)


def test_a_provider_refusing_the_float16_graph_gets_the_model_as_built(registry, full,
                                                                       monkeypatch, caplog):
    import onnxruntime as ort

    real = ort.InferenceSession

    def picky(source, *args, **kwargs):
        if isinstance(source, bytes):
            model = onnx.load_from_string(source)
            if model.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT16:
                raise RuntimeError("no float16 input here")
        return real(source, *args, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", picky)
    ex = Extractor(registry, precisions=("fp16",), batch_size=4, half_io=True)
    assert ex.input_dtype("vgg19_fp16", ["conv5_4"]) == np.float32
    assert "no half-IO session (no float16 input here)" in caplog.text
    items = photos(2)
    got = [r.activations["conv5_4"] for r in ex.extract(items, FP16)]
    want = [r.activations["conv5_4"] for r in full.extract(items, FP16)]
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, b)


def _halves_and_their_neighbours() -> np.ndarray:
    """float32 bit patterns around every float16 value and every midpoint between two: where
    a float -> half rounding can go wrong (ties, carries into the exponent, the subnormal and
    overflow edges, NaN payloads), plus a million random patterns."""
    halves = np.arange(65536, dtype=np.uint16).view(np.float16)
    with np.errstate(invalid="ignore"):
        singles = halves.astype(np.float32)
        finite = np.sort(singles[np.isfinite(singles)])
        mids = ((finite[:-1].astype(np.float64) + finite[1:]) / 2).astype(np.float32)
    centres = np.concatenate([singles, mids, np.float32([65520.0, -65520.0, 2.0**-25,
                                                        -(2.0**-25), 2.0**-26, 2.0**-24])])
    bits = centres.view(np.uint32).astype(np.int64)
    near = (bits[:, None] + np.arange(-3, 4)[None, :]).ravel()
    near = near[(near >= 0) & (near < 2**32)].astype(np.uint32)
    rng = np.random.default_rng(11)
    extra = np.uint32([0x7F800000, 0xFF800000, 0x7FC00000, 0x7F800001, 0x7F801FFF, 0x7F802000,
                       0xFFFFFFFF, 0x477FEFFF, 0x477FF000, 0x47800000, 0x33000000, 0x33000001,
                       0x387FFFFF, 0x38800000])
    return np.concatenate([near, extra, rng.integers(0, 2**32, 1_000_000, dtype=np.uint32)])


@pytest.mark.parametrize("compiled", [True, False])
def test_float_to_half_rounds_as_numpy(monkeypatch, compiled):
    monkeypatch.setattr(kernels_module, "AVAILABLE", compiled)
    bits = _halves_and_their_neighbours()
    with np.errstate(over="ignore", invalid="ignore"):
        want = bits.view(np.float32).astype(np.float16)
    got = kernels_module.float_to_half(bits.view(np.float32))
    assert got.dtype == np.float16 and got.shape == want.shape
    np.testing.assert_array_equal(got.view(np.uint16), want.view(np.uint16))
    x = np.random.default_rng(2).standard_normal((3, 5, 7)).astype(np.float32)
    assert kernels_module.float_to_half(x).shape == (3, 5, 7)


@pytest.mark.skipif(os.environ.get("DFF_EXHAUSTIVE_TESTS") != "1",
                    reason="opt-in: DFF_EXHAUSTIVE_TESTS=1 (all 2^32 float32 patterns, ~5 min)")
def test_float_to_half_on_every_float32():
    chunk = 1 << 26
    with np.errstate(over="ignore", invalid="ignore"):
        for start in range(0, 1 << 32, chunk):
            bits = np.arange(start, start + chunk, dtype=np.uint64).astype(np.uint32)
            want = bits.view(np.float32).astype(np.float16).view(np.uint16)
            got = kernels_module.float_to_half(bits.view(np.float32)).view(np.uint16)
            assert np.array_equal(got, want), hex(start)

"""Sparse activations (ExtractOptions.sparse): CSR rows over the positions, lossless, in process,
through the server and the client; known answers on tiny cases, the compiled kernel against
NumPy, hostile answers refused per item, and the engine's rows the same either way."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import scipy.sparse as sp
from dff_protos.errors import InvalidInput
from dff_protos.v1 import common_pb2, features_pb2, features_pb2_grpc

import feature_server.kernels as kernels_module
from feature_server.client import FeatureClient
from feature_server.convert import (
    image_request,
    options_to_proto,
    result_from_proto,
    result_to_proto,
    sparse_to_proto,
)
from feature_server.extractor import ExtractOptions
from feature_server.sparse import SparseActivation, from_dense


@pytest.fixture(scope="module")
def photos(shared_data) -> list[tuple[str, bytes]]:
    files = sorted((shared_data / "imagenet_sample").glob("*.JPEG"))[:3]
    return [(p.name, p.read_bytes()) for p in files]


def test_known_answer():
    # C=3 channels, h=1, w=2: position 0 has channels 0 and 2, position 1 has channel 1
    act = np.zeros((3, 1, 2), np.float32)
    act[0, 0, 0], act[2, 0, 0], act[1, 0, 1] = 1.5, -2.0, 7.0
    s = from_dense(act)
    assert s.shape == (3, 1, 2) and s.ndim == 3 and s.nnz == 3
    assert s.indptr.dtype == np.int32 and s.indices.dtype == np.uint16
    np.testing.assert_array_equal(s.indptr, [0, 2, 3])
    np.testing.assert_array_equal(s.indices, [0, 2, 1])
    np.testing.assert_array_equal(s.values, np.float32([1.5, -2.0, 7.0]))
    np.testing.assert_array_equal(s.toarray(), act)
    np.testing.assert_array_equal(np.asarray(s), act)
    csr = s.to_csr()
    np.testing.assert_array_equal(csr.toarray(), [[1.5, 0, -2.0], [0, 7.0, 0]])
    # after a ReLU the negative value is gone, not stored as a zero
    relu = s.to_csr(relu=True)
    assert relu.nnz == 2
    np.testing.assert_array_equal(relu.toarray(), [[1.5, 0, 0], [0, 7.0, 0]])
    # all zeros: no entries, pointers all 0
    empty = from_dense(np.zeros((4, 2, 2), np.float32))
    assert empty.nnz == 0 and not empty.indptr.any()
    np.testing.assert_array_equal(empty.toarray(), np.zeros((4, 2, 2)))


@pytest.mark.parametrize("kernels", [True, False])
def test_kernel_and_numpy_agree_with_scipy(monkeypatch, kernels):
    monkeypatch.setattr(kernels_module, "AVAILABLE", kernels)
    rng = np.random.default_rng(1)
    act = rng.standard_normal((512, 14, 14)).astype(np.float32)
    act[act < 1.5] = 0  # ~7% non-zeros, like conv5_4 after its ReLU
    s = from_dense(act)
    ref = sp.csr_matrix(act.reshape(512, -1).T)
    csr = s.to_csr()
    np.testing.assert_array_equal(csr.indptr, ref.indptr)
    np.testing.assert_array_equal(csr.indices, ref.indices)
    np.testing.assert_array_equal(csr.data, ref.data)
    np.testing.assert_array_equal(s.toarray(), act)
    # float16 input: the same pattern, values widened exactly
    half = from_dense(act.astype(np.float16))
    np.testing.assert_array_equal(half.indptr, s.indptr)
    np.testing.assert_array_equal(half.toarray(), act.astype(np.float16).astype(np.float32))
    assert s.nbytes < act.nbytes / 6


def test_values_rounded_to_zero_are_dropped():
    # 1e-9 is below float16's smallest subnormal: rounded through a float16 wire it is 0, and
    # the sparse answer is what the rounded dense array would give
    act = np.zeros((3, 1, 2), np.float32)
    act[0, 0, 0], act[2, 0, 0], act[1, 0, 1] = 1e-9, 2.0, 3.0
    s = from_dense(act)
    half = s.with_values(s.values.astype(np.float16))
    ref = from_dense(act.astype(np.float16))
    assert half.nnz == 2
    for a, b in ((half.indptr, ref.indptr), (half.indices, ref.indices),
                 (half.values, ref.values.astype(np.float16))):
        np.testing.assert_array_equal(a, b)
    half.check()
    assert s.with_values(s.values * 2).nnz == 3  # nothing dropped: the same pattern


def parts(shape=(3, 1, 2), indptr=(0, 2, 3), indices=(0, 2, 1), values=(1.0, 2.0, 3.0)):
    return SparseActivation(shape, np.asarray(indptr, np.int32), np.asarray(indices, np.uint16),
                            np.asarray(values, np.float32))


@pytest.mark.parametrize("kwargs,text", [
    ({"shape": (3, 2)}, "not (C, h, w)"),
    ({"shape": (0, 1, 2)}, "not (C, h, w)"),
    ({"shape": (70000, 1, 2)}, "at most 65535"),
    ({"indptr": (0, 3)}, "2 row pointers for 2 positions"),
    ({"indptr": (0, 3, 2)}, "must rise"),
    ({"indptr": (1, 2, 3)}, "must rise"),
    ({"indptr": (0, 2, 2)}, "must rise"),
    ({"indices": (0, 3, 1)}, "channel 3 of 3"),
    ({"values": (1.0, 2.0)}, "2 values for 3"),
])
def test_malformed_parts_are_refused(kwargs, text):
    parts().check()
    with pytest.raises(InvalidInput, match=text.replace("(", r"\(").replace(")", r"\)")):
        parts(**kwargs).check()


def test_too_many_channels_for_the_wire():
    with pytest.raises(InvalidInput, match="at most 65535 channels"):
        from_dense(np.zeros((70000, 1, 1), np.float32))


def dense_results(extractor, photos, **kw):
    out = {}
    for r in extractor.extract(photos, ExtractOptions(**kw)):
        assert r.error is None, (r.id, r.error)
        out[r.id] = r.activations["conv5_4"]
    return out


@pytest.mark.parametrize("wire_dtype", ["float32", "float16"])
def test_in_process_sparse_is_the_dense_activation(extractor, photos, wire_dtype):
    dense = dense_results(extractor, photos, wire_dtype=wire_dtype)
    for r in extractor.extract(photos, ExtractOptions(sparse=True, wire_dtype=wire_dtype)):
        act = r.activations["conv5_4"]
        assert isinstance(act, SparseActivation)
        assert act.values.dtype == np.float32
        np.testing.assert_array_equal(act.toarray(), dense[r.id])
        # conv5_4 after its ReLU: mostly zeros
        assert act.nnz < 0.25 * dense[r.id].size


def test_proto_round_trip_and_wire_bytes(extractor, photos):
    opts = ExtractOptions(sparse=True, wire_dtype="float16")
    assert options_to_proto(opts).sparse
    res = next(iter(extractor.extract(photos[:1], opts)))
    resp = result_to_proto(res, opts)
    assert resp.activations[0].HasField("sparse")
    assert not resp.activations[0].HasField("tensor")
    back = result_from_proto(features_pb2.ExtractResponse.FromString(resp.SerializeToString()))
    act = back.activations["conv5_4"]
    assert isinstance(act, SparseActivation)
    np.testing.assert_array_equal(act.toarray(), res.activations["conv5_4"].toarray())
    dense = result_to_proto(next(iter(extractor.extract(photos[:1], ExtractOptions()))),
                            ExtractOptions())
    # float16 values + uint16 channels against a float32 tensor
    assert resp.ByteSize() * 8 < dense.ByteSize()


def hostile(**fields) -> features_pb2.ExtractResponse:
    msg = features_pb2.ExtractResponse(id="x")
    a = msg.activations.add()
    a.layer = "conv5_4"
    sparse_to_proto(a.sparse, parts(), common_pb2.FLOAT32)
    for name, value in fields.items():
        if name == "values":
            a.sparse.values.CopyFrom(value)
        elif name == "shape":
            a.sparse.shape[:] = value
        else:
            setattr(a.sparse, name, value)
    return msg


@pytest.mark.parametrize("fields,text", [
    ({"indptr": b"\0\0\0"}, "cut short"),
    ({"indices": b"\0\0\0"}, "cut short"),
    ({"indptr": np.int32([0, 9, 3]).tobytes()}, "must rise"),
    ({"indices": np.uint16([0, 2, 600]).tobytes()}, "channel 600 of 3"),
    ({"shape": [3, 1]}, "not (C, h, w)"),
    ({"shape": [3, 1000000, 1000000]}, "more than 1073741824"),
    ({"shape": [3, 10000, 10000]}, "row pointers"),
    # a bomb: a few bytes claiming 65535 x 4096 x 4096 (4 PB dense) - refused from the shape
    ({"shape": [65535, 4096, 4096]}, "more than 1073741824"),
    ({"values": common_pb2.Tensor(data=b"\0" * 8, shape=[2], dtype=common_pb2.FLOAT32)},
     "2 values for 3"),
    ({"values": common_pb2.Tensor(data=b"\0" * 8, shape=[3], dtype=common_pb2.FLOAT32)},
     "needs 12 bytes"),
])
def test_a_hostile_answer_is_that_items_error(fields, text):
    assert result_from_proto(hostile()).error is None
    res = result_from_proto(hostile(**fields))
    assert isinstance(res.error, InvalidInput)
    assert "'x'" in str(res.error) and text in str(res.error), res.error
    assert not res.activations


@pytest.mark.slow
def test_served_sparse_equals_in_process_dense(address, extractor, photos):
    dense = dense_results(extractor, photos)
    with FeatureClient(address, timeout=60) as client:
        got = list(client.extract(photos, ExtractOptions(sparse=True)))
    assert sorted(r.id for r in got) == sorted(i for i, _ in photos)
    for r in got:
        assert isinstance(r.activations["conv5_4"], SparseActivation)
        np.testing.assert_array_equal(np.asarray(r.activations["conv5_4"]), dense[r.id])
    # the raw stream: sparse answers are much smaller than dense ones
    sizes = {}
    for flag in (False, True):
        requests = [features_pb2.ExtractRequest(
            options=options_to_proto(ExtractOptions(sparse=flag)))]
        requests += [image_request(i, d) for i, d in photos]
        with grpc.insecure_channel(address) as channel:
            stub = features_pb2_grpc.FeatureServiceStub(channel)
            sizes[flag] = sum(r.ByteSize() for r in stub.Extract(iter(requests), timeout=60))
    assert sizes[True] * 5 < sizes[False], sizes


def test_engine_rows_are_the_same_from_dense_and_sparse(extractor, photos):
    from concept_engine.discovery import _rows

    for r in extractor.extract(photos, ExtractOptions(sparse=True)):
        act = r.activations["conv5_4"]
        a, b = _rows(act), _rows(act.toarray())
        ref = sp.csr_matrix(np.maximum(act.toarray(), 0).reshape(act.shape[0], -1).T)
        for m in (a, b):
            np.testing.assert_array_equal(m.indptr, ref.indptr)
            np.testing.assert_array_equal(m.indices, ref.indices)
            np.testing.assert_array_equal(m.data, ref.data)
            assert m.dtype == np.float32

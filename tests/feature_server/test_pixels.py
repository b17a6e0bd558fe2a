"""Decoded pixels instead of files (DecodedImage): the same activations as the files they come
from, in process, through the server and through the client that decodes locally; hostile
pixel messages refused per item, before anything is allocated."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from dff_protos import wire
from dff_protos.errors import ImageTooLarge, InvalidInput
from dff_protos.v1 import common_pb2, features_pb2, features_pb2_grpc

from feature_server.client import FeatureClient
from feature_server.convert import image_request, options_to_proto
from feature_server.extractor import ExtractOptions
from feature_server.images import check_pixels, decode_image, decode_pixels, pixels_to_image
from tests.feature_server.test_images import encode

ItemError = common_pb2.ItemError


@pytest.fixture(scope="module")
def photos(shared_data) -> list[tuple[str, bytes]]:
    files = sorted((shared_data / "imagenet_sample").glob("*.JPEG"))[:3]
    return [(p.name, p.read_bytes()) for p in files]


def acts(results) -> dict[str, np.ndarray]:
    out = {}
    for r in results:
        assert r.error is None, (r.id, r.error)
        out[r.id] = r.activations["conv5_4"]
    return out


def test_decode_pixels_is_what_the_decoder_computes_on(photos):
    rng = np.random.default_rng(0)
    for _, data in photos:
        pixels = decode_pixels(data)
        assert pixels.dtype == np.uint8 and pixels.shape[2] == 3
        np.testing.assert_array_equal(pixels_to_image(pixels), decode_image(data))
    grey = rng.integers(0, 256, (20, 30), dtype=np.uint8)
    np.testing.assert_array_equal(pixels_to_image(decode_pixels(encode(grey, ".png"))),
                                  decode_image(encode(grey, ".png")))
    # not plain 8-bit colour: the file itself must be sent (alpha is blended, 16 bit scaled)
    assert decode_pixels(encode(rng.integers(0, 256, (8, 8, 4), dtype=np.uint8), ".png")) is None
    assert decode_pixels(encode(rng.integers(0, 65536, (8, 8, 3), dtype=np.uint16), ".png")) \
        is None
    with pytest.raises(InvalidInput, match="truncated"):
        decode_pixels(photos[0][1][:2000])


@pytest.mark.parametrize("shape,dtype,error,text", [
    ((10, 10, 3), np.float32, InvalidInput, "uint8"),
    ((10, 10), np.uint8, InvalidInput, "(height, width, 3)"),
    ((10, 10, 4), np.uint8, InvalidInput, "(height, width, 3)"),
    ((0, 10, 3), np.uint8, InvalidInput, "empty"),
    ((100_000, 100_000, 3), np.uint8, ImageTooLarge, "100000x100000"),
])
def test_bad_pixels_are_refused_from_their_shape(shape, dtype, error, text):
    with pytest.raises(error, match=text.replace("(", r"\(").replace(")", r"\)")):
        check_pixels(shape, dtype)


def test_pixels_in_process_match_the_files(extractor, photos):
    from_files = acts(extractor.extract(photos, ExtractOptions()))
    as_pixels = [(i, decode_pixels(d)) for i, d in photos]
    np.testing.assert_equal(acts(extractor.extract(as_pixels, ExtractOptions())), from_files)
    # the pixels of a PNG of them: the same numbers again
    as_png = [(i, encode(p, ".png")) for i, p in as_pixels]
    np.testing.assert_equal(acts(extractor.extract(as_png, ExtractOptions())), from_files)
    # keep-aspect works from pixels too (the size comes from the array)
    opts = ExtractOptions(resize_mode="keep_aspect")
    a = acts(extractor.extract(photos[:1], opts))
    b = acts(extractor.extract(as_pixels[:1], opts))
    np.testing.assert_equal(a, b)


def pixels_request(item_id: str, data: bytes, shape, dtype=common_pb2.UINT8
                   ) -> features_pb2.ExtractRequest:
    return features_pb2.ExtractRequest(pixels=features_pb2.DecodedImage(
        id=item_id, pixels=common_pb2.Tensor(data=data, shape=list(shape), dtype=dtype)))


@pytest.mark.slow
def test_server_takes_pixels_and_refuses_hostile_ones_per_item(address, extractor, photos):
    expect = acts(extractor.extract(photos[:2], ExtractOptions()))
    p0 = decode_pixels(photos[0][1])
    h, w, _ = p0.shape
    requests = [
        features_pb2.ExtractRequest(options=options_to_proto(ExtractOptions())),
        image_request(photos[0][0], p0),
        pixels_request("float", p0.astype(np.float32).tobytes(), p0.shape, common_pb2.FLOAT32),
        pixels_request("short", p0.tobytes()[:-1], p0.shape),
        pixels_request("grey", p0[:, :, 0].tobytes(), (h, w)),
        pixels_request("rgba", b"\0" * (4 * 16), (4, 4, 4)),
        # a tiny message that claims 8 Gpixels: refused from the shape, nothing allocated
        pixels_request("bomb", b"\0" * 3, (100_000, 80_000, 3)),
        pixels_request("negative", b"", (-5, 10, 3)),
        pixels_request("unknown-dtype", p0.tobytes(), p0.shape, 77),
        image_request(photos[1][0], photos[1][1]),  # a file after them: the stream goes on
    ]
    with grpc.insecure_channel(address) as channel:
        stub = features_pb2_grpc.FeatureServiceStub(channel)
        got = {r.id: r for r in stub.Extract(iter(requests), timeout=60)}
    assert len(got) == 9, sorted(got)
    for item_id in (photos[0][0], photos[1][0]):
        assert not got[item_id].HasField("error")
        np.testing.assert_array_equal(wire.from_tensor(got[item_id].activations[0].tensor),
                                      expect[item_id])
    assert got[photos[0][0]].info.original_width == w
    expected = {"float": (ItemError.INVALID_IMAGE, "must be UINT8, got FLOAT32"),
                "short": (ItemError.INVALID_IMAGE, "bytes"),
                "grey": (ItemError.INVALID_IMAGE, "(height, width, 3)"),
                "rgba": (ItemError.INVALID_IMAGE, "(height, width, 3)"),
                "bomb": (ItemError.IMAGE_TOO_LARGE, "80000x100000"),
                "negative": (ItemError.INVALID_IMAGE, "empty"),
                "unknown-dtype": (ItemError.INVALID_IMAGE, "dtype 77")}
    for item_id, (code, text) in expected.items():
        err = got[item_id].error
        assert err.code == code and text in err.message, (item_id, err)
        assert not got[item_id].activations


@pytest.mark.slow
def test_client_sends_arrays_and_decodes_locally(address, extractor, photos, shared_data):
    expect = acts(extractor.extract(photos, ExtractOptions()))
    gif = (shared_data / "imagenet_data" / "ant" / "imageNotFound.gif").read_bytes()
    with FeatureClient(address, timeout=60) as plain:
        arrays = [(i, decode_pixels(d)) for i, d in photos]
        np.testing.assert_equal(acts(plain.extract(arrays, ExtractOptions())), expect)
        # refused here, before anything is sent; the other items are answered
        bad = list(plain.extract([("f", np.zeros((4, 4, 3), np.float64)), photos[0]],
                                 ExtractOptions()))
        by_id = {r.id: r for r in bad}
        assert isinstance(by_id["f"].error, InvalidInput) and "uint8" in str(by_id["f"].error)
        assert by_id[photos[0][0]].error is None
        server_says = {r.id: r.error for r in plain.extract([("gif", gif)], ExtractOptions())}
    with FeatureClient(address, timeout=60, decode_locally=True) as local:
        np.testing.assert_equal(acts(local.extract(photos, ExtractOptions())), expect)
        # a file the client cannot turn into pixels goes as it is: the server's own answer
        again = {r.id: r.error for r in local.extract([("gif", gif)], ExtractOptions())}
        assert type(again["gif"]) is type(server_says["gif"])
        assert str(again["gif"]) == str(server_says["gif"])


def test_decode_locally_follows_the_environment(monkeypatch):
    monkeypatch.setenv("DFF_CLIENT_DECODE", "1")
    with FeatureClient("127.0.0.1:1") as client:
        assert client.decode_locally
    monkeypatch.setenv("DFF_CLIENT_DECODE", "0")
    with FeatureClient("127.0.0.1:1", decode_locally=True) as client:
        assert client.decode_locally
    with FeatureClient("127.0.0.1:1") as client:
        assert not client.decode_locally


def test_request_kinds():
    req = image_request("a", b"\xff\xd8\xff")
    assert req.WhichOneof("kind") == "image"
    px = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    req = image_request("b", px)
    assert req.WhichOneof("kind") == "pixels" and req.pixels.pixels.dtype == common_pb2.UINT8
    np.testing.assert_array_equal(wire.from_tensor(req.pixels.pixels, as_float32=False), px)
    with pytest.raises(InvalidInput):
        image_request("c", px.astype(np.int16))
    # a non-contiguous view is sent as its values
    view = np.ascontiguousarray(np.dstack([px[:, :, 2], px[:, :, 1], px[:, :, 0]]))[:, ::-1]
    req = image_request("d", view)
    np.testing.assert_array_equal(wire.from_tensor(req.pixels.pixels, as_float32=False), view)


@pytest.fixture
def sent(monkeypatch) -> list[str]:
    """The kind of every image request the client builds (image, pixels or prepared)."""
    import feature_server.client as client_module

    kinds: list[str] = []
    real = client_module.image_request

    def spy(item_id, data):
        req = real(item_id, data)
        kinds.append(req.WhichOneof("kind"))
        return req

    monkeypatch.setattr(client_module, "image_request", spy)
    return kinds


@pytest.mark.slow
def test_a_server_without_decoded_images_gets_files(address, extractor, photos, monkeypatch,
                                                    sent):
    assert FeatureClient(address).describe()["accepts_decoded_images"] is True
    expect = acts(extractor.extract(photos, ExtractOptions()))
    arrays = [(i, decode_pixels(d)) for i, d in photos]
    with FeatureClient(address, timeout=60, decode_locally=True) as new:
        np.testing.assert_equal(acts(new.extract(photos, ExtractOptions())), expect)
    assert sent == ["pixels"] * len(photos)
    sent.clear()
    with FeatureClient(address, timeout=60, decode_locally=True) as old:
        # as a server from before DecodedImage answers DescribeModel
        monkeypatch.setattr(old, "describe", lambda: {"models": []})
        np.testing.assert_equal(acts(old.extract(photos, ExtractOptions())), expect)
        assert sent == ["image"] * len(photos)
        sent.clear()
        # arrays go as PNGs of their pixels: the same numbers
        np.testing.assert_equal(acts(old.extract(arrays, ExtractOptions())), expect)
        assert sent == ["image"] * len(photos)


def test_local_decoding_under_a_tiny_byte_budget_keeps_order_and_loses_nothing(monkeypatch,
                                                                          photos):
    import feature_server.client as client_module

    # a 1-byte budget: every decoded image is sent as soon as it is ready
    monkeypatch.setattr(client_module, "LOOKAHEAD_BYTES", 1)
    client = FeatureClient("127.0.0.1:1", decode_locally=True)
    try:
        monkeypatch.setattr(client, "_accepts", lambda capability: True)
        items = photos * 4
        got = list(client._payloads(items, list(range(len(items))), ExtractOptions()))
        assert [p.shape for p in got] == [decode_pixels(d).shape for _, d in items]
    finally:
        client.close()


# ------------------------------------------------------------------ prepared network inputs
def made_here(extractor, data: bytes, options: ExtractOptions):
    """What the server's own code makes of a file: the inputs a prepare_locally client sends."""
    from feature_server.convert import PreparedInputs

    p = extractor.prepare("x", data, options)
    return PreparedInputs(p.features_input, p.classifier_input, p.original_size)


@pytest.mark.slow
def test_server_runs_prepared_inputs_and_refuses_inconsistent_ones(address, extractor, photos):
    from feature_server.convert import PreparedInputs

    opts = ExtractOptions(top_k=3, resize_mode="keep_aspect")
    expect = {r.id: r for r in extractor.extract(photos[:2], opts)}
    good = made_here(extractor, photos[0][1], opts)
    x, cx, (h, w) = good.features_input, good.classifier_input, good.original_size
    nan = x.copy()
    nan[0, 0, 0] = np.nan
    bad = {
        "no-classifier": PreparedInputs(x, None, (h, w)),
        "no-features": PreparedInputs(None, cx, (h, w)),
        "wrong-size": PreparedInputs(x, cx, (h + 50, w)),  # keep-aspect of another image
        "nan": PreparedInputs(nan, cx, (h, w)),
        "double-bytes": PreparedInputs(x.astype(np.float64), cx, (h, w)),
        "zero-size": PreparedInputs(x, cx, (0, w)),
        "huge": PreparedInputs(x, cx, (100_000, 100_000)),
    }
    requests = [features_pb2.ExtractRequest(options=options_to_proto(opts)),
                image_request(photos[0][0], good)]
    for item_id, inputs in bad.items():
        req = image_request(item_id, PreparedInputs(None, None, inputs.original_size))
        msg = req.prepared
        for field, arr in (("features_input", inputs.features_input),
                           ("classifier_input", inputs.classifier_input)):
            if arr is not None:  # written raw, as a hostile client would
                t = getattr(msg, field)
                t.data = arr.tobytes()
                t.shape[:] = list(arr.shape)
                t.dtype = common_pb2.FLOAT32
        requests.append(req)
    # a claimed shape far larger than the bytes sent: refused before any allocation
    bomb = features_pb2.ExtractRequest(prepared=features_pb2.PreparedImage(
        id="bomb", original_height=h, original_width=w,
        features_input=common_pb2.Tensor(data=b"\0" * 12, shape=[3, 40000, 40000],
                                         dtype=common_pb2.FLOAT32)))
    bytes_ = features_pb2.ExtractRequest(prepared=features_pb2.PreparedImage(
        id="uint8", original_height=h, original_width=w,
        features_input=common_pb2.Tensor(data=x.astype(np.uint8).tobytes(),
                                         shape=list(x.shape), dtype=common_pb2.UINT8)))
    half_nan = image_request("half-nan", PreparedInputs(nan.astype(np.float16),
                                                        cx.astype(np.float16), (h, w)))
    half_short = image_request("half-short", PreparedInputs(x.astype(np.float16),
                                                            cx.astype(np.float16), (h, w)))
    half_short.prepared.features_input.data = half_short.prepared.features_input.data[:-2]
    requests += [bomb, bytes_, half_nan, half_short, image_request(photos[1][0], photos[1][1])]
    with grpc.insecure_channel(address) as channel:
        stub = features_pb2_grpc.FeatureServiceStub(channel)
        got = {r.id: r for r in stub.Extract(iter(requests), timeout=60)}
    assert len(got) == 2 + len(bad) + 4, sorted(got)
    for item_id in (photos[0][0], photos[1][0]):
        r = got[item_id]
        assert not r.HasField("error"), r.error
        np.testing.assert_array_equal(wire.from_tensor(r.activations[0].tensor),
                                      expect[item_id].activations["conv5_4"])
        assert [c.index for c in r.top_k] == [c[0] for c in expect[item_id].top_k]
    assert got[photos[0][0]].info.original_width == w
    texts = {"no-classifier": "classifier_input missing", "no-features": "features_input missing",
             "wrong-size": "expected", "nan": "not finite", "double-bytes": "bytes",
             "uint8": "must be FLOAT32 or FLOAT16", "zero-size": "not positive",
             "huge": "above the limit", "bomb": "bytes", "half-nan": "not finite",
             "half-short": "bytes"}
    for item_id, text in texts.items():
        err = got[item_id].error
        assert err.code != 0 and text in err.message, (item_id, err)


@pytest.mark.slow
def test_client_prepares_locally_with_the_servers_preprocessing(address, extractor, photos,
                                                                shared_data, monkeypatch,
                                                                sent):
    opts = ExtractOptions(top_k=2)
    expect = {r.id: r for r in extractor.extract(photos, opts)}
    gif = (shared_data / "imagenet_data" / "ant" / "imageNotFound.gif").read_bytes()
    with FeatureClient(address, timeout=60, prepare_locally=True) as client:
        assert client.describe()["accepts_prepared_images"] is True
        got = {r.id: r for r in client.extract([*photos, ("gif", gif)], opts)}
    assert sent == ["prepared"] * len(photos) + ["image"]  # the GIF: the server's answer
    assert got["gif"].error is not None and "GIF" in str(got["gif"].error)
    for item_id, r in expect.items():
        np.testing.assert_array_equal(got[item_id].activations["conv5_4"],
                                      r.activations["conv5_4"])
        assert got[item_id].top_k == r.top_k
        assert got[item_id].original_size == r.original_size
    sent.clear()
    with FeatureClient(address, timeout=60, prepare_locally=True) as old:
        # a server that takes pixels but not prepared inputs gets pixels
        monkeypatch.setattr(old, "describe", lambda: {"models": [],
                                                      "accepts_decoded_images": True})
        got = {r.id: r for r in old.extract(photos, opts)}
    assert sent == ["pixels"] * len(photos)
    for item_id, r in expect.items():
        np.testing.assert_array_equal(got[item_id].activations["conv5_4"],
                                      r.activations["conv5_4"])


def test_half_to_float_is_exact_for_every_half(monkeypatch):
    from feature_server import kernels

    halves = np.arange(65536, dtype=np.uint16).view(np.float16)
    want = halves.astype(np.float32)
    for compiled in (True, False):
        monkeypatch.setattr(kernels, "AVAILABLE", compiled)
        got = kernels.half_to_float(halves.reshape(256, 256)).ravel()
        # the same bits: values, signed zeros, infinities and NaN payloads
        np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))


def test_float16_prepared_inputs_go_as_float16(extractor):
    from feature_server.convert import PreparedInputs, prepared_from_proto

    x = (np.random.default_rng(0).random((3, 224, 224), np.float32) - 0.5) * 255
    req = image_request("a", PreparedInputs(x.astype(np.float16), None, (224, 224)))
    t = req.prepared.features_input
    assert t.dtype == common_pb2.FLOAT16 and len(t.data) == x.size * 2
    # the server reads them as they came (a half-IO model takes them so) ...
    back = prepared_from_proto(req.prepared).features_input
    assert back is not None and back.dtype == np.float16
    np.testing.assert_array_equal(back, x.astype(np.float16))
    # ... and a model that takes float32 gets them widened exactly
    assert not extractor.half_io
    for precision in ("fp32", "fp16"):
        adopted = extractor.adopt("a", back, None, (224, 224),
                                  ExtractOptions(precision=precision, model="vgg19" + (
                                      "_fp16" if precision == "fp16" else "")))
        assert adopted.features_input is not None
        assert adopted.features_input.dtype == np.float32
        np.testing.assert_array_equal(adopted.features_input, x.astype(np.float16))
        assert np.abs(adopted.features_input - x).max() <= 1 / 16  # float16 steps <= 1/8


@pytest.mark.slow
def test_client_prepares_float16_inputs(address, extractor, photos, monkeypatch,
                                         prepared_dtypes):
    dtypes = prepared_dtypes
    fp16, fp32 = ExtractOptions(precision="fp16"), ExtractOptions(precision="fp32")
    expect16 = {r.id: r.activations["conv5_4"] for r in extractor.extract(photos[:2], fp16)}
    expect32 = {r.id: r.activations["conv5_4"] for r in extractor.extract(photos, fp32)}
    with FeatureClient(address, timeout=120, prepare_locally=True,
                       prepared_dtype="float16") as client:
        assert client.describe()["accepts_prepared_float16"] is True
        got16 = {r.id: r.activations["conv5_4"] for r in client.extract(photos[:2], fp16)}
        got32 = {r.id: r.activations["conv5_4"] for r in client.extract(photos, fp32)}
        assert dtypes == [common_pb2.FLOAT16] * (2 + len(photos))
        # an int8 model quantises its input: float16 rounding would move its activations by
        # ~4%, so it gets float32 (the same numbers as the file, bit for bit)
        dtypes.clear()
        int8 = ExtractOptions(precision="int8")
        got8 = {r.id: r.activations["conv5_4"] for r in client.extract(photos[:1], int8)}
    assert dtypes == [common_pb2.FLOAT32]
    np.testing.assert_array_equal(
        got8[photos[0][0]], next(iter(extractor.extract(photos[:1], int8))).activations["conv5_4"])
    # inputs within 1/16 of a grey level: activations within 0.2%. (The fp16 model's own first
    # step rounds its input to float16, but ONNX Runtime's CPU provider, which has no float16
    # convolutions, removes that cast; on CUDA it stays - test_fp16_model_input_is_float16.)
    for expect, got in ((expect16, got16), (expect32, got32)):
        for item_id, act in expect.items():
            rel = np.linalg.norm(got[item_id] - act) / np.linalg.norm(act)
            assert 0 < rel < 2e-3, (item_id, rel)
    # a server that does not state it gets float32
    dtypes.clear()
    with FeatureClient(address, timeout=120, prepare_locally=True,
                       prepared_dtype="float16") as old:
        described = old.describe()
        monkeypatch.setattr(old, "describe", lambda: {**described,
                                                      "accepts_prepared_float16": False})
        got = {r.id: r.activations["conv5_4"] for r in old.extract(photos[:1], fp32)}
    assert dtypes == [common_pb2.FLOAT32]
    np.testing.assert_array_equal(got[photos[0][0]], expect32[photos[0][0]])


def test_prepared_dtype_follows_the_environment(monkeypatch):
    monkeypatch.setenv("DFF_CLIENT_PREPARE", "float16")
    with FeatureClient("127.0.0.1:1") as client:
        assert client.prepare_locally and client.prepared_dtype == "float16"
    monkeypatch.setenv("DFF_CLIENT_PREPARE", "1")
    with FeatureClient("127.0.0.1:1") as client:
        assert client.prepare_locally and client.prepared_dtype == "auto"
    with pytest.raises(InvalidInput, match="float32 or float16"):
        FeatureClient("127.0.0.1:1", prepared_dtype="bfloat16")


@pytest.mark.gpu
def test_fp16_model_input_is_float16(extractor, photos):
    # on CUDA the fp16 model casts its input to float16 first: float16 prepared inputs give
    # the same activations as float32 ones, bit for bit
    assert extractor.execution_provider == "CUDAExecutionProvider"
    opts = ExtractOptions(precision="fp16")
    x = np.stack([made_here(extractor, d, opts).features_input for _, d in photos])
    rounded = x.astype(np.float16).astype(np.float32)
    a = extractor.run(opts.model, x, ["conv5_4"])[0]
    b = extractor.run(opts.model, rounded, ["conv5_4"])[0]
    np.testing.assert_array_equal(a, b)

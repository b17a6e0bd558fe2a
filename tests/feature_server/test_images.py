"""Decoding policy: header checks before decoding, odd colour modes, EXIF orientation."""

from __future__ import annotations

import io
import struct
import zlib

import cv2
import numpy as np
import pytest
from dff_protos.errors import ImageTooLarge, InvalidInput

from feature_server.images import (
    ALL_FORMATS,
    DecodeLimits,
    decode_image,
    header_size,
    preprocess,
    read_items,
    sniff_format,
)
from feature_server.models.build import EFFICIENTNET_PREPROCESSING, VGG_CAFFE_PREPROCESSING


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose IHDR claims width x height (the data is not that big)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    body = struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))
    idat = zlib.compress(b"\x00" * 16)
    body += struct.pack(">I", len(idat)) + b"IDAT" + idat + struct.pack(
        ">I", zlib.crc32(b"IDAT" + idat))
    return b"\x89PNG\r\n\x1a\n" + body + b"\x00\x00\x00\x00IEND\xaeB`\x82"


def encode(img: np.ndarray, ext: str) -> bytes:
    ok, buf = cv2.imencode(ext, img)
    assert ok
    return buf.tobytes()


def test_huge_png_refused_from_header_before_decoding():
    data = png_claiming(30000, 30000)
    assert header_size(data, sniff_format(data)) == (30000, 30000)
    with pytest.raises(ImageTooLarge, match="30000x30000"):
        decode_image(data, DecodeLimits(max_pixels=40_000_000))


def test_header_sizes_match_decoded(shared_data):
    for path in sorted((shared_data / "imagenet_sample").iterdir())[:10]:
        data = path.read_bytes()
        h, w = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR).shape[:2]
        assert header_size(data, "jpeg") == (w, h)
    img = np.zeros((7, 9, 3), np.uint8)
    for ext, fmt in ((".png", "png"), (".bmp", "bmp"), (".webp", "webp")):
        data = encode(img, ext)
        assert sniff_format(data) == fmt
        assert header_size(data, fmt) == (9, 7)


@pytest.mark.parametrize("data,match", [
    (b"", "empty"),
    (b"hello, I am a text file\n", "unknown format"),
    (b"\xff\xd8\xff\xe0" + b"\x00" * 10, "truncated or corrupt JPEG"),
])
def test_bad_bytes(data, match):
    with pytest.raises(InvalidInput, match=match):
        decode_image(data)


def test_truncated_jpeg(shared_data):
    data = (shared_data / "imagenet_sample" / "n01440764_tench.JPEG").read_bytes()
    with pytest.raises(InvalidInput, match="(?i)truncated|corrupt"):
        decode_image(data[: len(data) // 2])


def test_jpeg_with_trailing_bytes_is_fine(shared_data):
    data = (shared_data / "imagenet_sample" / "n01440764_tench.JPEG").read_bytes()
    assert decode_image(data + b"\x00" * 4096).shape == (375, 500, 3)


def test_gif_refused_by_default_accepted_when_enabled(shared_data):
    data = (shared_data / "imagenet_data" / "ant" / "imageNotFound.gif").read_bytes()
    with pytest.raises(InvalidInput, match="GIF images are not accepted"):
        decode_image(data)
    assert decode_image(data, DecodeLimits(formats=ALL_FORMATS)).shape == (300, 300, 3)


def test_colour_modes():
    gray = np.tile(np.arange(0, 250, 10, dtype=np.uint8), (5, 1))
    out = decode_image(encode(gray, ".png"))
    assert out.shape == (5, 25, 3) and out.dtype == np.float32
    np.testing.assert_array_equal(out[:, :, 0], gray)
    deep = (gray.astype(np.uint16) * 257)
    np.testing.assert_allclose(decode_image(encode(deep, ".png"))[:, :, 1], gray, atol=1e-3)
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[:, :, 2] = 200  # red in BGR order
    rgba[:2, :, 3] = 255  # top half opaque, bottom half transparent -> white
    out = decode_image(encode(rgba, ".png"))
    np.testing.assert_allclose(out[0, 0], [0, 0, 200])
    np.testing.assert_allclose(out[3, 0], [255, 255, 255])


def test_cmyk_jpeg_and_exif_orientation():
    from PIL import Image

    rgb = np.zeros((20, 40, 3), np.uint8)
    rgb[:, :20] = (255, 0, 0)  # left half red
    buf = io.BytesIO()
    Image.fromarray(rgb).convert("CMYK").save(buf, "JPEG", quality=95)
    out = decode_image(buf.getvalue())
    assert out.shape == (20, 40, 3)
    assert out[10, 5, 2] > 200 and out[10, 5, 0] < 60  # red (BGR) on the left

    buf = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    Image.fromarray(rgb).save(buf, "JPEG", quality=95, exif=exif)
    out = decode_image(buf.getvalue())
    assert out.shape == (40, 20, 3)  # orientation applied
    assert out[5, 10, 2] > 200  # the red half is now on top


def test_preprocess_shapes_and_values():
    img = np.full((300, 500, 3), 128.0, np.float32)
    x = preprocess(img, VGG_CAFFE_PREPROCESSING)
    assert x.shape == (3, 224, 224)
    np.testing.assert_allclose(x[:, 0, 0], 128.0 - np.array([103.939, 116.779, 123.68]),
                               rtol=1e-5)
    assert preprocess(img, VGG_CAFFE_PREPROCESSING, "keep_aspect", 224).shape == (3, 134, 224)
    c = preprocess(img, EFFICIENTNET_PREPROCESSING)
    assert c.shape == (3, 224, 224)
    np.testing.assert_allclose(c[:, 5, 5], (128 - 127) / 128, rtol=1e-5)


def test_read_items(shared_data):
    items = read_items(shared_data / "gymnast")
    assert len(items) == 6 and items == sorted(items)
    assert all(path.is_file() for _, path in items)


@pytest.mark.parametrize("pre", [VGG_CAFFE_PREPROCESSING, EFFICIENTNET_PREPROCESSING],
                         ids=["caffe-BGR", "RGB-std"])
def test_preprocess_is_the_plain_formula_bit_for_bit(pre):
    """preprocess writes (3, h, w) plane by plane; the values are those of the whole-image
    formula (x[colour order] - mean) / std, transposed."""
    from feature_server.images import _resize, input_size

    img = np.random.default_rng(3).uniform(0, 255, (300, 410, 3)).astype(np.float32)
    got = preprocess(img, pre)
    if pre.resize_mode == "shorter_crop":
        scale = pre.resize_shorter / 300
        nh, nw = max(pre.size, round(300 * scale)), max(pre.size, round(410 * scale))
        top, left = (nh - pre.size) // 2, (nw - pre.size) // 2
        x = _resize(img, nw, nh)[top:top + pre.size, left:left + pre.size]
    else:
        th, tw = input_size(img.shape[:2], pre.resize_mode, pre.size)
        x = _resize(img, tw, th)
    if pre.color_order == "RGB":
        x = x[:, :, ::-1]
    want = ((x - np.asarray(pre.mean, np.float32)) / np.asarray(pre.std, np.float32)
            ).transpose(2, 0, 1)
    assert got.dtype == np.float32 and got.flags.c_contiguous
    np.testing.assert_array_equal(got, want)


def test_colour_jpeg_fast_path_equals_the_general_conversion():
    from feature_server.images import to_bgr_float

    img = np.random.default_rng(4).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    fast = to_bgr_float(img)
    general = np.clip(img.astype(np.float32) * np.float32(1.0), 0.0, 255.0)
    assert fast.dtype == np.float32 and fast.flags.c_contiguous
    np.testing.assert_array_equal(fast, general)

"""Image decoding and preprocessing (OpenCV), pure functions: bytes in, arrays out.

Policy for odd inputs (each failure raises a domain error with a clear message):
- the pixel count is read from the file header (PNG, JPEG, GIF, BMP, WebP, TIFF - every IFD of
  a multi-page TIFF, and its tile size) BEFORE decoding, so a small file that claims
  30000x30000 is refused without allocating its pixels; a file with an accepted magic whose
  header cannot be parsed is refused too (nothing is decoded without a known size);
- formats outside ``DecodeLimits.formats`` are refused (GIF is off by default: in photo folders
  it is a placeholder or an animation, never a photo - e.g. ImageNet's ``imageNotFound.gif``);
- grayscale becomes 3 channels; alpha is composited over white; 16-bit is scaled to 0..255;
  CMYK JPEGs are converted by libjpeg; the JPEG EXIF orientation is applied.
"""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from dff_protos.errors import ImageTooLarge, InvalidInput, NotFound

from feature_server.models.registry import Preprocessing

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"})
DEFAULT_FORMATS = frozenset({"jpeg", "png", "bmp", "webp", "tiff"})
ALL_FORMATS = DEFAULT_FORMATS | {"gif"}


@dataclass(frozen=True)
class DecodeLimits:
    """What the decoder accepts: pixel count, encoded size and formats."""

    max_pixels: int = 50_000_000
    max_bytes: int = 64 * 1024 * 1024
    formats: frozenset[str] = DEFAULT_FORMATS


def sniff_format(data: bytes) -> str | None:
    """The container format from the magic bytes, or None when unknown."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if data[:2] == b"BM":
        return "bmp"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    return None


def _jpeg_markers(data: bytes) -> tuple[tuple[int, int] | None, int]:
    """((width, height) from the first SOF or None, offset of the first SOS or -1)."""
    i, n = 2, len(data)
    size = None
    while i + 4 <= n:
        if data[i] != 0xFF:
            break
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            i += 2
            continue
        if marker == 0xDA:  # start of scan: entropy-coded data follows
            return size, i
        length = struct.unpack(">H", data[i + 2:i + 4])[0]
        # SOF0..SOF15 except DHT (C4), JPG (C8), DAC (CC) carry the frame size
        if size is None and 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            if i + 9 > n:
                break
            h, w = struct.unpack(">HH", data[i + 5:i + 9])
            size = (w, h)
        i += 2 + length
    return size, -1


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    return _jpeg_markers(data)[0]


_TIFF_MAX_IFDS = 64


def _tiff_sizes(data: bytes) -> list[tuple[int, int]] | None:
    """(width, height) of every IFD of a TIFF (and each tile's size, when tiled), or None
    when the header cannot be parsed (bad offsets, loops, missing width/height)."""
    order = "<" if data[:2] == b"II" else ">"
    n = len(data)
    (offset,) = struct.unpack(order + "I", data[4:8])
    seen: set[int] = set()
    sizes: list[tuple[int, int]] = []
    types = {3: ("H", 2), 4: ("I", 4)}
    while offset:
        if offset in seen or len(seen) >= _TIFF_MAX_IFDS or offset + 2 > n:
            return None
        seen.add(offset)
        (count,) = struct.unpack(order + "H", data[offset:offset + 2])
        end = offset + 2 + 12 * count
        if end + 4 > n:
            return None
        tags: dict[int, int] = {}
        for e in range(count):
            base = offset + 2 + 12 * e
            tag, typ, cnt = struct.unpack(order + "HHI", data[base:base + 8])
            if tag in (256, 257, 322, 323) and typ in types and cnt >= 1:
                fmt, size = types[typ]
                (tags[tag],) = struct.unpack(order + fmt, data[base + 8:base + 8 + size])
        if 256 not in tags or 257 not in tags:
            return None
        sizes.append((tags[256], tags[257]))
        if 322 in tags or 323 in tags:
            sizes.append((tags.get(322, 0), tags.get(323, 0)))
        (offset,) = struct.unpack(order + "I", data[end:end + 4])
    return sizes or None


def header_size(data: bytes, fmt: str | None) -> tuple[int, int] | None:
    """(width, height) from the header without decoding, or None when it cannot be read.
    For a multi-page TIFF: the largest page (by pixels)."""
    try:
        if fmt == "png" and len(data) >= 24 and data[12:16] == b"IHDR":
            return struct.unpack(">II", data[16:24])
        if fmt == "gif" and len(data) >= 10:
            return struct.unpack("<HH", data[6:10])
        if fmt == "bmp" and len(data) >= 26:
            w, h = struct.unpack("<ii", data[18:26])
            return abs(w), abs(h)
        if fmt == "jpeg":
            return _jpeg_size(data)
        if fmt == "tiff" and len(data) >= 8:
            sizes = _tiff_sizes(data)
            return max(sizes, key=lambda s: s[0] * s[1]) if sizes else None
        if fmt == "webp" and len(data) >= 30:
            chunk = data[12:16]
            if chunk == b"VP8X":
                w = int.from_bytes(data[24:27], "little") + 1
                h = int.from_bytes(data[27:30], "little") + 1
                return w, h
            if chunk == b"VP8 ":
                w, h = struct.unpack("<HH", data[26:30])
                return w & 0x3FFF, h & 0x3FFF
            if chunk == b"VP8L":
                bits = int.from_bytes(data[21:25], "little")
                return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    except struct.error:
        return None
    return None


def check_header(data: bytes, limits: DecodeLimits = DecodeLimits()) -> tuple[str, int, int]:
    """(format, width, height) of an encoded image from its header alone, after every check
    that needs no decoding: size in bytes, format accepted, header parseable, pixel count.
    Raises InvalidInput or ImageTooLarge."""
    if not data:
        raise InvalidInput("empty image (0 bytes)")
    if len(data) > limits.max_bytes:
        raise ImageTooLarge(f"encoded image of {len(data)} bytes is above the limit of "
                            f"{limits.max_bytes} bytes")
    fmt = sniff_format(data)
    if fmt is None:
        raise InvalidInput(f"not a supported image (unknown format, first bytes "
                           f"{data[:8]!r}); accepted: {sorted(limits.formats)}")
    if fmt not in limits.formats:
        raise InvalidInput(f"{fmt.upper()} images are not accepted by this server "
                           f"(accepted: {sorted(limits.formats)})")
    size = header_size(data, fmt)
    if size is None:
        raise InvalidInput(f"truncated or corrupt {fmt.upper()} header (its size cannot be "
                           "read, so it is not decoded)")
    w, h = size
    if w <= 0 or h <= 0:
        raise InvalidInput(f"{fmt.upper()} header gives an empty size {w}x{h}")
    if w * h > limits.max_pixels:
        raise ImageTooLarge(f"{fmt.upper()} header says {w}x{h} = {w * h} pixels, above the "
                            f"limit of {limits.max_pixels}")
    return fmt, w, h


def decode_image(data: bytes, limits: DecodeLimits = DecodeLimits()) -> np.ndarray:
    """Encoded bytes -> (H, W, 3) float32 BGR on the 0..255 scale.

    Raises InvalidInput (empty, unknown/refused format, undecodable, truncated) or
    ImageTooLarge (pixel count above ``limits.max_pixels``, checked from the header first).
    """
    return to_bgr_float(_decode(data, limits))


def decode_pixels(data: bytes, limits: DecodeLimits = DecodeLimits()) -> np.ndarray | None:
    """For a client that decodes before it sends (a DecodedImage): the (H, W, 3) uint8 BGR
    pixels that :func:`decode_image` makes of ``data``, or None where its result is not plain
    8-bit colour (16-bit, float, alpha: send the file itself). Raises what decode_image
    raises, so a bad file is refused the same way on either side."""
    img = _decode(data, limits)
    if img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3:
        return np.ascontiguousarray(img)
    if img.dtype == np.uint8 and img.ndim == 2:  # grey PNG/TIFF: to_bgr_float repeats it
        return np.ascontiguousarray(np.repeat(img[:, :, None], 3, axis=2))
    return None


def check_pixels(shape: tuple[int, ...], dtype: np.dtype | type, limits: DecodeLimits
                 = DecodeLimits()) -> tuple[int, int]:
    """(height, width) of decoded pixels given instead of a file, which must be uint8
    (height, width, 3) BGR within ``limits.max_pixels``; InvalidInput / ImageTooLarge
    otherwise (checked before anything is allocated)."""
    if np.dtype(dtype) != np.uint8:
        raise InvalidInput(f"decoded pixels must be uint8, got {np.dtype(dtype).name}")
    if len(shape) != 3 or shape[2] != 3:
        raise InvalidInput(f"decoded pixels must have shape (height, width, 3) in BGR order, "
                           f"got {tuple(int(v) for v in shape)}")
    h, w = int(shape[0]), int(shape[1])
    if h < 1 or w < 1:
        raise InvalidInput(f"decoded pixels are empty ({w}x{h})")
    if h * w > limits.max_pixels:
        raise ImageTooLarge(f"decoded pixels {w}x{h} = {w * h} pixels, above the limit of "
                            f"{limits.max_pixels}")
    return h, w


def pixels_to_image(pixels: np.ndarray, limits: DecodeLimits = DecodeLimits()) -> np.ndarray:
    """Decoded pixels (uint8 (H, W, 3) BGR, see :func:`check_pixels`) -> what
    :func:`decode_image` returns for an 8-bit colour file of those pixels."""
    check_pixels(pixels.shape, pixels.dtype, limits)
    return to_bgr_float(pixels)


def pixels_to_png(pixels: np.ndarray, limits: DecodeLimits = DecodeLimits()) -> bytes:
    """Decoded pixels (checked as :func:`check_pixels`) as a lossless PNG file: decoded, the
    same pixels, so the same activations. For callers that can only send files."""
    check_pixels(pixels.shape, pixels.dtype, limits)
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(pixels))
    if not ok:
        raise InvalidInput("could not encode the pixels as PNG")
    return buf.tobytes()


def _decode(data: bytes, limits: DecodeLimits) -> np.ndarray:
    """The checked OpenCV decode of ``data`` (any depth and channel count)."""
    fmt, _, _ = check_header(data, limits)
    buf = np.frombuffer(data, dtype=np.uint8)
    if fmt == "jpeg":
        # COLOR applies EXIF orientation and converts CMYK/YCCK and grayscale to BGR
        img = cv2.imdecode(buf, cv2.IMREAD_COLOR | cv2.IMREAD_ANYDEPTH)
    else:
        img = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    if img is None or img.size == 0:
        raise InvalidInput(f"could not decode the {fmt.upper()} image (corrupt or truncated)")
    if fmt == "jpeg" and not _jpeg_complete(data):
        raise InvalidInput("truncated JPEG (no end-of-image marker)")
    if img.shape[0] * img.shape[1] > limits.max_pixels:
        raise ImageTooLarge(f"decoded image {img.shape[1]}x{img.shape[0]} is above the limit "
                            f"of {limits.max_pixels} pixels")
    return img


def _jpeg_complete(data: bytes) -> bool:
    """True when an end-of-image marker follows the first scan.

    libjpeg pads a truncated scan with grey and only warns, so truncation is checked here.
    In entropy-coded data 0xFF is always followed by 0x00 or RSTn, so any FFD9 after the
    first SOS is the EOI (an EXIF thumbnail's EOI comes before it); trailing bytes are fine.
    """
    _, sos = _jpeg_markers(data)
    # the last FFD9 is at or after the SOS exactly when any is; searched from the end it is
    # found at once in a normal file, instead of after a scan of the whole entropy-coded data
    return sos >= 0 and data.rfind(b"\xff\xd9") >= sos


def to_bgr_float(img: np.ndarray) -> np.ndarray:
    """Any decoded OpenCV array -> (H, W, 3) float32 BGR, 0..255 (alpha over white)."""
    if img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3:
        # what every colour JPEG decodes to: 0..255 already, nothing to scale, clip or blend
        return img.astype(np.float32)
    if img.dtype == np.uint8:
        scale = 1.0
    elif img.dtype == np.uint16:
        scale = 255.0 / 65535.0
    elif img.dtype in (np.float32, np.float64):
        scale = 255.0  # float images (TIFF/EXR) are 0..1 by convention
    else:
        raise InvalidInput(f"unsupported pixel type {img.dtype}")
    x = img.astype(np.float32) * np.float32(scale)
    if x.ndim == 2:
        x = x[:, :, None]
    channels = x.shape[2]
    if channels == 1:
        x = np.repeat(x, 3, axis=2)
    elif channels == 2:  # gray + alpha
        alpha = x[:, :, 1:2] / 255.0
        gray = x[:, :, :1] * alpha + 255.0 * (1.0 - alpha)
        x = np.repeat(gray, 3, axis=2)
    elif channels == 4:
        alpha = x[:, :, 3:4] / 255.0
        x = x[:, :, :3] * alpha + 255.0 * (1.0 - alpha)
    elif channels != 3:
        raise InvalidInput(f"unsupported channel count {channels}")
    return np.ascontiguousarray(np.clip(x, 0.0, 255.0, out=x))


def _resize(img: np.ndarray, width: int, height: int) -> np.ndarray:
    shrinking = width < img.shape[1] and height < img.shape[0]
    interp = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    return cv2.resize(img, (width, height), interpolation=interp)


def input_size(original: tuple[int, int], mode: str, size: int) -> tuple[int, int]:
    """(height, width) fed to the network for an image of ``original`` (height, width)."""
    h, w = original
    if mode == "squash":
        return size, size
    if mode == "keep_aspect":
        scale = size / max(h, w)
        return max(1, round(h * scale)), max(1, round(w * scale))
    if mode == "shorter_crop":
        return size, size
    raise InvalidInput(f"unknown resize mode {mode!r} (squash, keep_aspect)")


def network_input_size(original: tuple[int, int], pre: Preprocessing, mode: str | None = None,
                       size: int | None = None) -> tuple[int, int]:
    """(height, width) of what :func:`preprocess` makes of an image of ``original`` size."""
    mode = mode or pre.resize_mode
    size = size or pre.size
    if mode == "shorter_crop":
        return size, size
    return input_size(original, mode, size)


def preprocess(img: np.ndarray, pre: Preprocessing, mode: str | None = None,
               size: int | None = None) -> np.ndarray:
    """(H, W, 3) float32 BGR 0..255 -> (3, h, w) float32 network input per ``pre``.

    ``mode``/``size`` override the model default resize (not used for 'shorter_crop' models).
    """
    mode = mode or pre.resize_mode
    size = size or pre.size
    if mode == "shorter_crop":
        h, w = img.shape[:2]
        scale = pre.resize_shorter / min(h, w)
        nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
        resized = _resize(img, nw, nh)
        top, left = (nh - size) // 2, (nw - size) // 2
        x = resized[top:top + size, left:left + size]
    else:
        th, tw = input_size(img.shape[:2], mode, size)
        x = _resize(img, tw, th)
    if pre.color_order not in ("RGB", "BGR"):
        raise InvalidInput(f"unknown colour order {pre.color_order!r}")
    # straight into the (3, h, w) layout, one plane at a time: the same float32 operations
    # as (x - mean) / std on the whole image, without its temporaries and transposed copy
    mean, std = np.asarray(pre.mean, np.float32), np.asarray(pre.std, np.float32)
    out = np.empty((3, x.shape[0], x.shape[1]), np.float32)
    for c in range(3):
        src = 2 - c if pre.color_order == "RGB" else c
        np.subtract(x[:, :, src], mean[c], out=out[c])
        if std[c] != 1:
            np.divide(out[c], std[c], out=out[c])
    return out


def file_id(name: str) -> str:
    """An image id from a file name: the name itself, except that bytes which are not UTF-8
    (Python keeps them as lone surrogates, which HDF5, JSON, protobuf and OpenCV refuse or crash
    on) are written as ``\\xNN`` escapes."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def read_items(paths_or_dir: str | os.PathLike[str] | Iterable[str | os.PathLike[str]]
               ) -> list[tuple[str, Path]]:
    """Image files as (id, path): a folder's image files sorted (id = path relative to it),
    or the given files (id = file name)."""
    if isinstance(paths_or_dir, (str, os.PathLike)):
        paths_or_dir = [paths_or_dir]
    items: list[tuple[str, Path]] = []
    for entry in paths_or_dir:
        path = Path(entry)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*")
                           if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            items += [(file_id(str(p.relative_to(path))), p) for p in files]
        elif path.is_file():
            items.append((file_id(path.name), path))
        else:
            raise NotFound(f"no such image file or folder: {file_id(str(path))}")
    return items

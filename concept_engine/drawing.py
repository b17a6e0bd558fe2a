"""Pictures only: contours of concept regions and a legend drawn on an image (OpenCV).

Imported only where pictures are made (the Explain overlay, the exporter's images); the
algorithms in :mod:`concept_engine.heatmaps` return arrays and never import this module.
Images are (H, W, 3) uint8 BGR; polygons are (n, 2) int32 x, y in that image's pixels.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import cv2
import numpy as np

from concept_engine import compiled

#: The seed draws green contours of width 2; with several concepts each gets its own colour.
SEED_COLOR = (0, 255, 0)


def palette(k: int) -> list[tuple[int, int, int]]:
    """k distinct, saturated BGR colours (hues evenly spaced, starting at green)."""
    if k <= 0:
        return []
    hues = ((60 + np.arange(k) * 180 / k) % 180).astype(np.uint8)
    hsv = np.stack([hues, np.full(k, 255, np.uint8), np.full(k, 255, np.uint8)], axis=1)
    bgr = cv2.cvtColor(hsv[None], cv2.COLOR_HSV2BGR)[0]
    return [(int(row[0]), int(row[1]), int(row[2])) for row in bgr]


def to_uint8_bgr(image: np.ndarray) -> np.ndarray:
    """Any (H, W), (H, W, 1|3|4) image on the 0..255 scale as a new contiguous uint8 BGR
    array (never the caller's own: it may be drawn on)."""
    img = np.asarray(image)
    if img.ndim == 2:
        img = img[:, :, None]
    if img.shape[2] == 1:
        img = np.repeat(img, 3, axis=2)
    elif img.shape[2] == 4:
        img = img[:, :, :3]
    if img.dtype == np.uint8:  # 0..255 already: a plain copy (the callers draw on it)
        return np.array(img, order="C", copy=True)
    return np.ascontiguousarray(np.clip(img, 0, 255).astype(np.uint8))


def _uint8_bgr_view(image: np.ndarray) -> np.ndarray:
    """``image`` itself when it is already a C-contiguous, writable (H, W, 3) uint8 array (the
    one array type the compiled blend is built for), else :func:`to_uint8_bgr`'s copy; for
    callers that only read it."""
    img = np.asarray(image)
    if (img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
            and img.flags.c_contiguous and img.flags.writeable):  # one compiled type
        return img
    return to_uint8_bgr(img)


def draw_contours(image: np.ndarray, polygons: Sequence[Sequence[np.ndarray]],
                  colors: Sequence[tuple[int, int, int]] | None = None,
                  thickness: int = 2) -> np.ndarray:
    """A copy of ``image`` with polygons[j] (list of (n, 2) x, y) drawn in colors[j]."""
    out = to_uint8_bgr(image)
    colors = list(colors) if colors is not None else palette(len(polygons))
    for j, polys in enumerate(polygons):
        pts = [np.asarray(p, np.int32).reshape(-1, 1, 2) for p in polys if len(p)]
        if pts:
            # LINE_8, not anti-aliased: the drawn pixels are exactly the region's boundary
            cv2.drawContours(out, pts, -1, colors[j % len(colors)], thickness,
                             lineType=cv2.LINE_8)
    return out


def draw_legend(image: np.ndarray, labels: Sequence[str],
                colors: Sequence[tuple[int, int, int]]) -> np.ndarray:
    """``image`` with a white strip below it listing each label next to its colour swatch.

    The text height is about 1/16 of the image width (at least 12 px), so the legend stays
    readable when the picture is shown small (a gallery thumbnail); labels go in two columns
    when the image is wide enough."""
    if not labels:
        return to_uint8_bgr(image)
    img = _uint8_bgr_view(image)
    used = tuple(tuple(float(v) for v in c) for c in list(colors)[:len(labels)])
    strip = _legend_strip(tuple(labels), used, int(img.shape[1]))
    out = np.empty((img.shape[0] + strip.shape[0], img.shape[1], 3), np.uint8)
    out[:img.shape[0]] = img
    out[img.shape[0]:] = strip
    return out


def hershey_text(text: str) -> str:
    """``text`` as OpenCV's Hershey fonts can draw it: ASCII, anything else as ``?``. A file
    name's undecodable bytes (lone surrogates in Python) crash ``cv2.putText`` outright."""
    return text.encode("ascii", "replace").decode("ascii")


@functools.lru_cache(maxsize=64)
def _legend_strip(labels: tuple[str, ...], colors: tuple[tuple[float, ...], ...],
                  width: int) -> np.ndarray:
    """The strip of :func:`draw_legend`, drawn once per labels, colours and width (read-only):
    the dominant view's legend is the same on every picture of a class, and measuring and
    drawing its text took ~0.7 ms a picture."""
    labels = tuple(hershey_text(t) for t in labels)
    text_h = max(12, width // 16)
    scale = cv2.getFontScaleFromHeight(cv2.FONT_HERSHEY_SIMPLEX, text_h, 2)
    thick = max(1, text_h // 10)
    line = int(text_h * 1.6)
    widest = max(cv2.getTextSize(t, cv2.FONT_HERSHEY_SIMPLEX, scale, thick)[0][0] for t in labels)
    cols = 2 if len(labels) > 2 and 2 * (widest + line + 12) <= width else 1
    rows = (len(labels) + cols - 1) // cols
    strip = np.full((line * rows + 8, width, 3), 255, np.uint8)
    col_w = width // cols
    for i, (text, color) in enumerate(zip(labels, colors, strict=False)):
        r, c = divmod(i, cols)
        x, y = 4 + c * col_w, 4 + r * line
        cv2.rectangle(strip, (x, y + 3), (x + line - 8, y + line - 5), color, -1)
        cv2.putText(strip, text, (x + line - 2, y + int(text_h * 1.25)),
                    cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), thick, cv2.LINE_AA)
    strip.flags.writeable = False
    return strip


def dominant_view(image: np.ndarray, maps: np.ndarray, scales: Sequence[float],
                  colors: Sequence[tuple[int, int, int]] | None = None,
                  present: Sequence[bool] | None = None, max_alpha: float = 0.8) -> np.ndarray:
    """The DFF paper's picture: every pixel coloured by its dominant concept, the opacity by
    that concept's strength. maps (k, h, w) raw heatmaps (any resolution, upsampled bilinearly
    to the image); strength = map / scales[j] clipped to 0..1 (scales: a per-concept reference
    such as the largest value over the training images, so a weak concept stays faint); concepts
    not ``present`` are left out."""
    img = _uint8_bgr_view(image)  # only read: the picture is a new array
    maps = np.asarray(maps, np.float32)
    k = maps.shape[0]
    if k == 0:
        return to_uint8_bgr(img)
    colors = list(colors) if colors is not None else palette(k)
    height, width = img.shape[:2]
    # one upsampled map at a time, in place: the strongest strength so far and its concept
    # (ties keep the lower index, as argmax does)
    best = np.zeros((height, width), np.float32)
    dom = np.zeros((height, width), np.uint8 if k < 256 else np.int32)
    for j in range(k):
        if present is not None and not present[j]:
            continue
        strength = cv2.resize(maps[j], (width, height), interpolation=cv2.INTER_LINEAR)
        ref = np.float32(scales[j])
        if compiled.AVAILABLE:
            # one pass instead of four (divide, clip, the dominant index, the maximum)
            _strongest_kernel(strength, ref, bool(ref > 0), j, best, dom)
            continue
        if ref > 0:
            np.divide(strength, ref, out=strength)
        np.clip(strength, 0, 1, out=strength)
        np.copyto(dom, j, where=strength > best, casting="unsafe")
        np.maximum(best, strength, out=best)
    best *= np.float32(max_alpha)  # the opacity
    table = np.asarray(colors, np.float32)
    if compiled.AVAILABLE:
        # one pass per pixel instead of seven array passes and an (H, W, 3) colour gather
        # (4 of the 5.6 ms of a 500 x 375 picture); the same float32 operations, bit for bit
        result = np.empty_like(img)
        _blend_kernel(img, dom, best, table, result)
        return result
    return _blend_numpy(img, dom, best, table)


def _blend_numpy(img: np.ndarray, dom: np.ndarray, alpha: np.ndarray, table: np.ndarray
                 ) -> np.ndarray:
    """img * (1 - alpha) + table[dom] * alpha, as img + (colour - img) * alpha in float32,
    clipped to 0..255 and truncated to uint8."""
    out = img.astype(np.float32)
    blend = table[dom]
    blend -= out
    blend *= alpha[:, :, None]
    out += blend
    np.clip(out, 0, 255, out=out)
    return out.astype(np.uint8)


@compiled.jit
def _blend_kernel(img, dom, alpha, table, out):
    """:func:`_blend_numpy` pixel by pixel (no fast-math: the same float32 operations)."""
    height, width, channels = img.shape
    low = np.float32(0.0)
    high = np.float32(255.0)
    for y in range(height):
        for x in range(width):
            a = alpha[y, x]
            d = dom[y, x]
            for c in range(channels):
                o = np.float32(img[y, x, c])
                v = o + (table[d, c] - o) * a
                v = low if v < low else (high if v > high else v)
                out[y, x, c] = np.uint8(v)


@compiled.jit
def _strongest_kernel(strength, ref, divide, j, best, dom):
    """One concept's step of :func:`dominant_view` pixel by pixel, with NumPy's float32
    operations and NaN rules: s = clip(strength / ref, 0, 1); dom = j where s > best;
    best = maximum(best, s)."""
    zero = np.float32(0.0)
    one = np.float32(1.0)
    height, width = strength.shape
    for y in range(height):
        for x in range(width):
            s = strength[y, x]
            if divide:
                s = s / ref
            if s < zero:  # np.clip: a NaN stays NaN
                s = zero
            elif s > one:
                s = one
            b = best[y, x]
            if s > b:
                dom[y, x] = j
                best[y, x] = s
            elif s != s:  # np.maximum: NaN wins; on a tie the first argument stays
                best[y, x] = s


@compiled.register_warmer
def _warm_up() -> None:
    pixel = np.zeros((1, 1, 3), np.uint8)
    _strongest_kernel(np.zeros((1, 1), np.float32), np.float32(1.0), True, 0,
                      np.zeros((1, 1), np.float32), np.zeros((1, 1), np.uint8))
    _blend_kernel(pixel, np.zeros((1, 1), np.uint8), np.zeros((1, 1), np.float32),
                  np.zeros((1, 3), np.float32), np.empty_like(pixel))


def overlay(image: np.ndarray, polygons: Sequence[Sequence[np.ndarray]],
            certainties: Sequence[float] | None = None, legend: bool = True,
            thickness: int = 2, names: Sequence[str] | None = None,
            present: Sequence[bool] | None = None) -> np.ndarray:
    """Contours of every concept in its palette colour, plus a legend ("name  c") when
    ``legend``; a concept not ``present`` is listed as "absent"."""
    colors = palette(len(polygons))
    out = draw_contours(image, polygons, colors, thickness)
    if legend:
        labels = []
        for j in range(len(polygons)):
            label = names[j] if names is not None and j < len(names) and names[j] \
                else f"concept {j}"
            if present is not None and not present[j]:
                label += " (absent)"
            elif certainties is not None:
                label += f" {certainties[j]:.2g}"
            labels.append(label)
        out = draw_legend(out, labels, colors)
    return out


def encode_png(image: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", to_uint8_bgr(image))
    if not ok:  # pragma: no cover - PNG encoding of uint8 BGR does not fail
        raise RuntimeError("PNG encoding failed")
    return buf.tobytes()

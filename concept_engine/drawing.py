"""Pictures only: contours of concept regions and a legend drawn on an image (OpenCV).

Imported only where pictures are made (the Explain overlay, the exporter's images); the
algorithms in :mod:`concept_engine.heatmaps` return arrays and never import this module.
Images are (H, W, 3) uint8 BGR; polygons are (n, 2) int32 x, y in that image's pixels.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

#: The seed draws green contours of width 2; with several concepts each gets its own colour.
SEED_COLOR = (0, 255, 0)


def palette(k: int) -> list[tuple[int, int, int]]:
    """k distinct, saturated BGR colours (hues evenly spaced, starting at green)."""
    if k <= 0:
        return []
    hues = ((60 + np.arange(k) * 180 / k) % 180).astype(np.uint8)
    hsv = np.stack([hues, np.full(k, 255, np.uint8), np.full(k, 255, np.uint8)], axis=1)
    bgr = cv2.cvtColor(hsv[None], cv2.COLOR_HSV2BGR)[0]
    return [tuple(int(c) for c in row) for row in bgr]


def to_uint8_bgr(image: np.ndarray) -> np.ndarray:
    """Any (H, W), (H, W, 1|3|4) image on the 0..255 scale as contiguous uint8 BGR."""
    img = np.asarray(image)
    if img.ndim == 2:
        img = img[:, :, None]
    if img.shape[2] == 1:
        img = np.repeat(img, 3, axis=2)
    elif img.shape[2] == 4:
        img = img[:, :, :3]
    return np.ascontiguousarray(np.clip(img, 0, 255).astype(np.uint8))


def draw_contours(image: np.ndarray, polygons: Sequence[Sequence[np.ndarray]],
                  colors: Sequence[tuple[int, int, int]] | None = None,
                  thickness: int = 2) -> np.ndarray:
    """A copy of ``image`` with polygons[j] (list of (n, 2) x, y) drawn in colors[j]."""
    out = to_uint8_bgr(image).copy()
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
    """``image`` with a white strip below it listing each label next to its colour swatch."""
    img = to_uint8_bgr(image)
    if not labels:
        return img.copy()
    scale = max(0.35, min(1.0, img.shape[1] / 800))
    line = int(22 * scale) + 6
    strip = np.full((line * len(labels) + 6, img.shape[1], 3), 255, np.uint8)
    for i, (text, color) in enumerate(zip(labels, colors, strict=False)):
        y = 3 + i * line
        cv2.rectangle(strip, (4, y + 2), (4 + line - 6, y + line - 4), color, -1)
        cv2.putText(strip, text, (line + 4, y + line - 7), cv2.FONT_HERSHEY_SIMPLEX, 0.5 * scale
                    * 1.6, (0, 0, 0), 1, cv2.LINE_AA)
    return np.concatenate([img, strip], axis=0)


def overlay(image: np.ndarray, polygons: Sequence[Sequence[np.ndarray]],
            certainties: Sequence[float] | None = None, legend: bool = True,
            thickness: int = 2) -> np.ndarray:
    """Contours of every concept in its palette colour, plus a legend
    ("concept j  certainty c") when ``legend``."""
    colors = palette(len(polygons))
    out = draw_contours(image, polygons, colors, thickness)
    if legend:
        labels = [f"concept {j}" + (f"  certainty {certainties[j]:.3g}"
                                    if certainties is not None else "")
                  for j in range(len(polygons))]
        out = draw_legend(out, labels, colors)
    return out


def encode_png(image: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", to_uint8_bgr(image))
    if not ok:  # pragma: no cover - PNG encoding of uint8 BGR does not fail
        raise RuntimeError("PNG encoding failed")
    return buf.tobytes()

"""Pictures for notebooks: RGB arrays that show themselves, PNG bytes, HTML ``<img>`` tags.

The library draws in OpenCV's BGR order (concept_engine.drawing, exporter.report); everything
the Python API hands out is RGB. PNG encoding uses OpenCV (no Pillow).
"""

from __future__ import annotations

import base64
import html
from typing import Any

import cv2
import numpy as np


class Picture(np.ndarray):
    """An (H, W, 3) uint8 RGB image: a plain NumPy array (``plt.imshow`` it, slice it, save it)
    that Jupyter displays as a picture (``_repr_png_``)."""

    def __new__(cls, rgb: Any) -> Picture:
        return np.ascontiguousarray(rgb, dtype=np.uint8).view(cls)

    def _repr_png_(self) -> bytes | None:
        if self.ndim != 3 or self.shape[2] != 3 or min(self.shape[:2]) < 1:
            return None  # a slice that is no longer an image: text repr only
        return png_bytes(np.asarray(self))

    @property
    def png(self) -> bytes:
        """The picture as PNG bytes."""
        return png_bytes(np.asarray(self))

    def to_html(self, max_width: int | None = None, title: str = "") -> str:
        """An ``<img>`` tag with the PNG inlined (base64)."""
        return img_tag(np.asarray(self), max_width=max_width, title=title)


def from_bgr(image: np.ndarray) -> Picture:
    """A BGR uint8 image from the library as an RGB Picture."""
    return Picture(np.asarray(image)[:, :, ::-1])


def png_bytes(rgb: np.ndarray) -> bytes:
    """PNG bytes of an (H, W, 3) uint8 RGB array (OpenCV encoder)."""
    arr = np.ascontiguousarray(np.asarray(rgb, np.uint8)[:, :, ::-1])
    ok, buf = cv2.imencode(".png", arr)
    if not ok:  # pragma: no cover - PNG encoding of uint8 does not fail
        raise RuntimeError("PNG encoding failed")
    return buf.tobytes()


def shrink(rgb: np.ndarray, max_side: int) -> np.ndarray:
    """``rgb`` scaled down (area interpolation) so that its longer side is at most max_side."""
    h, w = rgb.shape[:2]
    s = max_side / max(h, w)
    if s >= 1:
        return np.asarray(rgb)
    size = (max(1, int(round(w * s))), max(1, int(round(h * s))))
    return cv2.resize(np.asarray(rgb), size, interpolation=cv2.INTER_AREA)


def img_tag(rgb: np.ndarray, max_width: int | None = None, title: str = "") -> str:
    data = base64.b64encode(png_bytes(rgb)).decode("ascii")
    style = f' style="max-width:{int(max_width)}px"' if max_width else ""
    alt = f' alt="{html.escape(title)}" title="{html.escape(title)}"' if title else ""
    return f'<img src="data:image/png;base64,{data}"{style}{alt}>'

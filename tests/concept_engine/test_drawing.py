"""Overlay pictures: colours, contours where the polygons are, the legend strip."""

from __future__ import annotations

import cv2
import numpy as np

from concept_engine import drawing


def test_palette_distinct_and_starts_green():
    colors = drawing.palette(6)
    assert len(set(colors)) == 6 and colors[0] == (0, 255, 0)
    assert drawing.palette(0) == []


def test_contours_drawn_on_polygon_only():
    img = np.zeros((50, 80, 3), np.uint8)
    square = np.array([[10, 10], [10, 30], [40, 30], [40, 10]], np.int32)
    out = drawing.draw_contours(img, [[square], []], thickness=1)
    assert out.shape == img.shape and not img.any()  # input untouched
    assert tuple(out[10, 25]) == (0, 255, 0) and tuple(out[20, 10]) == (0, 255, 0)
    assert not out[20, 25].any() and not out[45, 70].any()  # inside and outside stay black


def test_overlay_legend_and_png_roundtrip():
    img = np.full((40, 300), 128, np.uint8)  # grayscale input becomes BGR
    one_point = np.array([[5, 5]], np.int32)
    out = drawing.overlay(img, [[one_point], [], []], certainties=[0.5, 0.0, 1.0])
    assert out.shape[1] == 300 and out.shape[0] > 40 and out.shape[2] == 3
    back = cv2.imdecode(np.frombuffer(drawing.encode_png(out), np.uint8), cv2.IMREAD_COLOR)
    np.testing.assert_array_equal(back, out)

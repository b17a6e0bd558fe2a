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


def _legend_reference(image, labels, colors):
    # the legend drawn afresh (the strip's function without its cache)
    img = np.array(image, dtype=np.uint8, order="C", copy=True)
    used = tuple(tuple(float(v) for v in c) for c in list(colors)[:len(labels)])
    strip = drawing._legend_strip.__wrapped__(tuple(labels), used, img.shape[1])
    return np.concatenate([img, strip], axis=0)


def test_cached_legend_strips_draw_the_same_legend():
    rng = np.random.default_rng(1)
    cases = [(["ant 0.53", "leaf 0.2"], 768), (["a", "b", "c", "d", "e"], 900),
             (["only"], 40), (["x", "y", "z"], 300), (["ant 0.53", "leaf 0.2"], 768)]
    for labels, width in cases:
        image = rng.integers(0, 256, (50, width, 3), dtype=np.uint8)
        colors = drawing.palette(len(labels) + 1)  # more colours than labels: zip truncates
        got = drawing.draw_legend(image, labels, colors)
        np.testing.assert_array_equal(got, _legend_reference(image, labels, colors))
        # each call returns its own writable picture; the cached strip stays as drawn
        got[:] = 0
        again = drawing.draw_legend(image, labels, colors)
        np.testing.assert_array_equal(again, _legend_reference(image, labels, colors))
        assert not np.shares_memory(again, image)
    grey = rng.integers(0, 256, (30, 200), dtype=np.uint8)  # any image still converted first
    np.testing.assert_array_equal(drawing.draw_legend(grey, ["g"], [(1, 2, 3)]),
                                  _legend_reference(np.repeat(grey[:, :, None], 3, 2), ["g"],
                                                    [(1, 2, 3)]))


def test_dominant_view_reads_the_image_without_changing_it():
    rng = np.random.default_rng(2)
    image = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)
    before = image.copy()
    maps = rng.random((2, 5, 7)).astype(np.float32)
    out = drawing.dominant_view(image, maps, [1.0, 1.0])
    np.testing.assert_array_equal(image, before)
    assert out.shape == image.shape and not np.shares_memory(out, image)
    view = image[:, ::-1]  # not contiguous: a copy is made for the compiled blend
    np.testing.assert_array_equal(drawing.dominant_view(view, maps, [1.0, 1.0]),
                                  drawing.dominant_view(np.ascontiguousarray(view), maps,
                                                        [1.0, 1.0]))


def test_dominant_view_compiled_equals_numpy(monkeypatch):
    # the per-concept step and the blend are compiled; NumPy's path gives the same bits,
    # negative, zero and -0.0 strengths, ties and absent concepts included
    from concept_engine import compiled

    rng = np.random.default_rng(3)
    for trial in range(30):
        k = int(rng.integers(1, 5))
        maps = (rng.random((k, 6, 9)) * 3 - 0.5).astype(np.float32)
        maps[0, 0, 0] = -0.0
        if trial % 4 == 1 and k > 1:
            maps[1] = maps[0]  # ties keep the lower index
        image = rng.integers(0, 256, (int(rng.integers(5, 40)), int(rng.integers(5, 40)), 3),
                             dtype=np.uint8)
        scales = [float(v) for v in rng.choice([0.0, 0.5, 2.0], size=k)]
        present = [bool(v) for v in rng.random(k) > 0.2]
        got = drawing.dominant_view(image, maps, scales, present=present)
        monkeypatch.setattr(compiled, "AVAILABLE", False)
        want = drawing.dominant_view(image, maps, scales, present=present)
        monkeypatch.setattr(compiled, "AVAILABLE", True)
        np.testing.assert_array_equal(got, want)


def test_dominant_step_kernel_follows_numpys_nan_rules():
    # (a NaN strength makes the picture's blend undefined either way; the step itself keeps
    # NumPy's rules: clip keeps NaN, maximum lets NaN win, a comparison with NaN is false)
    strength = np.array([[np.nan, 0.5, 2.0, -1.0, 0.25]], np.float32)
    best = np.array([[0.1, np.nan, 0.5, 0.0, 0.25]], np.float32)
    dom = np.zeros((1, 5), np.uint8)
    s = np.clip(strength / np.float32(0.5), 0, 1)
    want_best, want_dom = np.maximum(best, s), np.where(s > best, 3, 0).astype(np.uint8)
    drawing._strongest_kernel(strength, np.float32(0.5), True, 3, best, dom)
    np.testing.assert_array_equal(best, want_best)
    np.testing.assert_array_equal(dom, want_dom)

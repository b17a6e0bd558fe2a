"""Heatmaps, significant regions and contours on tiny hand-checked arrays."""

from __future__ import annotations

import numpy as np
import pytest
from dff_protos.errors import InvalidInput

from concept_engine import heatmaps as hm


def test_heatmaps_reshape_matches_row_order():
    n, h, w, k = 2, 3, 4, 5
    W = np.arange(n * h * w * k, dtype=np.float32).reshape(n * h * w, k)
    maps = hm.heatmaps(W, n, h, w)
    assert maps.shape == (n, k, h, w)
    # row r = image i, pixel (y, x) with r = i*h*w + y*w + x
    assert maps[1, 3, 2, 1] == W[1 * h * w + 2 * w + 1, 3]
    with pytest.raises(InvalidInput):
        hm.heatmaps(W, 3, h, w)


def test_split_heatmaps_variable_sizes():
    sizes = [(2, 3), (4, 1)]
    W = np.arange(10 * 2, dtype=np.float32).reshape(10, 2)
    a, b = hm.split_heatmaps(W, sizes)
    assert a.shape == (2, 2, 3) and b.shape == (2, 4, 1)
    assert b[1, 3, 0] == W[6 + 3, 1]


def test_upsample_bilinear_constant_and_shape():
    maps = np.stack([np.full((2, 3), 4.0), np.zeros((2, 3))]).astype(np.float32)
    up = hm.upsample(maps, (37, 301))
    assert up.shape == (2, 37, 301) and up.dtype == np.float32
    np.testing.assert_allclose(up[0], 4.0)
    assert not up[1].any()


def test_normalize_max_nan_safe():
    maps = np.zeros((3, 4, 4), np.float32)
    maps[0, 1, 1] = 2.0
    maps[0, 2, 2] = 1.0
    maps[2, 0, 0] = np.nan
    out = hm.normalize_max(maps)
    assert np.isfinite(out).all()
    assert out[0].max() == 1.0 and out[0, 2, 2] == 0.5
    assert not out[1].any()  # empty concept stays zero, no NaN
    assert not out[2].any()


def test_regions_threshold_and_min_area():
    m = np.zeros((10, 10), np.float32)
    m[0:3, 0:3] = 1.0     # 9 px
    m[8, 8] = 0.9         # 1 px
    m[5, 5] = 0.5         # below threshold
    reg = hm.regions(m, threshold=0.75, min_area=0.05)  # 5 px minimum
    assert [c.area for c in reg.components] == [9]
    assert reg.labels[1, 1] == 1 and reg.labels[8, 8] == 0
    assert reg.components[0].bbox == (0, 0, 3, 3)
    reg = hm.regions(m, threshold=0.75, min_area=0.0)
    assert sorted(c.area for c in reg.components) == [1, 9]


def test_empty_concept_has_no_region():
    reg = hm.regions(np.zeros((8, 8), np.float32), threshold=0.0, min_area=0.0)
    assert reg.components == [] and not reg.labels.any()
    assert hm.contours(reg.labels) == []
    polys = hm.concept_polygons(np.zeros((2, 3, 3), np.float32), (20, 30))
    assert polys == [[], []]


def test_one_pixel_region_contour():
    mask = np.zeros((5, 7), np.uint8)
    mask[2, 4] = 1
    (poly,) = hm.contours(mask)
    assert poly.dtype == np.int32 and poly.shape == (1, 2)
    assert poly.tolist() == [[4, 2]]  # x, y


def test_contours_traced_on_mask_coordinates():
    mask = np.zeros((20, 30), np.uint8)
    mask[5:10, 12:20] = 1
    (poly,) = hm.contours(mask)
    assert poly.shape[1] == 2
    assert poly[:, 0].min() == 12 and poly[:, 0].max() == 19   # x
    assert poly[:, 1].min() == 5 and poly[:, 1].max() == 9     # y


def test_odd_aspect_ratio_original_size():
    # one hot cell in a 2 x 14 feature map -> a region in a 37 x 301 image at the right place
    maps = np.zeros((1, 2, 14), np.float32)
    maps[0, 1, 13] = 3.0
    (polys,) = hm.concept_polygons(maps, (37, 301), threshold=0.75, min_area=0.0)
    assert len(polys) == 1
    p = polys[0]
    assert p[:, 0].max() <= 300 and p[:, 1].max() <= 36 and p.min() >= 0
    assert p[:, 0].min() > 250 and p[:, 1].min() > 18  # bottom-right corner


def test_min_area_must_be_fraction():
    with pytest.raises(InvalidInput):
        hm.regions(np.ones((4, 4), np.float32), min_area=5)


def test_regions_statistics_equal_opencvs():
    # regions() labels with cv2.connectedComponents and takes the statistics from the selected
    # pixels itself: the same labels, areas, boxes and centroids as OpenCV's own statistics
    import cv2

    rng = np.random.default_rng(5)
    for trial in range(60):
        h, w = (int(v) for v in rng.integers(1, 60, 2))
        m = rng.random((h, w)).astype(np.float32) ** (1 + trial % 4)
        reg = hm.regions(m, 0.6, 0.0)
        binary = (m >= 0.6).astype(np.uint8)
        if not binary.any():
            assert reg.components == [] and not reg.labels.any()
            continue
        n, cc, stats, cent = cv2.connectedComponentsWithStats(binary, connectivity=8,
                                                              ltype=cv2.CV_32S)
        np.testing.assert_array_equal(reg.labels, cc)  # all kept (min_area 0): labels as is
        assert [(c.area, c.bbox, c.centroid) for c in reg.components] == [
            (int(stats[i, 4]), tuple(int(v) for v in stats[i, :4]),
             (float(cent[i, 0]), float(cent[i, 1]))) for i in range(1, n)]
        # with a minimum area, the kept ones are relabelled densely in OpenCV's order
        frac = 3.0 / (h * w)
        need = max(1, int(np.ceil(frac * h * w)))
        big = hm.regions(m, 0.6, frac)
        kept = [i for i in range(1, n) if stats[i, 4] >= need]
        want = np.zeros_like(cc)
        for new, old in enumerate(kept, 1):
            want[cc == old] = new
        np.testing.assert_array_equal(big.labels, want)
        assert [c.area for c in big.components] == [int(stats[i, 4]) for i in kept]


def test_normalize_max_fast_path_equals_the_general_one():
    # finite non-negative float32 maps take a shorter path: the same bits as the general
    # chain (where/maximum/max/divide), -0.0 and all-zero maps included
    def general(maps):
        maps = np.maximum(np.where(np.isfinite(maps), maps, 0).astype(np.float32), 0)
        peak = maps.max(axis=(-2, -1), keepdims=True)
        return np.where(peak > 0, maps / np.where(peak > 0, peak, 1), 0).astype(np.float32)

    rng = np.random.default_rng(6)
    maps = rng.gamma(0.5, 1.0, (4, 9, 7)).astype(np.float32)
    maps[1] = 0
    maps[2, 0, 0] = -0.0
    got = hm.normalize_max(maps)
    want = general(maps)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, want)
    assert not np.signbit(got).any()

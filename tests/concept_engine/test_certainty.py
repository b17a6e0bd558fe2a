"""Concept certainty: the seed's definition, hand-checked values, NaN-free edge cases, and the
bilinear upsampling against torch (what the seed used) and OpenCV."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from concept_engine.certainty import bilinear_matrix, concept_certainty, upsample_bilinear


def seed_certainty_reference(maps: np.ndarray, size=(224, 224), threshold=0.1) -> np.ndarray:
    """The seed's computation, map by map, with cv2 bilinear and a guarded division."""
    N, k = maps.shape[:2]
    out = np.zeros((N, k))
    for i in range(N):
        for j in range(k):
            up = cv2.resize(
                maps[i, j].astype(np.float32), size[::-1], interpolation=cv2.INTER_LINEAR
            ).astype(np.float64)
            if up.max() <= 0:
                continue
            sel = up / up.max() >= threshold
            out[i, j] = up[sel].mean()
    return out


def test_hand_checked_2x2_to_4x4():
    # Rows/cols of the 4x4 upsampling of [0, 1] are [0, .25, .75, 1] (half-pixel centres,
    # clamped borders), so the map is their outer product. Normalised values >= 0.1 are the
    # 8 products other than 0 and .25*.25; their mean is 3.9375 / 8.
    m = np.array([[[[0.0, 0.0], [0.0, 1.0]]]], dtype=np.float32)
    up = upsample_bilinear(m[0], (4, 4))[0]
    a = np.array([0.0, 0.25, 0.75, 1.0])
    np.testing.assert_allclose(up, np.outer(a, a), atol=1e-7)
    cert = concept_certainty(m, upsample_to=(4, 4))
    assert cert.shape == (1, 1) and cert.dtype == np.float32
    assert cert[0, 0] == pytest.approx(3.9375 / 8, abs=1e-7)


def test_all_zero_and_empty_concepts_give_zero_not_nan():
    maps = np.zeros((3, 2, 14, 14), dtype=np.float32)
    maps[1, 0, 3, 4] = 2.0
    cert = concept_certainty(maps)
    assert np.isfinite(cert).all()
    assert cert[0, 0] == 0 and cert[0, 1] == 0 and cert[1, 1] == 0 and cert[2, 1] == 0
    assert cert[1, 0] > 0


def test_one_pixel_map_matches_seed_reference():
    maps = np.zeros((1, 1, 14, 14), dtype=np.float32)
    maps[0, 0, 5, 9] = 3.0
    got = concept_certainty(maps)
    want = seed_certainty_reference(maps)
    assert got[0, 0] == pytest.approx(want[0, 0], rel=1e-5)
    # The 16x16 tent of one source pixel: its cut at 0.1 keeps weights >= 0.1 in 2-D.
    w1 = bilinear_matrix(14, 224)[:, 9]  # 1-D weights of source column 9
    w2 = bilinear_matrix(14, 224)[:, 5]
    tent = 3.0 * np.outer(w2, w1)
    sel = tent / tent.max() >= 0.1
    assert got[0, 0] == pytest.approx(tent[sel].mean(), rel=1e-5)


def test_constant_map_certainty_is_the_constant():
    maps = np.full((2, 3, 7, 7), 0.5, dtype=np.float32)
    np.testing.assert_allclose(concept_certainty(maps), 0.5, rtol=1e-6)


def test_random_maps_match_seed_reference_and_no_upsampling_mode():
    rng = np.random.default_rng(0)
    maps = (rng.random((3, 4, 14, 14)) * (rng.random((3, 4, 14, 14)) < 0.2)).astype(np.float32)
    maps[2, 3] = 0
    got = concept_certainty(maps)
    np.testing.assert_allclose(got, seed_certainty_reference(maps), rtol=1e-5, atol=1e-7)
    raw = concept_certainty(maps, upsample_to=None)
    m = maps[0, 0].astype(np.float64)
    assert raw[0, 0] == pytest.approx(m[m / m.max() >= 0.1].mean(), rel=1e-6)
    assert raw[2, 3] == 0


def test_upsampling_matches_torch_bilinear_align_corners_false():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    maps = rng.random((5, 14, 14)).astype(np.float32)
    want = torch.nn.functional.interpolate(
        torch.from_numpy(maps)[None], size=(224, 224), mode="bilinear", align_corners=False
    )[0].numpy()
    np.testing.assert_allclose(upsample_bilinear(maps, (224, 224)), want, rtol=1e-5, atol=1e-6)
    # Non-square and non-integer scale factors too.
    want = torch.nn.functional.interpolate(
        torch.from_numpy(maps[:, :9, :13])[None],
        size=(31, 50),
        mode="bilinear",
        align_corners=False,
    )[0].numpy()
    got = upsample_bilinear(np.ascontiguousarray(maps[:, :9, :13]), (31, 50))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_rejects_wrong_rank():
    with pytest.raises(ValueError):
        concept_certainty(np.zeros((2, 14, 14), dtype=np.float32))


@pytest.mark.gpu
def test_cupy_certainty_matches_numpy():
    import cupy  # noqa: PLC0415 - only in the GPU test

    from concept_engine.backend import get_namespace, to_device, to_host

    rng = np.random.default_rng(2)
    maps = (rng.random((4, 3, 14, 14)) * (rng.random((4, 3, 14, 14)) < 0.2)).astype(np.float32)
    maps[0, 0] = 0
    got = concept_certainty(to_device(maps, cupy))
    assert get_namespace(got) is cupy
    np.testing.assert_allclose(to_host(got), concept_certainty(maps), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(("shape", "size"), [
    ((6, 5, 14, 14), (224, 224)),
    ((3, 4, 7, 9), (100, 130)),   # keep-aspect maps and inputs
    ((4, 3, 14, 14), None),       # at feature resolution
])
def test_compiled_kernel_matches_the_matrix_form(monkeypatch, shape, size):
    from concept_engine import compiled

    if not compiled.AVAILABLE:
        pytest.skip("needs Numba")
    rng = np.random.default_rng(3)
    maps = (rng.random(shape) * (rng.random(shape) < 0.3)).astype(np.float32)
    maps[0, 0] = 0  # an all-zero concept
    maps[1, 1] = 0.25  # a constant one
    fast = concept_certainty(maps, size)
    monkeypatch.setattr(compiled, "AVAILABLE", False)
    slow = concept_certainty(maps, size)
    assert fast.dtype == slow.dtype == np.float32 and fast.shape == slow.shape
    np.testing.assert_allclose(fast, slow, rtol=2e-5, atol=1e-7)
    assert fast[0, 0] == 0 and fast[1, 1] == pytest.approx(0.25, rel=1e-6)


def test_non_finite_maps_take_the_numpy_path(monkeypatch):
    from concept_engine import compiled

    maps = np.random.default_rng(5).random((2, 3, 7, 7)).astype(np.float32)
    maps[1, 2, 3, 3] = np.nan
    maps[0, 1, 0, 0] = np.inf
    with np.errstate(all="ignore"):  # NaN and inf meet in the products, as they would
        fast = concept_certainty(maps, (28, 28))
        monkeypatch.setattr(compiled, "AVAILABLE", False)
        slow = concept_certainty(maps, (28, 28))
    np.testing.assert_array_equal(np.isnan(fast), np.isnan(slow))
    np.testing.assert_allclose(fast[np.isfinite(slow)], slow[np.isfinite(slow)], rtol=2e-5)

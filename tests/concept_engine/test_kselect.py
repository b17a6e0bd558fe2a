"""k selection: the planted k is found, every curve is recorded, the chosen fit is reused."""

from __future__ import annotations

import numpy as np
import pytest

from concept_engine.kselect import (
    CertaintyCriterion,
    ElbowCriterion,
    StabilityCriterion,
    select_k,
)
from concept_engine.nmf import nmf_fit


def planted_images(
    n_images: int = 40, hw=(6, 6), C: int = 48, k: int = 4, noise: float = 0.05, seed: int = 0
) -> np.ndarray:
    """V (n_images*h*w, C): every pixel mostly one of k planted parts, plus Gaussian noise."""
    rng = np.random.default_rng(seed)
    n = n_images * hw[0] * hw[1]
    H = rng.random((k, C)) * (rng.random((k, C)) < 0.4)
    W = np.zeros((n, k))
    W[np.arange(n), rng.integers(0, k, n)] = rng.random(n) + 0.5
    mixed = rng.random(n) < 0.3
    W[mixed, rng.integers(0, k, int(mixed.sum()))] += rng.random(int(mixed.sum()))
    return np.maximum(W @ H + noise * rng.standard_normal((n, C)), 0).astype(np.float32)


@pytest.fixture(scope="module")
def V4() -> np.ndarray:
    return planted_images()


@pytest.fixture(scope="module")
def stability_selection(V4):
    return select_k(V4, 40, (6, 6), ks=range(2, 7), criterion="stability", seed=0)


def test_stability_finds_planted_k_and_records_all_curves(stability_selection):
    sel = stability_selection
    assert sel.k == 4
    assert sel.criterion == "stability"
    assert set(sel.curves) == {"certainty", "stability", "elbow"}
    for curve in sel.curves.values():
        assert sorted(curve) == [2, 3, 4, 5, 6]
        assert all(np.isfinite(v) for v in curve.values())
    assert sorted(sel.fits) == [2, 3, 4, 5, 6]
    assert sel.fit is sel.fits[4] and sel.fit.H.shape == (4, 48)
    assert sel.curves["stability"][4] > 0.99
    assert "largest k" in sel.reason
    # The elbow curve is the fits' own errors.
    assert sel.curves["elbow"] == {k: f.error for k, f in sel.fits.items()}


def test_elbow_and_certainty_reuse_given_fits(V4, stability_selection):
    fits = stability_selection.fits
    sel = select_k(V4, 40, 36, criterion="elbow", record=("elbow",), fits=fits)
    assert sel.k == 4
    assert set(sel.curves) == {"elbow"}
    assert all(sel.fits[k] is fits[k] for k in fits)  # nothing refitted
    sel_c = select_k(V4, 40, (6, 6), criterion="certainty", record=(), fits=fits)
    assert set(sel_c.curves) == {"certainty"}
    curve = sel_c.curves["certainty"]
    assert sel_c.k == max(curve, key=curve.get)


def test_stability_rule_is_largest_k_within_tolerance():
    crit = StabilityCriterion(tolerance=0.02)
    assert crit.choose({2: 0.99, 3: 0.95, 4: 0.98, 5: 0.90})[0] == 4
    assert crit.choose({2: 0.99, 3: 0.80})[0] == 2


def test_elbow_rule():
    crit = ElbowCriterion()
    assert crit.choose({2: 100.0, 3: 60.0, 4: 10.0, 5: 9.0, 6: 8.5})[0] == 4
    assert crit.choose({2: 1.0, 3: 1.0})[0] == 2
    assert crit.choose({2: 1.0, 3: 1.0, 4: 1.0})[0] == 2


def test_certainty_rule_ties_go_to_smallest_k():
    assert CertaintyCriterion().choose({2: 0.5, 3: 0.5, 4: 0.4})[0] == 2


def test_custom_criterion_instance_and_bad_arguments(V4):
    fits = {k: nmf_fit(V4, k, max_iter=20) for k in (2, 3)}
    sel = select_k(
        V4, 40, (6, 6), ks=(2, 3), criterion=StabilityCriterion(n_splits=1), record=(), fits=fits
    )
    assert set(sel.curves) == {"stability"} and sel.k in (2, 3)
    with pytest.raises(ValueError, match="rows"):
        select_k(V4, 41, (6, 6))
    with pytest.raises(ValueError, match="criterion"):
        select_k(V4, 40, (6, 6), criterion="aic")
    with pytest.raises(ValueError, match="square"):
        select_k(V4, 40, 35)


def test_per_image_sizes_match_uniform_layout():
    """A sequence of per-image (h, w) gives the same curves as one uniform size."""
    V = planted_images(n_images=20)
    uniform = select_k(V, 20, (6, 6), ks=(2, 3, 4), seed=1)
    per_image = select_k(V, 20, [(6, 6)] * 20, ks=(2, 3, 4), seed=1)
    assert uniform.k == per_image.k
    for name, curve in uniform.curves.items():
        for k, v in curve.items():
            assert per_image.curves[name][k] == pytest.approx(v, rel=1e-6)


def test_mixed_sizes_rows_checked():
    V = planted_images(n_images=4)  # 4 images of 6x6 = 144 rows
    sizes = [(6, 6), (4, 9), (9, 4), (3, 12)]
    sel = select_k(V, 4, sizes, ks=(2,), record=("certainty", "elbow"), criterion="elbow")
    assert sel.k == 2
    with pytest.raises(ValueError, match="sum of h\\*w"):
        select_k(V, 4, [(6, 6), (6, 6), (6, 6), (6, 7)], ks=(2,))


def test_progress_once_per_fit(V4):
    calls = []
    select_k(V4, 40, (6, 6), ks=(2, 3), criterion="stability",
             progress=lambda done, total, msg: calls.append((done, total, msg)))
    # 2 full fits + 2 splits x 2 ks x (2 halves reported as one step)
    assert [c[:2] for c in calls] == [(i, 6) for i in range(1, 7)]
    assert calls[0][2] == "fit k=2" and "stability split" in calls[-1][2]


def realistic_planted(k: int, n_images: int = 24, hw=(14, 14), C: int = 128, seed: int = 0,
                      noise: float = 0.05) -> np.ndarray:
    """V like conv5_4 after ReLU: ~90% zeros, per-image spatial structure (each concept is
    present in ~60% of the images as 1-2 smooth blobs on the 14 x 14 grid), sparse non-negative
    bases (30% of the channels), noise, then a ReLU with a bias at the 90% quantile."""
    rng = np.random.default_rng([seed, k])
    H = rng.gamma(2.0, 1.0, (k, C)) * (rng.random((k, C)) < 0.3)
    h, w = hw
    yy, xx = np.mgrid[0:h, 0:w]
    blocks = []
    for _ in range(n_images):
        Wi = np.zeros((h, w, k))
        for j in range(k):
            if rng.random() < 0.6:
                for _ in range(rng.integers(1, 3)):
                    cy, cx, s = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(1.2, 2.5)
                    Wi[:, :, j] += rng.uniform(0.5, 1.5) * np.exp(
                        -((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s * s))
        blocks.append(Wi.reshape(h * w, k))
    X = np.concatenate(blocks) @ H
    X = X + noise * X.std() * rng.standard_normal(X.shape)
    return np.maximum(X - np.quantile(X, 0.90), 0).astype(np.float32)


@pytest.mark.slow
@pytest.mark.parametrize("k", range(2, 9))
def test_default_criterion_recovers_realistic_planted_k(k):
    from concept_engine.discovery import DiscoveryOptions

    V = realistic_planted(k)
    assert 0.88 <= (V == 0).mean() <= 0.92
    default = DiscoveryOptions().k_criterion
    sel = select_k(V, 24, (14, 14), ks=range(2, k + 2), criterion=default, record=(default,))
    assert sel.k == k, sel.curves


@pytest.mark.slow
@pytest.mark.parametrize("k", [3])
def test_instability_recovers_realistic_planted_k(k):
    sel = select_k(realistic_planted(k), 24, (14, 14), ks=range(2, k + 3),
                   criterion="instability", record=("instability",))
    assert sel.k == k, sel.curves
    assert sel.curves["instability"][k] < 0.02 < sel.curves["instability"][k + 1]


@pytest.mark.slow
@pytest.mark.parametrize("k", [2, 5, 8])
def test_bcv_recovers_realistic_planted_k(k):
    sel = select_k(realistic_planted(k), 24, (14, 14), ks=range(2, k + 2), criterion="bcv",
                   record=("bcv",))
    assert sel.k == k, sel.curves
    curve = sel.curves["bcv"]
    if k > 2:  # a missing concept costs a lot, an extra one gains almost nothing
        assert curve[k - 1] - curve[k] > 0.05 > curve[k] - curve[k + 1]

"""Hungarian matching of bases and the k -> k+1 hierarchy."""

from __future__ import annotations

import numpy as np
import pytest

from concept_engine.matching import cosine_matrix, hierarchy, match_bases


def test_permuted_and_scaled_bases_match_exactly():
    rng = np.random.default_rng(0)
    H = rng.random((5, 20))
    order = np.array([3, 0, 4, 1, 2])
    perm, cos = match_bases(H, 7.0 * H[order])
    # Row i of H is row j of H[order] where order[j] == i.
    np.testing.assert_array_equal(order[perm], np.arange(5))
    np.testing.assert_allclose(cos, 1.0)


def test_hungarian_beats_greedy():
    # Unit rows built so that cos = [[0.6, 0.5], [0.5, 0.05]]: greedy takes 0.6 then 0.05
    # (total 0.65); the optimal assignment crosses (0.5 + 0.5 = 1.0).
    A = np.array([[1.0, 0, 0], [0, 1.0, 0]])
    B = np.array([[0.6, 0.5, np.sqrt(1 - 0.36 - 0.25)], [0.5, 0.05, np.sqrt(1 - 0.25 - 0.0025)]])
    np.testing.assert_allclose(cosine_matrix(A, B), [[0.6, 0.5], [0.5, 0.05]], atol=1e-12)
    perm, cos = match_bases(A, B)
    assert list(perm) == [1, 0]
    np.testing.assert_allclose(cos, [0.5, 0.5])


def test_rectangular_and_zero_rows():
    A = np.array([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 0]])
    B = np.array([[0, 2.0, 0], [3.0, 0, 0]])
    sim = cosine_matrix(A, B)
    assert np.isfinite(sim).all() and (sim[2] == 0).all()
    perm, cos = match_bases(A, B)
    assert list(perm[:2]) == [1, 0] and perm[2] == -1 and cos[2] == 0
    perm_b, cos_b = match_bases(B, A)
    assert list(perm_b) == [1, 0]
    np.testing.assert_allclose(cos_b, 1.0)


def test_hierarchy_parents():
    H_k = np.array([[1.0, 1.0, 0, 0], [0, 0, 1.0, 1.0]])
    H_k1 = np.array([[1.0, 0.2, 0, 0], [0, 0, 0, 1.0], [0.1, 1.0, 0, 0]])
    np.testing.assert_array_equal(hierarchy(H_k, H_k1), [0, 1, 0])
    parents, cos = hierarchy(H_k, H_k1, return_cosines=True)
    assert cos[1] == pytest.approx(1 / np.sqrt(2))


def test_shape_mismatch():
    with pytest.raises(ValueError):
        match_bases(np.ones((2, 3)), np.ones((2, 4)))

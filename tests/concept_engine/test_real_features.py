"""NMF on REAL VGG-19 conv5_4 activations of the ant photos (not synthetic data):
- our final reconstruction error is no worse than scikit-learn's NMF at the same k, start
  and iteration budget;
- multiplicative updates equal a plain dense reference implementation step for step."""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest

from concept_engine.nmf import nmf_fit, nmf_init, prepare_v

pytestmark = pytest.mark.slow

N_IMAGES = 16
K = 4
ITERS = 40


@pytest.fixture(scope="module")
def V(shared_data) -> np.ndarray:
    """(16 * 196, 512) float32 conv5_4 rows of the first 16 ant JPEGs."""
    from feature_server.extractor import ExtractOptions, Extractor

    extractor = Extractor.from_cache(os.environ.get("DFF_HOME"), batch_size=8)
    paths = sorted((shared_data / "imagenet_data" / "ant").glob("*.jpg"))[:N_IMAGES]
    items = [(p.name, p.read_bytes()) for p in paths]
    rows = {}
    for res in extractor.extract(items, ExtractOptions()):
        assert res.error is None, res.error
        act = res.activations["conv5_4"]
        assert act.shape == (512, 14, 14)
        rows[res.id] = act.reshape(512, -1).T
    V = np.concatenate([rows[p.name] for p in paths]).astype(np.float32)
    assert 0.8 < (V == 0).mean() < 0.99  # real ReLU activations: mostly zeros
    return V


def _sklearn_error(V, W0, H0, solver: str) -> float:
    from sklearn.decomposition import NMF as SkNMF

    model = SkNMF(K, init="custom", solver=solver, max_iter=ITERS, tol=0.0, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn warns that max_iter was reached: intended
        W = model.fit_transform(V.astype(np.float64), W=W0.astype(np.float64).copy(),
                                H=H0.astype(np.float64).copy())
    return float(np.linalg.norm(V - W @ model.components_))


@pytest.mark.parametrize(("ours", "theirs"), [("hals", "cd"), ("mu", "mu")])
def test_error_no_worse_than_sklearn(V, ours, theirs):
    W0, H0 = nmf_init(V, K, init="nndsvda", seed=0)
    res = nmf_fit(prepare_v(V), K, solver=ours, W=W0.copy(), H=H0.copy(), max_iter=ITERS,
                  tol=0.0)
    assert res.n_iter == ITERS
    dense = float(np.linalg.norm(V - res.W @ res.H))
    assert res.error == pytest.approx(dense, rel=1e-4)  # the residual-free error is exact
    sk = _sklearn_error(V, W0, H0, theirs)
    # float32 compute against sklearn's float64: allow rounding, nothing more
    assert res.error <= sk * (1 + 1e-4), (ours, res.error, theirs, sk)


def test_mu_matches_plain_reference_step_by_step(V):
    """The textbook Lee-Seung updates (H first, then W, zero denominators -> 1e-7), dense."""
    W, H = nmf_init(V, K, init="seed", seed=3)
    Vd = V.astype(np.float64)
    Wr, Hr = W.astype(np.float64), H.astype(np.float64)
    for step in range(1, 6):
        den = Wr.T @ Wr @ Hr
        Hr = Hr * (Wr.T @ Vd) / np.where(den == 0, 1e-7, den)
        den = Wr @ Hr @ Hr.T
        Wr = Wr * (Vd @ Hr.T) / np.where(den == 0, 1e-7, den)
        res = nmf_fit(V, K, solver="mu", W=W.copy(), H=H.copy(), max_iter=step, tol=0.0)
        np.testing.assert_allclose(res.H, Hr, rtol=2e-4, atol=1e-6 * np.abs(Hr).max())
        np.testing.assert_allclose(res.W, Wr, rtol=2e-4, atol=1e-6 * np.abs(Wr).max())

"""The NMF estimator follows scikit-learn's estimator contract (issue 10 part 4), checked with
scikit-learn's own estimator checks, while the runtime never imports scikit-learn."""

from __future__ import annotations

import subprocess
import sys
import warnings

import numpy as np
import pytest

from concept_engine.nmf import NMF, NotFittedError

sklearn = pytest.importorskip("sklearn")
from sklearn.base import clone  # noqa: E402
from sklearn.utils.estimator_checks import parametrize_with_checks  # noqa: E402

with warnings.catch_warnings():
    # scikit-learn notes that NMF does not inherit BaseEstimator: that is the point (no
    # runtime dependency); the checks below are what decide compatibility.
    warnings.filterwarnings("ignore", message="Estimator NMF does not inherit")
    _CHECKS = parametrize_with_checks([NMF(max_iter=500)])


@_CHECKS
@pytest.mark.filterwarnings("ignore:Estimator NMF does not inherit")
@pytest.mark.filterwarnings("ignore::concept_engine.nmf.ConvergenceWarning")
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)


def test_params_are_stored_verbatim_and_clone_round_trips():
    est = NMF(4, solver="mu", init="random", max_iter=17, tol=0.0, random_state=3,
              hold_dtype="float16", sparse=False, check_every=5)
    params = est.get_params()
    assert params == {"n_components": 4, "solver": "mu", "init": "random", "max_iter": 17,
                      "tol": 0.0, "random_state": 3, "hold_dtype": "float16",
                      "sparse": False, "check_every": 5}
    twin = clone(est)
    assert twin is not est and twin.get_params() == params
    # invalid values are stored as given and only rejected by fit (the contract)
    bad = NMF(n_components=-1, solver="nope")
    assert bad.get_params()["solver"] == "nope"
    with pytest.raises(ValueError):
        bad.fit(np.ones((5, 3)))
    assert est.set_params(n_components=2, tol=1e-3) is est
    assert est.n_components == 2 and est.tol == 1e-3
    with pytest.raises(ValueError, match="invalid parameter"):
        est.set_params(n_clusters=3)


def test_repr_lists_only_non_default_parameters():
    assert repr(NMF()) == "NMF()"
    assert repr(NMF(4, solver="mu")) == "NMF(n_components=4, solver='mu')"
    assert repr(NMF(3, tol=0.0)) == "NMF(n_components=3, tol=0.0)"


def test_keyword_only_after_n_components():
    with pytest.raises(TypeError):
        NMF(4, "mu")  # type: ignore[misc]


def test_grid_search_and_pipeline_work():
    from sklearn.model_selection import GridSearchCV
    from sklearn.pipeline import make_pipeline

    rng = np.random.default_rng(0)
    V = (rng.random((60, 3)) @ rng.random((3, 12))).astype(np.float64)

    def score(est, X, y=None):
        W = est.transform(X)
        return -float(np.linalg.norm(X - W @ est.components_))

    search = GridSearchCV(NMF(max_iter=300), {"n_components": [1, 3]}, scoring=score, cv=2)
    search.fit(V)
    assert search.best_params_ == {"n_components": 3}
    W = make_pipeline(NMF(3, max_iter=300)).fit_transform(V)
    assert W.shape == (60, 3)


def test_unfitted_transform_is_runtime_and_value_error():
    with pytest.raises(NotFittedError) as info:
        NMF(2).transform(np.ones((3, 3)))
    assert isinstance(info.value, RuntimeError) and isinstance(info.value, ValueError)


def test_runtime_does_not_import_sklearn():
    code = ("import sys; from concept_engine.nmf import NMF; import numpy as np; "
            "m = NMF(2, max_iter=50).fit(np.random.default_rng(0).random((20, 5))); "
            "repr(m); m.get_params(); assert 'sklearn' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.gpu
def test_estimator_on_cupy_arrays():
    import cupy

    rng = np.random.default_rng(0)
    V = (rng.random((200, 4)) @ rng.random((4, 30))).astype(np.float32)
    host = NMF(4, max_iter=100).fit(V)
    dev = NMF(4, max_iter=100).fit(cupy.asarray(V))
    assert isinstance(dev.components_, cupy.ndarray) and dev.n_features_in_ == 30
    np.testing.assert_allclose(cupy.asnumpy(dev.components_), host.components_, rtol=1e-3,
                               atol=1e-5)
    W = dev.transform(cupy.asarray(V[:10]))
    assert isinstance(W, cupy.ndarray) and W.shape == (10, 4)
    bad = cupy.asarray(V)
    bad[0, 0] = cupy.nan
    with pytest.raises(ValueError, match="NaN"):
        NMF(4).fit(bad)

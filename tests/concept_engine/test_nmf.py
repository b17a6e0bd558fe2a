"""NMF solvers: planted recovery, MU step-for-step vs a dense reference, residual-free error,
fixed-basis inference, float16/CSR-held V, the estimator, and scikit-learn as a yardstick."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.sparse as sp

from concept_engine.backend import get_namespace, gpu_available, to_device, to_host
from concept_engine.matching import match_bases
from concept_engine.nmf import (
    MU_ZERO_DENOMINATOR,
    NMF,
    ConvergenceWarning,
    nmf_fit,
    nmf_init,
    nmf_transform,
    prepare_v,
    reconstruction_error,
)


def planted(n: int = 1500, C: int = 48, k: int = 4, noise: float = 0.0, seed: int = 0):
    """V (n, C) = W H (+ noise) with sparse non-negative W (n, k), H (k, C).

    Most rows of W have one active component (pure pixels), which makes the factorisation
    unique up to scaling and permutation, so recovered bases can be compared to the planted.
    """
    rng = np.random.default_rng(seed)
    H = rng.random((k, C)) * (rng.random((k, C)) < 0.4)
    W = np.zeros((n, k))
    active = rng.integers(0, k, n)
    W[np.arange(n), active] = rng.random(n) + 0.5
    mixed = rng.random(n) < 0.3
    W[mixed, rng.integers(0, k, int(mixed.sum()))] += rng.random(int(mixed.sum()))
    V = np.maximum(W @ H + noise * rng.standard_normal((n, C)), 0)
    return V.astype(np.float32), W, H


def conv54_like(n_images: int = 12, C: int = 512, density: float = 0.07, seed: int = 0):
    """Sparse non-negative V (n_images*196, C) like VGG conv5_4 after ReLU (~93% zeros)."""
    rng = np.random.default_rng(seed)
    n = n_images * 196
    parts = rng.gamma(0.5, 1.0, (n, 8)) @ rng.gamma(0.3, 1.0, (8, C))
    x = parts + 2.0 * rng.standard_normal((n, C))
    cut = np.quantile(x, 1.0 - density)
    return np.maximum(x - cut, 0).astype(np.float32)


def reference_mu(V, W, H, n_iter):
    """The plain textbook / seed MU loop, dense, float64: H first, then W, 0 -> 1e-7."""
    W, H = W.copy(), H.copy()
    out = []
    for _ in range(n_iter):
        den = W.T @ W @ H
        den[den == 0] = MU_ZERO_DENOMINATOR
        H = H * (W.T @ V) / den
        den = W @ H @ H.T
        den[den == 0] = MU_ZERO_DENOMINATOR
        W = W * (V @ H.T) / den
        out.append((W, H))
    return out


SOLVER_INITS = [
    ("mu", "nndsvda"),
    ("mu", "nndsvdar"),
    ("mu", "random"),
    ("mu", "seed"),
    ("hals", "nndsvd"),
    ("hals", "nndsvda"),
    ("hals", "nndsvdar"),
    ("hals", "random"),
    ("hals", "seed"),
]


@pytest.mark.parametrize(("solver", "init"), SOLVER_INITS)
def test_planted_bases_recovered(solver, init):
    V, _, H_true = planted(noise=0.002)
    max_iter = 2000 if solver == "mu" else 300
    res = nmf_fit(V, 4, solver=solver, init=init, max_iter=max_iter, tol=1e-7, seed=3)
    perm, cos = match_bases(res.H, H_true)
    assert sorted(perm) == [0, 1, 2, 3]
    assert cos.min() >= 0.99, cos
    assert res.W.shape == (V.shape[0], 4) and res.H.shape == (4, V.shape[1])
    assert res.W.dtype == np.float32 and res.H.dtype == np.float32
    assert (res.W >= 0).all() and (res.H >= 0).all()
    rel = res.error / np.linalg.norm(V)
    assert rel < 0.01


def test_mu_matches_dense_reference_step_by_step():
    V, _, _ = planted(n=300, C=20, k=3, noise=0.01, seed=1)
    V64 = V.astype(np.float64)
    W0, H0 = nmf_init(V64, 3, init="seed", seed=5)
    ref = reference_mu(V64, W0, H0, 6)
    for t in range(1, 7):
        res = nmf_fit(V64, 3, solver="mu", W=W0, H=H0, max_iter=t, tol=0)
        W_ref, H_ref = ref[t - 1]
        assert res.n_iter == t
        np.testing.assert_allclose(res.H, H_ref, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(res.W, W_ref, rtol=1e-10, atol=1e-12)
    # float32 compute follows the float64 reference to float32 rounding.
    W032, H032 = W0.astype(np.float32), H0.astype(np.float32)
    for t in (1, 3, 6):
        res = nmf_fit(V, 3, solver="mu", W=W032, H=H032, max_iter=t, tol=0)
        W_ref, H_ref = ref[t - 1]
        np.testing.assert_allclose(res.H, H_ref, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(res.W, W_ref, rtol=1e-5, atol=1e-6)


def test_mu_zero_denominator_as_seed():
    # A basis row of zeros makes W^T W H have zero entries: the seed's 1e-7 keeps H finite.
    V = np.abs(np.random.default_rng(0).random((30, 6))).astype(np.float64)
    W0 = np.abs(np.random.default_rng(1).random((30, 2)))
    H0 = np.abs(np.random.default_rng(2).random((2, 6)))
    W0[:, 1] = 0.0
    res = nmf_fit(V, 2, solver="mu", W=W0, H=H0, max_iter=3, tol=0)
    W_ref, H_ref = reference_mu(V, W0, H0, 3)[-1]
    assert np.isfinite(res.W).all() and np.isfinite(res.H).all()
    np.testing.assert_allclose(res.H, H_ref, rtol=1e-10)
    np.testing.assert_allclose(res.W, W_ref, rtol=1e-10)


@pytest.mark.parametrize("layout", ["float64", "float32", "float16", "csr"])
def test_error_formula_equals_dense_residual(layout):
    rng = np.random.default_rng(0)
    V = rng.random((200, 30)) * (rng.random((200, 30)) < 0.3)
    W = rng.random((200, 5))
    H = rng.random((5, 30))
    V = V.astype(np.float16).astype(np.float64)  # exactly representable in every layout
    dense = np.linalg.norm(V - W @ H)
    Vl = {
        "float64": V,
        "float32": V.astype(np.float32),
        "float16": V.astype(np.float16),
        "csr": sp.csr_matrix(V.astype(np.float32)),
    }[layout]
    got = reconstruction_error(Vl, W, H)
    rtol = 1e-10 if layout == "float64" else 1e-5
    assert got == pytest.approx(dense, rel=rtol)


def test_error_is_clamped_for_exact_factorisation():
    _, W, H = planted(n=200, C=16, k=3)
    V = W @ H
    assert reconstruction_error(V, W, H) == pytest.approx(0.0, abs=1e-5 * np.linalg.norm(V))


def test_reported_error_matches_returned_factors():
    V, _, _ = planted(n=400, C=24, k=3, noise=0.05)
    for solver in ("mu", "hals"):
        res = nmf_fit(V, 3, solver=solver, max_iter=40)
        dense = np.linalg.norm(V.astype(np.float64) - res.W.astype(np.float64) @ res.H)
        assert res.error == pytest.approx(dense, rel=1e-4)


@pytest.mark.parametrize("solver", ["mu", "hals"])
def test_transform_recovers_planted_W(solver):
    _, W, H = planted(n=600, C=32, k=4, seed=2)
    V = (W @ H).astype(np.float32)
    H32 = H.astype(np.float32)
    W_hat = nmf_transform(V, H32, solver=solver, max_iter=3000 if solver == "mu" else 200, tol=0)
    np.testing.assert_allclose(W_hat, W, atol=2e-3 if solver == "mu" else 1e-4)


def test_transform_with_seed_init_and_update_H_false_keeps_H():
    V, _, H = planted(n=300, C=16, k=3, seed=4)
    H32 = H.astype(np.float32)
    res = nmf_fit(V, 3, H=H32, update_H=False, init="seed", solver="mu", max_iter=50)
    np.testing.assert_array_equal(res.H, H32)
    assert res.W.shape == (300, 3)


def test_float16_held_V_gives_near_identical_fit():
    V, _, _ = planted(n=1200, C=40, k=4, noise=0.01, seed=6)
    a = nmf_fit(V, 4, max_iter=100)
    b = nmf_fit(V.astype(np.float16), 4, max_iter=100)
    _, cos = match_bases(a.H, b.H)
    assert cos.min() > 0.9999
    assert b.error == pytest.approx(a.error, rel=2e-2)
    assert b.W.dtype == np.float32


def test_csr_V_gives_same_fit_as_dense(monkeypatch):
    V = conv54_like(n_images=4, C=64)
    a = nmf_fit(V, 5, max_iter=30, tol=0)
    b = nmf_fit(sp.csr_matrix(V), 5, max_iter=30, tol=0)
    np.testing.assert_allclose(b.H, a.H, rtol=2e-3, atol=1e-5 * float(np.abs(a.H).max()))
    assert b.error == pytest.approx(a.error, rel=1e-4)


def test_chunked_float16_path_with_small_chunks(monkeypatch):
    import concept_engine.nmf as nmf_mod

    V = planted(n=500, C=24, k=3, noise=0.01)[0]
    a = nmf_fit(V.astype(np.float16), 3, max_iter=20, tol=0)
    monkeypatch.setattr(nmf_mod, "CHUNK_BYTES", 24 * 4 * 7)  # 7-row chunks, ragged end
    b = nmf_fit(V.astype(np.float16), 3, max_iter=20, tol=0)
    np.testing.assert_allclose(b.W, a.W, rtol=1e-4, atol=1e-6)
    # Residual-free error in float32: cancellation costs ~eps / (relative residual)^2.
    assert b.error == pytest.approx(a.error, rel=5e-4)


def test_random_init_is_sklearns_random_init():
    _nmf = pytest.importorskip("sklearn.decomposition._nmf")
    V = planted(n=100, C=12, k=3)[0]
    W_sk, H_sk = _nmf._initialize_nmf(V, 3, init="random", random_state=7)
    W, H = nmf_init(V, 3, init="random", seed=7)
    np.testing.assert_allclose(W, W_sk, rtol=1e-6)
    np.testing.assert_allclose(H, H_sk, rtol=1e-6)


def test_seed_init_scaling_and_determinism():
    V = planted(n=5000, C=16, k=4)[0]
    W, H = nmf_init(V, 4, init="seed", seed=0)
    W2, H2 = nmf_init(V, 4, init="seed", seed=0)
    np.testing.assert_array_equal(W, W2)
    np.testing.assert_array_equal(H, H2)
    # E|N(0,1)| = sqrt(2/pi): the mean of W is sqrt(mean(V)/k) * sqrt(2/pi).
    expect = np.sqrt(V.mean() / 4) * np.sqrt(2 / np.pi)
    assert W.mean() == pytest.approx(expect, rel=0.02)
    assert not np.array_equal(W, nmf_init(V, 4, init="seed", seed=1)[0])


def test_nndsvd_is_deterministic_and_close_to_sklearn():
    _nmf = pytest.importorskip("sklearn.decomposition._nmf")
    V = planted(n=800, C=30, k=4, noise=0.01)[0].astype(np.float64)
    W, H = nmf_init(V, 4, init="nndsvda", seed=0)
    W1, H1 = nmf_init(V, 4, init="nndsvda", seed=123)
    np.testing.assert_array_equal(W, W1)
    W_sk, H_sk = _nmf._initialize_nmf(V, 4, init="nndsvda", random_state=0)
    # scikit-learn uses a randomised SVD: equal up to its accuracy.
    np.testing.assert_allclose(H, H_sk, rtol=1e-3, atol=1e-4 * np.abs(H_sk).max())
    np.testing.assert_allclose(W, W_sk, rtol=1e-3, atol=1e-4 * np.abs(W_sk).max())


def test_estimator_api_and_convergence_warning():
    V = planted(n=400, C=20, k=3, noise=0.05)[0]
    est = NMF(3, solver="mu", max_iter=5, tol=1e-12)
    with pytest.warns(ConvergenceWarning):
        W = est.fit_transform(V)
    assert issubclass(ConvergenceWarning, UserWarning)
    assert est.n_iter_ == 5 and not est.converged_
    assert est.components_.shape == (3, 20)
    assert est.reconstruction_err_ == pytest.approx(
        np.linalg.norm(V - W.astype(np.float64) @ est.components_), rel=1e-4
    )
    est2 = NMF(3, max_iter=300, tol=1e-4, hold_dtype="float16", sparse=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert est2.fit(V) is est2
        W_new = est2.transform(V[:50])
    assert W_new.shape == (50, 3) and (W_new >= 0).all()


def test_rejects_bad_input():
    V = planted(n=50, C=8, k=2)[0]
    with pytest.raises(ValueError, match="non-negative"):
        nmf_fit(-V, 2)
    bad = V.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="non-negative"):
        nmf_fit(bad, 2)
    with pytest.raises(ValueError, match="solver"):
        nmf_fit(V, 2, solver="cd")
    with pytest.raises(ValueError, match="shape"):
        nmf_fit(V, 2, H=np.ones((3, 8), np.float32), update_H=False)
    with pytest.raises(RuntimeError):
        NMF(2).transform(V)
    # NaN would pass "tol < 0" and run every iteration with no warning; a float max_iter
    # would fail deep in the solver without naming it
    with pytest.raises(ValueError, match="tol must be >= 0, got nan"):
        NMF(2, tol=float("nan")).fit(V)
    for name, value in (("max_iter", 2.5), ("max_iter", True), ("check_every", 0)):
        with pytest.raises(ValueError, match=f"{name} must be an integer >= 1"):
            nmf_fit(V, 2, **{name: value})


def test_same_seed_same_result():
    V = planted(n=300, C=16, k=3, noise=0.05)[0]
    a = nmf_fit(V, 3, init="random", seed=9, max_iter=30)
    b = nmf_fit(V, 3, init="random", seed=9, max_iter=30)
    np.testing.assert_array_equal(a.W, b.W)
    np.testing.assert_array_equal(a.H, b.H)


@pytest.mark.parametrize("solver", ["mu", "hals"])
def test_final_error_not_worse_than_sklearn_on_conv54_like_data(solver):
    skd = pytest.importorskip("sklearn.decomposition")
    from sklearn.exceptions import ConvergenceWarning as SkConvergenceWarning

    V = conv54_like(n_images=12)
    assert 0.90 < (V == 0).mean() < 0.96
    k, max_iter = 6, 200
    errs = {}
    for sk_solver in ("mu", "cd"):
        est = skd.NMF(
            k, init="nndsvda", solver=sk_solver, max_iter=max_iter, tol=1e-4, random_state=0
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SkConvergenceWarning)
            est.fit(V)
        errs[sk_solver] = est.reconstruction_err_
    res = nmf_fit(V, k, solver=solver, init="nndsvda", max_iter=max_iter, tol=1e-4)
    # MU against MU, and our default HALS against both of scikit-learn's solvers.
    bound = errs["mu"] if solver == "mu" else min(errs.values())
    assert res.error <= bound * (1 + 1e-3), (res.error, errs)


def _residual(V: np.ndarray, W: np.ndarray, H: np.ndarray) -> float:
    """||V - W H||_F in float64."""
    return float(np.linalg.norm(V.astype(np.float64)
                                - W.astype(np.float64) @ H.astype(np.float64)))


@pytest.mark.gpu
def test_cupy_matches_numpy():
    assert gpu_available()
    V = planted(n=800, C=32, k=4, noise=0.01)[0]
    import cupy  # noqa: PLC0415 - only in the GPU test

    Vd = to_device(V, cupy)
    assert get_namespace(Vd) is cupy
    for solver in ("mu", "hals"):
        a = nmf_fit(V, 4, solver=solver, max_iter=50, tol=0)
        b = nmf_fit(Vd, 4, solver=solver, max_iter=50, tol=0)
        assert get_namespace(b.W, b.H) is cupy
        np.testing.assert_allclose(to_host(b.H), a.H, rtol=1e-3, atol=1e-5)
        # the fits reach the same residual (measured here in float64) ...
        assert _residual(V, to_host(b.W), to_host(b.H)) == pytest.approx(
            _residual(V, a.W, a.H), rel=1e-4)
        # ... while the errors they report come from float32 products, ||V||^2 - 2<V, WH> +
        # ||WH||^2, which cancel to ~1e-4 of the error here (||V||^2 = 4679, error 1.16): on
        # the host the reported error is itself 1.7e-4 (MU) and 3.9e-5 (HALS) off the residual
        assert b.error == pytest.approx(a.error, rel=1e-3)
    b16 = nmf_fit(Vd.astype(cupy.float16), 4, max_iter=20)
    assert np.isfinite(b16.error)


def test_prepare_v_picks_csr_for_sparse_host_data():
    V = conv54_like(n_images=2, C=64)
    held = prepare_v(V)
    assert sp.issparse(held) and held.dtype == np.float32
    np.testing.assert_array_equal(held.toarray(), V)
    dense = np.ones((10, 4), np.float32)
    assert prepare_v(dense) is dense
    assert prepare_v(dense, hold_dtype="float16").dtype == np.float16
    assert sp.issparse(prepare_v(dense, sparse=True))
    assert prepare_v(V, sparse=False, hold_dtype="float16").dtype == np.float16
    with pytest.raises(ValueError):
        prepare_v(V, hold_dtype="bfloat16")
    est = NMF(5, max_iter=50).fit(V)
    ref = NMF(5, max_iter=50, sparse=False).fit(V)
    assert est.reconstruction_err_ == pytest.approx(ref.reconstruction_err_, rel=1e-4)


def test_backend_namespace_and_copies():
    a = np.ones((2, 2), np.float32)
    assert get_namespace(a, None, 3.0) is np
    assert get_namespace(sp.csr_matrix(a)) is np
    assert to_host(a) is a
    assert to_device(a, np) is a
    assert to_host(None) is None
    assert isinstance(gpu_available(), bool)


def test_threaded_row_blocks_give_the_same_products_and_fit(monkeypatch):
    import concept_engine.csr_kernels as kernels
    import concept_engine.nmf as nmf_mod

    monkeypatch.setattr(kernels, "AVAILABLE", False)  # the SciPy fallback's row blocks

    V = sp.csr_matrix(conv54_like(n_images=6, C=64, seed=3))
    rng = np.random.default_rng(0)
    Wt = rng.random((5, V.shape[0])).astype(np.float32)
    H = rng.random((5, 64)).astype(np.float32)
    plain = nmf_mod._Operand(V, np)
    assert plain._blocks == []  # small V: one SciPy call per product
    monkeypatch.setattr(nmf_mod, "_SPARSE_BLOCK_MIN_NNZ", 0)
    monkeypatch.setattr(nmf_mod, "SPARSE_THREADS", 3)
    blocked = nmf_mod._Operand(V, np)
    assert len(blocked._blocks) == 3
    assert [b[0] for b in blocked._blocks][0] == 0 and blocked._blocks[-1][1] == V.shape[0]
    assert sum(b[2].nnz for b in blocked._blocks) == V.nnz
    np.testing.assert_allclose(blocked.wt_v(Wt), plain.wt_v(Wt), rtol=1e-5)
    np.testing.assert_allclose(blocked.h_vt(H), plain.h_vt(H), rtol=1e-5)
    X, Y = H.T[:, :3], Wt.T[:, :3]
    dense = V.toarray()
    np.testing.assert_allclose(blocked.v_x(X), dense @ X, rtol=1e-4)
    np.testing.assert_allclose(blocked.vt_y(Y), dense.T @ Y, rtol=1e-4)
    np.testing.assert_allclose(plain.v_x(X), dense @ X, rtol=1e-4)
    np.testing.assert_allclose(plain.vt_y(Y), dense.T @ Y, rtol=1e-4)
    a = nmf_fit(V.toarray(), 4, max_iter=30, tol=0)
    b = nmf_fit(V, 4, max_iter=30, tol=0)
    assert b.error == pytest.approx(a.error, rel=1e-4)


def test_randomised_start_matches_the_exact_svd():
    import concept_engine.nmf as nmf_mod

    V = conv54_like(n_images=8, C=128, seed=5).astype(np.float64)
    s, Vk, Ut = nmf_mod._top_singular(nmf_mod._Operand(V, np), 4)
    U_ex, s_ex, Vt_ex = np.linalg.svd(V, full_matrices=False)
    # this synthetic spectrum is flat after the first value (noise): the leading pair is
    # exact, the others are Rayleigh-Ritz values, i.e. lower bounds close to the exact ones
    assert s[0] == pytest.approx(s_ex[0], rel=3e-3)
    assert abs(float(Vk[0] @ Vt_ex[0])) > 0.995 and abs(float(Ut[0] @ U_ex[:, 0])) > 0.99
    assert np.all(np.asarray(s) <= s_ex[:4] * (1 + 1e-9))
    np.testing.assert_allclose(s, s_ex[:4], rtol=0.1)
    # the fit from it ends where a fit from scikit-learn's start (a randomised SVD with 7 power
    # iterations) ends
    _nmf = pytest.importorskip("sklearn.decomposition._nmf")
    W0, H0 = _nmf._initialize_nmf(V, 4, init="nndsvda", random_state=0)
    V32 = sp.csr_matrix(V.astype(np.float32))
    ours = nmf_fit(V32, 4, max_iter=300, tol=1e-5)
    theirs = nmf_fit(V32, 4, W=W0, H=H0, max_iter=300, tol=1e-5)
    assert ours.error == pytest.approx(theirs.error, rel=2e-3)


def test_activations_are_kept_sparse_as_they_arrive():
    from concept_engine.discovery import _Image, _rows, stack_rows

    rng = np.random.default_rng(2)
    acts = [np.maximum(rng.standard_normal((64, 3, 4)).astype(np.float32) - 1.5, 0)
            for _ in range(3)]
    images = [_Image(str(i), _rows(a), (3, 4), (30, 40), (24, 32), None)
              for i, a in enumerate(acts)]
    assert all(sp.issparse(im.rows) for im in images)
    dense = np.concatenate([a.reshape(64, 12).T for a in acts])
    V = stack_rows(images)
    assert sp.issparse(V) and V.dtype == np.float32  # ~7% non-zeros: stays CSR
    np.testing.assert_array_equal(V.toarray(), dense)
    busy = [_Image("x", _rows(np.abs(a) + 1), (3, 4), (30, 40), (24, 32), None) for a in acts]
    assert isinstance(stack_rows(busy), np.ndarray)  # dense data: dense V, as prepare_v does


# --------------------------------------------------------------------------------------------
# The compiled CSR kernels (concept_engine.csr_kernels): same products, same iterates.
# --------------------------------------------------------------------------------------------


def _kernels_toggle(monkeypatch, on: bool, blocks: int = 3):
    import concept_engine.csr_kernels as kernels
    import concept_engine.nmf as nmf_mod

    monkeypatch.setattr(kernels, "AVAILABLE", on)
    monkeypatch.setattr(nmf_mod, "_SPARSE_BLOCK_MIN_NNZ", 0)  # several row ranges even here
    monkeypatch.setattr(nmf_mod, "SPARSE_THREADS", blocks)
    monkeypatch.setattr(nmf_mod.os, "cpu_count", lambda: blocks)


def test_kernels_are_installed_and_used_for_host_csr():
    import concept_engine.csr_kernels as kernels
    import concept_engine.nmf as nmf_mod

    assert kernels.AVAILABLE, "numba is a dependency: the compiled kernels must be there"
    op = nmf_mod._Operand(sp.csr_matrix(conv54_like(n_images=2, C=32)), np)
    assert op.kernels
    assert not nmf_mod._Operand(conv54_like(n_images=2, C=32), np).kernels  # dense: BLAS


@pytest.mark.parametrize("k", [1, 5, 8, 11])
def test_kernel_products_equal_dense_products(monkeypatch, k):
    import concept_engine.nmf as nmf_mod

    _kernels_toggle(monkeypatch, True)
    dense = conv54_like(n_images=5, C=96, seed=k)
    V = sp.csr_matrix(dense)
    op = nmf_mod._Operand(V, np)
    assert op.kernels and len(op._ranges) == 3
    rng = np.random.default_rng(k)
    Wt = rng.random((k, V.shape[0])).astype(np.float32)
    H = rng.random((k, 96)).astype(np.float32)
    np.testing.assert_allclose(op.wt_v(Wt), Wt @ dense, rtol=2e-5)
    np.testing.assert_allclose(op.h_vt(H), H @ dense.T, rtol=2e-5, atol=1e-4)
    np.testing.assert_allclose(op.v_x(H.T), dense @ H.T, rtol=2e-5, atol=1e-4)
    np.testing.assert_allclose(op.vt_y(Wt.T), dense.T @ Wt.T, rtol=2e-5)
    assert op.sq_norm == pytest.approx(float(np.sum(dense.astype(np.float64) ** 2)), rel=1e-12)
    assert op.mean == pytest.approx(float(dense.astype(np.float64).mean()), rel=1e-12)
    assert op.min() == 0.0


@pytest.mark.parametrize("solver", ["hals", "mu"])
@pytest.mark.parametrize("k", [3, 8, 11])
@pytest.mark.parametrize("tol", [0.0, 1e-3])
def test_fused_kernel_fit_follows_the_reference_loop(monkeypatch, solver, k, tol):
    """One read of V per iteration, yet the iterates, the stopping iteration and the error
    are those of the two-product loop (the SciPy fallback) up to float rounding."""
    V = sp.csr_matrix(conv54_like(n_images=4, C=80, seed=k))
    W0, H0 = nmf_init(V.toarray(), k, init="nndsvda")
    _kernels_toggle(monkeypatch, False)
    ref = nmf_fit(V, k, solver=solver, W=W0, H=H0, max_iter=80, tol=tol, check_every=5)
    _kernels_toggle(monkeypatch, True)
    got = nmf_fit(V, k, solver=solver, W=W0, H=H0, max_iter=80, tol=tol, check_every=5)
    assert got.n_iter == ref.n_iter and got.converged == ref.converged
    if tol:
        assert got.converged and got.n_iter < 80  # the delayed HALS test did stop the loop
    assert got.error == pytest.approx(ref.error, rel=1e-5)
    assert got.error == pytest.approx(reconstruction_error(V.toarray(), got.W, got.H), rel=1e-4)
    scale_W, scale_H = float(np.abs(ref.W).max()), float(np.abs(ref.H).max())
    np.testing.assert_allclose(got.W, ref.W, atol=2e-3 * scale_W)
    np.testing.assert_allclose(got.H, ref.H, atol=2e-3 * scale_H)
    assert got.W.flags.c_contiguous and got.W.shape == (V.shape[0], k)


def test_fused_kernel_matches_the_dense_mu_reference_step_by_step(monkeypatch):
    _kernels_toggle(monkeypatch, True)
    V, _, _ = planted(n=400, C=24, k=3, noise=0.02)
    W0, H0 = nmf_init(V, 3, init="seed", seed=1)
    ref = reference_mu(V.astype(np.float64), W0.astype(np.float64), H0.astype(np.float64), 12)
    got = nmf_fit(sp.csr_matrix(V), 3, solver="mu", W=W0, H=H0, max_iter=12, tol=0)
    np.testing.assert_allclose(got.W, ref[-1][0], rtol=2e-3, atol=1e-6)
    np.testing.assert_allclose(got.H, ref[-1][1], rtol=2e-3, atol=1e-6)


@pytest.mark.parametrize(("C", "k", "init"), [
    (128, 5, "nndsvda"),   # one block of 16 sketch columns
    (128, 9, "nndsvd"),    # two blocks (k + 10 = 19 -> 32)
    (12, 3, "nndsvdar"),   # C < 16: the sketch is C wide, padded with zero columns
])
def test_kernel_randomised_start_equals_the_scipy_one(monkeypatch, C, k, init):
    V = sp.csr_matrix(conv54_like(n_images=6, C=C, seed=2))
    _kernels_toggle(monkeypatch, False)
    W_ref, H_ref = nmf_init(V, k, init=init)
    _kernels_toggle(monkeypatch, True)
    W, H = nmf_init(V, k, init=init)
    np.testing.assert_allclose(H, H_ref, rtol=1e-3, atol=1e-4 * float(H_ref.max()))
    np.testing.assert_allclose(W, W_ref, rtol=1e-3, atol=1e-4 * float(W_ref.max()))


def test_sketch_kernel_takes_the_moments_along(monkeypatch):
    import concept_engine.csr_kernels as kernels
    import concept_engine.nmf as nmf_mod

    _kernels_toggle(monkeypatch, True)
    V = sp.csr_matrix(conv54_like(n_images=5, C=64, seed=4))
    rng = np.random.default_rng(0)
    Omega = rng.standard_normal((64, 32)).astype(np.float32)
    Z = np.zeros_like(Omega)
    total, sq, low = kernels.sketch(V, 0, V.shape[0], Omega, Z)
    np.testing.assert_allclose(Z, V.T @ (V @ Omega), rtol=1e-4, atol=1e-3 * float(abs(Z).max()))
    assert (total, sq, low) == pytest.approx(kernels.moments(V, 0, V.shape[0]), rel=1e-12)
    with pytest.raises(ValueError, match="multiple of 16"):
        kernels.sketch(V, 0, V.shape[0], Omega[:, :8], Z[:, :8])
    # an NNDSVD fit reads V's moments from its start's sketch: no separate read of V ...
    calls = []
    monkeypatch.setattr(kernels, "moments", lambda *a: calls.append(a) or (0.0, 0.0, 0.0))
    res = nmf_fit(V, 3, max_iter=5)
    assert calls == [] and np.isfinite(res.error)
    # ... and the error it reports is computed from those moments
    assert res.error == pytest.approx(nmf_mod.reconstruction_error(V.toarray(), res.W, res.H),
                                      rel=1e-4)


def test_kernels_reject_nan_and_negative_csr(monkeypatch):
    _kernels_toggle(monkeypatch, True)
    V = conv54_like(n_images=2, C=16)
    rows, cols = np.nonzero(V)
    for bad_value in (np.nan, -1.0):
        bad = V.copy()
        bad[rows[len(rows) // 2], cols[len(cols) // 2]] = bad_value
        with pytest.raises(ValueError, match="non-negative"):
            nmf_fit(sp.csr_matrix(bad), 2)


def test_dense_moments_kernel_equals_numpy_and_checks_the_input(monkeypatch):
    # dense float32 V: mean, ||V||^2 and the sign check in one compiled read
    import concept_engine.nmf as nmf_mod

    _kernels_toggle(monkeypatch, True, blocks=2)
    V = conv54_like(n_images=50, C=24, seed=3)  # 9800 rows: two parts
    op = nmf_mod._Operand(V, np)
    assert op._dense_kernel() and op.non_negative()
    V64 = V.astype(np.float64)
    assert op.mean == pytest.approx(float(V64.mean()), rel=1e-12)
    assert op.sq_norm == pytest.approx(float((V64**2).sum()), rel=1e-12)
    for bad_value in (np.nan, -1e-3, -np.inf):
        bad = V.copy()
        bad[9000, 5] = bad_value
        assert not nmf_mod._Operand(bad, np).non_negative()
        with pytest.raises(ValueError, match="non-negative"):
            nmf_fit(bad, 2)
    # float16 V is read by NumPy in chunks: same answers
    half = nmf_mod._Operand(V.astype(np.float16), np)
    assert not half._dense_kernel() and half.non_negative()


def test_fixed_bases_inference_uses_one_read_of_csr_v(monkeypatch):
    """update_H=False keeps the product-once path (V H^T once, then (n, k) work only)."""
    _kernels_toggle(monkeypatch, True)
    V, W, H = planted(n=600, C=32, k=4, noise=0.0)
    got = nmf_transform(sp.csr_matrix(V), H.astype(np.float32), max_iter=300, tol=1e-8)
    np.testing.assert_allclose(got @ H, V, atol=5e-3 * float(V.max()))


def test_fits_side_by_side_equal_fits_one_by_one(monkeypatch):
    # nmf_fit_many runs a fit per core, each on its own thread while every core is busy and
    # over all cores once fewer fits are left; same row ranges either way, so every result is
    # bit for bit that of nmf_fit
    import concept_engine.nmf as nmf_mod

    _kernels_toggle(monkeypatch, True, blocks=2)
    monkeypatch.setattr(nmf_mod.os, "cpu_count", lambda: 2)
    V = sp.csr_matrix(conv54_like(n_images=6, C=64, seed=7))
    jobs = [(V, k, {"init": "random", "seed": s, "max_iter": 40 + 20 * s, "tol": 1e-4})
            for k, s in ((2, 0), (4, 1), (3, 2), (5, 3), (3, 4))]
    seen: list[int] = []
    many = nmf_mod.nmf_fit_many(jobs, seen.append)
    assert seen == list(range(len(jobs)))
    for (Vj, k, kw), got in zip(jobs, many, strict=True):
        ref = nmf_fit(Vj, k, **kw)
        assert got.n_iter == ref.n_iter and got.error == ref.error
        np.testing.assert_array_equal(got.W, ref.W)
        np.testing.assert_array_equal(got.H, ref.H)



@pytest.mark.parametrize("width", [8, 16, 32])
def test_start_kernels_equal_numpy(width):
    # gather_gram: B = V X and B^T B in one sweep (tiles of 256 rows; a range that starts and
    # ends inside tiles; widths of 8 take the general loop, multiples of 16 the vector one);
    # part_sq_norms and nndsvd_w on a column range
    import concept_engine.csr_kernels as kernels

    dense = conv54_like(n_images=4, C=48, seed=width)  # 784 rows
    V = sp.csr_matrix(dense)
    rng = np.random.default_rng(width)
    X = rng.standard_normal((48, width)).astype(np.float32)
    out = np.full((V.shape[0], width), np.nan, dtype=np.float32)
    G = np.ones((width, width))
    a, b = 5, V.shape[0] - 3
    kernels.gather_gram(V, a, b, X, out, G)
    np.testing.assert_allclose(out[a:b], dense[a:b] @ X, rtol=1e-4, atol=1e-4)
    assert np.isnan(out[:a]).all() and np.isnan(out[b:]).all()
    B = out[a:b].astype(np.float64)
    np.testing.assert_allclose(G - 1.0, B.T @ B, rtol=1e-5, atol=1e-5 * float(abs(B.T @ B).max()))

    Ut = rng.standard_normal((3, 500)).astype(np.float32)
    norms = kernels.part_sq_norms(Ut, 7, 450)
    part = Ut[:, 7:450].astype(np.float64)
    np.testing.assert_allclose(norms[:, 0], (np.maximum(part, 0) ** 2).sum(1), rtol=1e-12)
    np.testing.assert_allclose(norms[:, 1], (part**2).sum(1), rtol=1e-12)
    Wt = np.full_like(Ut, -7.0)
    kernels.nndsvd_w(Ut, np.array([0, 1, -1]), np.array([2, 3, 4], np.float32), 0.5, 0.25, Wt,
                     7, 450)
    parts = np.stack([np.abs(Ut[0]) * 2, np.maximum(Ut[1], 0) * 3, np.maximum(-Ut[2], 0) * 4])
    want = np.where(parts >= 0.5, parts, np.float32(0.25))
    np.testing.assert_array_equal(Wt[:, 7:450], want[:, 7:450])
    assert (Wt[:, :7] == -7).all() and (Wt[:, 450:] == -7).all()


def test_kernel_start_in_small_blas_blocks_equals_the_scipy_one(monkeypatch):
    # the kernel start forms U^T in BLAS calls of a few rows each (so that OpenBLAS stays on
    # the calling thread): blocks of 64 rows here, many per row range
    import concept_engine.nmf as nmf_mod

    V = sp.csr_matrix(conv54_like(n_images=6, C=128, seed=2))
    _kernels_toggle(monkeypatch, False)
    W_ref, H_ref = nmf_init(V, 5, init="nndsvda")
    _kernels_toggle(monkeypatch, True)
    monkeypatch.setattr(nmf_mod, "_small_blas_rows", lambda *widths: 64)
    W, H = nmf_init(V, 5, init="nndsvda")
    np.testing.assert_allclose(H, H_ref, rtol=1e-3, atol=1e-4 * float(H_ref.max()))
    np.testing.assert_allclose(W, W_ref, rtol=1e-3, atol=1e-4 * float(W_ref.max()))
    assert nmf_mod._small_blas_rows(16, 16) * 16 * 16 <= 1 << 18


def test_dff_gpu_0_keeps_computations_on_the_host(monkeypatch):
    from concept_engine import backend

    monkeypatch.setenv("DFF_GPU", "0")
    backend._cupy.cache_clear()
    try:
        assert backend.compute_namespace() is np
        assert not backend.gpu_available()
    finally:
        monkeypatch.delenv("DFF_GPU")
        backend._cupy.cache_clear()


def test_mu_update_stays_finite_where_a_float32_denominator_is_subnormal():
    """From a random start a channel's bases can all shrink to ~1e-40 (float32 subnormals)
    while the images still hold that channel: numerator / denominator overflowed to inf, and
    inf * 0 made the factors NaN (a `dff discover --solver mu` k sweep on 12 ant photos died in
    the bases matching). The ratio is capped; where nothing overflows it is the seed's."""
    import warnings

    from concept_engine.nmf import _mu_update_H

    H = np.array([[0.0, 0.5], [1e-40, 0.25]], np.float32)  # channel 0: 0 and a subnormal
    WtV = np.ones((2, 2), np.float32)
    WtW = np.ones((2, 2), np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overflow warning reaches the user either
        new = _mu_update_H(H.copy(), WtV, WtW, np)
    assert np.isfinite(new).all() and new[0, 0] == 0.0
    assert new[1, 0] == pytest.approx(np.finfo(np.float32).max * np.float32(1e-40), rel=1e-6)
    np.testing.assert_array_equal(new[:, 1], H[:, 1] * (WtV[:, 1] / (WtW @ H)[:, 1]))

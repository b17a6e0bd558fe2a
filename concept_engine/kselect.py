"""Choosing the number of concepts k: one interface, several criteria.

:func:`select_k` fits NMF on the features V once per candidate k, asks every recorded criterion
for its curve ({k: value}), lets the chosen criterion pick k, and returns the per-k fits so the
caller reuses the fit of the chosen k instead of fitting again (the seed estimated k and then
never used it).

Criteria (each a small class with ``curve`` and ``choose``):

* ``'certainty'`` - the seed's: mean concept certainty of each fit, argmax. Measured on real
  features it nearly always answers the smallest k (certainty falls as concepts get finer), so
  it is recorded for comparison but is not the default.
* ``'stability'`` (default) - split-half reproducibility. The IMAGES (not the rows of V, whose
  rows from one image are strongly correlated) are split at random into two halves; each half is
  fitted at every k; the bases of the two halves are matched one-to-one by the Hungarian
  algorithm on cosine similarity; the curve is the mean matched cosine, averaged over
  ``n_splits`` random splits. Each half is fitted from its own seeded random start (not the
  caller's NNDSVD): from one deterministic start, two similar halves split an over-complete k
  the same arbitrary way and look stable. Rule: the LARGEST k whose stability is within
  ``tolerance`` of the best. Plain argmax is biased to small k in the same way as certainty
  (a coarse split into two broad parts is nearly always reproducible), whereas the goal is the
  finest set of concepts that is still reproducible: beyond the true k, extra components split
  noise or concepts arbitrarily and their cosines drop well below the tolerance.
* ``'elbow'`` - the knee of the reconstruction-error curve: after scaling k and the error to
  [0, 1], the k farthest below the chord joining the first and last points (Kneedle).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from concept_engine.backend import get_namespace, to_device
from concept_engine.certainty import SEED_SIZE, concept_certainty
from concept_engine.matching import match_bases
from concept_engine.nmf import NMFResult, nmf_fit, nmf_fit_many

__all__ = [
    "CRITERIA",
    "BiCrossValidationCriterion",
    "CertaintyCriterion",
    "ElbowCriterion",
    "InstabilityCriterion",
    "KCriterion",
    "KSelection",
    "StabilityCriterion",
    "Sweep",
    "select_k",
]


@dataclass(frozen=True)
class KSelection:
    """Result of a k sweep.

    Attributes:
        k: the chosen number of concepts (a key of ``fits``).
        criterion: name of the criterion that chose it.
        reason: one human-readable sentence on why.
        curves: criterion name -> {k: value} for every recorded criterion.
        fits: k -> NMFResult of the fit on all of V (reuse ``fits[k]`` as the final fit).
    """

    k: int
    criterion: str
    reason: str
    curves: dict[str, dict[int, float]]
    fits: dict[int, NMFResult]

    @property
    def fit(self) -> NMFResult:
        """The fit for the chosen k."""
        return self.fits[self.k]


@dataclass(frozen=True)
class Sweep:
    """What a criterion may use: the features, their layout, the per-k fits and how to refit.

    V is (n_images * h * w, C), rows ordered image by image, then row-major (y, x).
    """

    V: Any
    n_images: int
    sizes: tuple[tuple[int, int], ...]  # (h, w) of each image's feature map
    ks: tuple[int, ...]
    fits: dict[int, NMFResult]
    fit_kwargs: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    input_sizes: tuple[tuple[int, int], ...] | None = None  # network input (H, W) per image
    tick: Callable[[str], None] = field(default=lambda _message: None)  # one call per NMF fit
    #: the images in a canonical order (positions, e.g. by content: discovery sorts them by
    #: their files' digests): splits are drawn over it and each half's rows follow it, so the
    #: split-half fits do not depend on the order (or the names) the images came in. None:
    #: the given order.
    order: np.ndarray | None = None

    @property
    def offsets(self) -> np.ndarray:
        """Row offset of each image in V, plus the total: (n_images + 1,) int64."""
        return np.concatenate([[0], np.cumsum([h * w for h, w in self.sizes])]).astype(np.int64)

    def maps(self, W: Any) -> list[Any]:
        """Per-image raw heatmaps (k, h_i, w_i) from W (rows of V, k)."""
        off = self.offsets
        k = W.shape[1]
        return [W[off[i]:off[i + 1]].reshape(h, w, k).transpose(2, 0, 1)
                for i, (h, w) in enumerate(self.sizes)]


class KCriterion(Protocol):
    """A k-selection strategy: a curve over the candidate ks and a rule that picks one."""

    name: str

    def curve(self, sweep: Sweep) -> dict[int, float]: ...

    def choose(self, curve: dict[int, float]) -> tuple[int, str]: ...


@dataclass(frozen=True)
class CertaintyCriterion:
    """The seed's criterion: mean concept certainty (over images and concepts), argmax."""

    upsample_to: tuple[int, int] | None = SEED_SIZE
    name: str = "certainty"

    def curve(self, sweep: Sweep) -> dict[int, float]:
        # Maps are upsampled to each image's network input size when known (keep-aspect
        # inputs), else to the seed's 224 x 224; images are grouped so each group is one batch.
        inputs = sweep.input_sizes or (self.upsample_to,) * sweep.n_images
        groups: dict[tuple, list[int]] = {}
        for i, key in enumerate(zip(sweep.sizes, inputs, strict=True)):
            groups.setdefault(key, []).append(i)
        out: dict[int, float] = {}
        for k in sweep.ks:
            W = sweep.fits[k].W
            xp = get_namespace(W)
            maps = sweep.maps(W)
            total = 0.0
            for (_, size), members in groups.items():
                batch = xp.stack([maps[i] for i in members])
                cert = concept_certainty(batch, upsample_to=size)
                total += float(xp.sum(cert, dtype=xp.float64))
            out[k] = total / (sweep.n_images * k)
        return out

    def choose(self, curve: dict[int, float]) -> tuple[int, str]:
        k = max(curve, key=lambda kk: (curve[kk], -kk))  # ties -> smallest k
        return k, f"k={k} has the highest mean concept certainty ({curve[k]:.4g})"


@dataclass(frozen=True)
class ElbowCriterion:
    """Knee of the reconstruction error ||V - WH|| over k (largest drop below the chord)."""

    name: str = "elbow"

    def curve(self, sweep: Sweep) -> dict[int, float]:
        return {k: float(sweep.fits[k].error) for k in sweep.ks}

    def choose(self, curve: dict[int, float]) -> tuple[int, str]:
        ks = sorted(curve)
        if len(ks) < 3:
            return ks[0], "fewer than 3 candidate ks: no knee can be located; smallest k"
        x = np.asarray(ks, dtype=np.float64)
        y = np.asarray([curve[k] for k in ks], dtype=np.float64)
        x = (x - x[0]) / (x[-1] - x[0])
        span = y[0] - y[-1]
        if not span > 0:
            return ks[0], "the error does not decrease with k; smallest k"
        y = (y - y[-1]) / span  # 1 at the first k, 0 at the last
        # Distance below the chord from (0, 1) to (1, 0); a convex decreasing curve bulges below.
        below = (1.0 - x) - y
        i = int(np.argmax(below))
        return ks[i], f"k={ks[i]} is the knee of the error curve (normalised gap {below[i]:.3g})"


@dataclass(frozen=True)
class StabilityCriterion:
    """Split-half stability of the bases (see the module docstring for the rule)."""

    n_splits: int = 2
    tolerance: float = 0.02
    init: str = "random"
    name: str = "stability"

    def curve(self, sweep: Sweep) -> dict[int, float]:
        if sweep.n_images < 2:
            raise ValueError("stability needs at least 2 images to split")
        xp = get_namespace(sweep.V) if not _is_host_sparse(sweep.V) else np
        off = sweep.offsets
        scores: dict[int, list[float]] = {k: [] for k in sweep.ks}
        jobs: list[tuple[Any, int, dict[str, Any]]] = []
        labels: list[tuple[int, int]] = []
        kw = {**sweep.fit_kwargs, "init": self.init}
        for split in range(self.n_splits):
            halves = _split_images(sweep.n_images, sweep.seed + split, sweep.order)
            parts = [sweep.V[to_device(_rows(idx, off), xp)] for idx in halves]
            for k in sweep.ks:
                # Each half starts from its OWN random point: from a deterministic (NNDSVD)
                # start, two similar halves split an over-complete k the same arbitrary way
                # and look stable; independent starts expose such splits.
                for half in (0, 1):
                    jobs.append((parts[half], k,
                                 {**kw, "seed": _half_seed(sweep.seed, split, half)}))
                labels.append((split, k))

        def done(i: int) -> None:
            if i % 2:
                split, k = labels[i // 2]
                sweep.tick(f"stability split {split + 1}/{self.n_splits}, k={k}")

        fits = nmf_fit_many(jobs, done)  # all independent: side by side where that pays
        for j, (_, k) in enumerate(labels):
            _, cos = match_bases(fits[2 * j].H, fits[2 * j + 1].H)
            scores[k].append(float(np.mean(cos)))
        return {k: float(np.mean(v)) for k, v in scores.items()}

    def choose(self, curve: dict[int, float]) -> tuple[int, str]:
        best = max(curve.values())
        ok = [k for k, v in curve.items() if v >= best - self.tolerance]
        k = max(ok)
        return k, (
            f"k={k} is the largest k whose split-half stability ({curve[k]:.4g}) is within "
            f"{self.tolerance:g} of the best ({best:.4g})"
        )


@dataclass(frozen=True)
class InstabilityCriterion:
    """staNMF instability (Wu et al., PNAS 2016): fit all of V from ``n_restarts`` random
    starts at each k; the instability is the mean, over pairs of restarts, of the Hungarian-
    matched dissimilarity 1 - mean matched cosine of their bases. Rule: the LARGEST k whose
    instability is within ``tolerance`` of the smallest (the finest set that restarts agree
    on). Costs ``n_restarts`` full fits per k (the split-half criterion: 2 x 2 half fits)."""

    n_restarts: int = 3
    tolerance: float = 0.01
    init: str = "random"
    name: str = "instability"

    @property
    def n_splits(self) -> int:  # fits per k, for select_k's progress total
        return self.n_restarts

    def curve(self, sweep: Sweep) -> dict[int, float]:
        out: dict[int, float] = {}
        for k in sweep.ks:
            jobs = [(sweep.V, k, {**sweep.fit_kwargs, "init": self.init,
                                  "seed": _half_seed(sweep.seed, 1000 + r, k)})
                    for r in range(self.n_restarts)]

            def done(r: int, k: int = k) -> None:
                sweep.tick(f"instability restart {r + 1}/{self.n_restarts}, k={k}")

            bases = [f.H for f in nmf_fit_many(jobs, done)]
            diss = [1.0 - float(np.mean(match_bases(bases[a], bases[b])[1]))
                    for a in range(len(bases)) for b in range(a + 1, len(bases))]
            out[k] = float(np.mean(diss)) if diss else 0.0
        return out

    def choose(self, curve: dict[int, float]) -> tuple[int, str]:
        best = min(curve.values())
        k = max(kk for kk, v in curve.items() if v <= best + self.tolerance)
        return k, (f"k={k} is the largest k whose staNMF instability ({curve[k]:.3g}) is "
                   f"within {self.tolerance:g} of the lowest ({best:.3g})")


@dataclass(frozen=True)
class BiCrossValidationCriterion:
    """Bi-cross-validation (Owen & Perry, AOAS 2009) adapted to NMF: the IMAGES are split in
    two groups and the channels in two groups; each of the 4 blocks D = V[I_h, J_h] is held out
    in turn, NMF is fitted on A = V[I_t, J_t] (W_A H_A), the held-out images' weights W_C come
    from an NNLS fit of C = V[I_h, J_t] on H_A, the held-out channels' bases H_B from an NNLS
    fit of B = V[I_t, J_h] on W_A, and D is predicted as W_C H_B. The curve is the mean relative
    squared error ||D - W_C H_B||^2 / ||D||^2. With NNLS fits the error keeps falling slightly
    beyond the true k (measured on planted data: by 0.0001-0.004 per extra concept, against
    0.1-0.24 per missing one), so the rule is the SMALLEST k within ``tolerance`` (0.01) of the
    lowest error."""

    tolerance: float = 0.01
    name: str = "bcv"

    @property
    def n_splits(self) -> int:  # fits per k (4 blocks), for select_k's progress total
        return 4

    def curve(self, sweep: Sweep) -> dict[int, float]:
        from concept_engine.nmf import nmf_transform

        V = sweep.V
        if _is_host_sparse(V):
            V = V.toarray()
        xp = get_namespace(V)
        off = sweep.offsets
        rng = np.random.default_rng(np.random.SeedSequence([sweep.seed, 0xBC5]))
        order = canonical_order(sweep.order, sweep.n_images)
        img = np.array_split(rng.permutation(sweep.n_images), 2)
        ch = np.array_split(rng.permutation(int(V.shape[1])), 2)
        rows = [to_device(_rows(order[np.sort(g)], off), xp) for g in img]
        cols = [to_device(np.sort(g), xp) for g in ch]
        out: dict[int, float] = {}
        for k in sweep.ks:
            errs = []
            for hi in range(2):
                for hj in range(2):
                    ti, tj = 1 - hi, 1 - hj
                    A = V[rows[ti]][:, cols[tj]]
                    B = V[rows[ti]][:, cols[hj]]
                    C = V[rows[hi]][:, cols[tj]]
                    D = V[rows[hi]][:, cols[hj]]
                    fit = nmf_fit(A, k, **sweep.fit_kwargs)
                    W_C = nmf_transform(C, fit.H, solver=sweep.fit_kwargs.get("solver", "hals"))
                    H_Bt = nmf_transform(xp.ascontiguousarray(B.T), xp.ascontiguousarray(fit.W.T),
                                         solver=sweep.fit_kwargs.get("solver", "hals"))
                    pred = W_C @ H_Bt.T
                    den = float(xp.sum(D.astype(xp.float64) ** 2))
                    num = float(xp.sum((D - pred).astype(xp.float64) ** 2))
                    errs.append(num / den if den > 0 else 0.0)
                    sweep.tick(f"bi-cross-validation block {2 * hi + hj + 1}/4, k={k}")
            out[k] = float(np.mean(errs))
        return out

    def choose(self, curve: dict[int, float]) -> tuple[int, str]:
        best = min(curve.values())
        k = min(kk for kk, v in curve.items() if v <= best + self.tolerance)
        return k, (f"k={k} is the smallest k whose bi-cross-validation error ({curve[k]:.4g}) is "
                   f"within {self.tolerance:g} of the lowest ({best:.4g})")


CRITERIA: dict[str, type] = {
    "certainty": CertaintyCriterion,
    "stability": StabilityCriterion,
    "elbow": ElbowCriterion,
    "instability": InstabilityCriterion,
    "bcv": BiCrossValidationCriterion,
}
#: recorded by default beside the chosen criterion (instability costs extra full fits)
DEFAULT_RECORD = ("stability", "certainty", "elbow")


def _is_host_sparse(V: Any) -> bool:
    import scipy.sparse as sp  # noqa: PLC0415

    return sp.issparse(V)


def _half_seed(seed: int, split: int, half: int) -> int:
    return int(np.random.SeedSequence([seed, split, half]).generate_state(1)[0])


def canonical_order(order: Any, n_images: int) -> np.ndarray:
    """``order`` (a permutation of range(n_images)) as an int64 array; identity for None."""
    if order is None:
        return np.arange(n_images, dtype=np.int64)
    out = np.asarray(order, dtype=np.int64)
    if out.shape != (n_images,) or not np.array_equal(np.sort(out), np.arange(n_images)):
        raise ValueError(f"order must be a permutation of range({n_images})")
    return out


def _split_images(n_images: int, seed: int, order: Any = None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Two disjoint halves of range(n_images) from a seeded permutation of the canonical
    ``order`` (see :attr:`Sweep.order`); each half lists its images in that order."""
    order = canonical_order(order, n_images)
    perm = np.random.default_rng(seed).permutation(n_images)
    half = n_images // 2
    return order[np.sort(perm[:half])], order[np.sort(perm[half:])]


def _rows(images: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Row indices of V (host int64) belonging to the given images (offsets: Sweep.offsets)."""
    if len(images) == 0:
        return np.zeros(0, np.int64)
    return np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in images])


def _as_sizes(hw: Any, n_images: int) -> tuple[tuple[int, int], ...]:
    """Per-image (h, w) from one size (int or pair) or a sequence of n_images pairs."""
    if not isinstance(hw, (int, np.integer)) and len(hw) and not isinstance(
            hw[0], (int, np.integer)):
        sizes = tuple((int(h), int(w)) for h, w in hw)
        if len(sizes) != n_images:
            raise ValueError(f"{len(sizes)} sizes for {n_images} images")
        return sizes
    return (_as_hw(hw),) * n_images


def _as_hw(hw: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(hw, (int, np.integer)):
        side = math.isqrt(int(hw))
        if side * side != int(hw):
            raise ValueError(f"hw={hw} is not square; pass (h, w)")
        return side, side
    h, w = (int(v) for v in hw)
    return h, w


def select_k(
    V: Any,
    n_images: int,
    hw: int | Sequence[int] | Sequence[tuple[int, int]],
    ks: Iterable[int] = range(2, 7),
    criterion: str | KCriterion = "stability",
    *,
    seed: int = 0,
    solver: str = "hals",
    init: str = "nndsvda",
    max_iter: int = 200,
    tol: float = 1e-4,
    record: Sequence[str | KCriterion] | None = None,
    fits: dict[int, NMFResult] | None = None,
    input_sizes: Sequence[tuple[int, int]] | None = None,
    progress: Callable[[int, int, str], None] | None = None,
    order: Sequence[int] | np.ndarray | None = None,
) -> KSelection:
    """Choose k for V (n_images * h * w, C) by ``criterion`` and return every curve and fit.

    Args:
        V: features, rows ordered image by image, then (y, x); NumPy/CuPy (any dtype
            :func:`~concept_engine.nmf.nmf_fit` accepts) or SciPy CSR. Computed once by the
            caller and reused for every k and every split.
        n_images: N.
        hw: (h, w) of every image's feature map, or h*w when square, or a sequence of
            n_images (h_i, w_i) pairs when the sizes differ (keep-aspect inputs).
        ks: candidate numbers of concepts (the seed: 2..6).
        criterion: 'stability' | 'certainty' | 'elbow', or a :class:`KCriterion` instance.
        seed: seed of the NMF inits and of the image splits.
        solver, init, max_iter, tol: passed to :func:`~concept_engine.nmf.nmf_fit`.
        record: criteria whose curves are computed too (the chosen one always is). Default:
            :data:`DEFAULT_RECORD` (stability, certainty, elbow); pass e.g.
            ``("certainty", "elbow")`` to skip the split-half fits, or add "instability".
        fits: already computed fits on all of V, by k (reused, not refitted).
        input_sizes: network input (H, W) of each image; the certainty criterion upsamples
            each map to it (default: the seed's 224 x 224 for every image).
        progress: called as ``progress(done, total, message)`` after every NMF fit of the
            sweep (the full fits and the split-half fits), for progress bars.
        order: the images in a canonical order (a permutation of range(n_images), e.g. by
            content): the splits then do not depend on the order the images came in.

    Returns:
        KSelection; ``result.fit`` is the fit on all of V for the chosen k.
    """
    ks_t = tuple(sorted({int(k) for k in ks}))
    if not ks_t or ks_t[0] < 1:
        raise ValueError(f"ks must be positive integers, got {ks_t}")
    sizes = _as_sizes(hw, n_images)
    expected = sum(h * w for h, w in sizes)
    if V.shape[0] != expected:
        raise ValueError(f"V has {V.shape[0]} rows, expected sum of h*w = {expected}")

    def make(c: str | KCriterion) -> KCriterion:
        if isinstance(c, str):
            if c not in CRITERIA:
                raise ValueError(f"unknown criterion {c!r}; one of {sorted(CRITERIA)}")
            return CRITERIA[c]()
        return c

    chosen = make(criterion)
    recorded = [make(c) for c in (record if record is not None else DEFAULT_RECORD)]
    if chosen.name not in {c.name for c in recorded}:
        recorded.append(chosen)
    fit_kwargs: dict[str, Any] = {"solver": solver, "init": init, "max_iter": max_iter,
                                  "tol": tol, "seed": seed}
    all_fits = dict(fits or {})
    missing = [k for k in ks_t if k not in all_fits]
    total = len(missing) + sum(getattr(c, "n_splits", 0) * len(ks_t) for c in recorded)
    done = 0

    def tick(message: str) -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total, message)

    fitted = nmf_fit_many([(V, k, fit_kwargs) for k in missing],
                          lambda i: tick(f"fit k={missing[i]}"))
    all_fits.update(zip(missing, fitted, strict=True))
    sweep = Sweep(
        V=V, n_images=n_images, sizes=sizes, ks=ks_t,
        input_sizes=(tuple((int(h), int(w)) for h, w in input_sizes)
                     if input_sizes is not None else None),
        fits=all_fits, fit_kwargs=fit_kwargs, seed=seed, tick=tick,
        order=None if order is None else canonical_order(order, n_images),
    )
    curves = {c.name: c.curve(sweep) for c in recorded}
    k, reason = chosen.choose(curves[chosen.name])
    return KSelection(
        k=k,
        criterion=chosen.name,
        reason=reason,
        curves=curves,
        fits={kk: all_fits[kk] for kk in ks_t},
    )

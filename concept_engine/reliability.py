"""How much to trust a concept set: bootstrap stability per concept, split-half for the set,
and the training statistics that explanations of new images are judged against.

Bootstrap stability (per concept). The kept images are resampled with replacement ``B`` times;
each resample is refitted at the chosen k, WARM-STARTED from the final fit (its bases H and the
resampled images' rows of W) for ``iters`` solver iterations; the refitted bases are matched
one-to-one to the final bases (Hungarian assignment on cosine) and concept j's stability is the
mean matched cosine over the resamples, with the 5%-95% interval (a 90% interval). A concept
that only one part of the data supports drifts away from its final basis when that part is
under-represented; a concept every image supports stays put. Because of the warm start this is
a measure of LOCAL stability (it cannot find an entirely different optimum); the set-level
split-half stability (two halves of the images fitted from independent random starts, see
:mod:`concept_engine.kselect`) covers that. Defaults ``B=12, iters=15`` keep the cost at about
10% of a discovery on CPU (measured: see README, "Reliability").

A set is flagged (``reliability_warning``) when its split-half stability or the mean of its
per-concept stabilities is below :data:`WARN_BELOW` = 0.7: at that level at least one concept
changes visibly when the images change.

Training statistics for explanations (see :func:`training_statistics`):

- ``presence_threshold`` (k,): concept j is PRESENT in an image when its concept certainty
  (the seed's definition: the mean raw heatmap over the pixels at >= 10% of the map's max, an
  ABSOLUTE magnitude) reaches the :data:`PRESENCE_QUANTILE` (10%) quantile of concept j's
  certainties over the training images. A new image that activates a concept less than 90% of
  the training images do does not get that concept drawn.
- ``relative_score``: the fraction of training images whose certainty for concept j is at most
  the new image's (its training percentile, 0..1).
- ``reconstruction_errors`` (N,): per training image ||V_i - W_i H||_F / ||V_i||_F; a new
  image whose relative error exceeds the :data:`OOD_QUANTILE` (95th percentile) of these is
  ``out_of_distribution``: the concepts do not describe it. Measured with an ant concept set
  (k=2, 100 training ants): the 95th percentile flags 6 of 6 gymnast photos, 64 of 89
  ImageNet photos of other classes and 1 of 23 held-back ants; the 99th percentile flagged only
  4 of 6 gymnasts (a few training ants are tiny in a large background and reconstruct poorly,
  so the error's upper tail is long).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from concept_engine.backend import to_device, to_host
from concept_engine.matching import match_bases

log = logging.getLogger(__name__)

WARN_BELOW = 0.7
PRESENCE_QUANTILE = 0.10
OOD_QUANTILE = 0.95
DEFAULT_B = 12
DEFAULT_ITERS = 15


@dataclass(frozen=True)
class Reliability:
    """stability (k,) mean matched cosine per concept; interval (k, 2) its 5%-95% range;
    set_stability: split-half stability at the chosen k (NaN when unknown)."""

    stability: np.ndarray
    interval: np.ndarray
    set_stability: float
    n_boot: int

    @property
    def mean_stability(self) -> float:
        return float(np.mean(self.stability)) if self.stability.size else float("nan")

    @property
    def warning(self) -> str:
        return reliability_warning(self.set_stability, self.mean_stability)


def reliability_warning(set_stability: float, mean_stability: float) -> str:
    """A one-line warning when either measure is below WARN_BELOW, else ''."""
    low = [f"{label} {v:.2f}" for label, v in (("split-half stability", set_stability),
                                                ("mean concept stability", mean_stability))
           if v == v and v < WARN_BELOW]
    if not low:
        return ""
    return (f"LOW RELIABILITY: {', '.join(low)} < {WARN_BELOW:g}; these concepts change when "
            f"the images change - use more (or more homogeneous) images or a smaller k")


def _row_index(images: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    return np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in images])


def bootstrap_stability(V: Any, sizes: Sequence[tuple[int, int]], W: Any, H: Any, *,
                        n_boot: int = DEFAULT_B, iters: int = DEFAULT_ITERS, seed: int = 0,
                        solver: str = "hals", order: Any = None,
                        progress: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-concept bootstrap stability of the fit (W, H) of V (see the module docstring).

    V (sum h_i*w_i, C) rows image by image (NumPy, CuPy or SciPy CSR), sizes the (h, w) of each
    image, W (rows, k), H (k, C) the final fit. ``order``: the images in a canonical order
    (see :attr:`concept_engine.kselect.Sweep.order`): resamples are drawn over it, so they do
    not depend on the order the images came in. ``progress(done, total)`` is called after
    every batch of resamples (it may raise to cancel). Returns (stability (k,), interval
    (k, 2))."""
    from concept_engine.kselect import canonical_order
    from concept_engine.nmf import nmf_fit_many

    k = int(H.shape[0])
    n = len(sizes)
    if n < 2 or n_boot < 1:
        return np.ones(k, np.float32), np.ones((k, 2), np.float32)
    offsets = np.concatenate([[0], np.cumsum([h * w for h, w in sizes])]).astype(np.int64)
    canonical = canonical_order(order, n)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0xB007]))
    W_host = to_host(W)
    cos = np.zeros((n_boot, k), np.float64)
    import scipy.sparse as sp

    xp_like = None if sp.issparse(V) else V
    # resamples are fitted side by side (nmf_fit_many), as many at a time as there are cores,
    # so at most that many resampled copies of V exist at once
    batch = max(1, os.cpu_count() or 1)
    for start in range(0, n_boot, batch):
        jobs = []
        for _ in range(start, min(n_boot, start + batch)):
            pick = canonical[np.sort(rng.integers(0, n, size=n))]
            rows = _row_index(pick, offsets)
            idx = rows if xp_like is None else to_device(rows, _ns(xp_like))
            W0 = np.ascontiguousarray(W_host[rows])
            if xp_like is not None:
                W0 = to_device(W0, _ns(xp_like))
            jobs.append((V[idx], k, {"solver": solver, "W": W0, "H": H, "max_iter": iters,
                                     "tol": 0.0, "seed": seed}))
        for b, fit in enumerate(nmf_fit_many(jobs), start=start):
            _, c = match_bases(H, fit.H)
            cos[b] = c
        if progress is not None:
            progress(min(n_boot, start + batch), n_boot)
    stab = cos.mean(axis=0).astype(np.float32)
    interval = np.quantile(cos, [0.05, 0.95], axis=0).T.astype(np.float32)
    return stab, interval


def _ns(a: Any) -> Any:
    from concept_engine.backend import get_namespace

    return get_namespace(a)


def split_half_at(V: Any, sizes: Sequence[tuple[int, int]], k: int, *, seed: int = 0,
                  solver: str = "hals", max_iter: int = 200, tol: float = 1e-4,
                  order: Any = None) -> float:
    """Split-half stability of V at one k (the stability criterion's definition; ``order``
    as in :func:`~concept_engine.kselect.select_k`)."""
    from concept_engine.kselect import StabilityCriterion, Sweep, canonical_order

    sweep = Sweep(V=V, n_images=len(sizes), sizes=tuple(sizes), ks=(k,), fits={},
                  fit_kwargs={"solver": solver, "init": "random", "max_iter": max_iter,
                              "tol": tol, "seed": seed}, seed=seed,
                  order=None if order is None else canonical_order(order, len(sizes)))
    return float(StabilityCriterion().curve(sweep)[k])


@dataclass(frozen=True)
class TrainingStats:
    """What explanations are judged against (see the module docstring)."""

    presence_threshold: np.ndarray  # (k,) float32
    reconstruction_errors: np.ndarray  # (N,) float32
    ood_threshold: float


def relative_errors(rows: Sequence[np.ndarray], W: Any, H: Any) -> np.ndarray:
    """Per image ||V_i - W_i H||_F / ||V_i||_F; rows[i] (h_i*w_i, C) host, W (sum, k)."""
    W = np.asarray(to_host(W), np.float32)
    H = np.asarray(to_host(H), np.float32)
    out = np.zeros(len(rows), np.float32)
    start = 0
    for i, r in enumerate(rows):
        # rows arrive as SciPy CSR (discovery._rows); one image's rows are small enough to
        # make dense here
        r = r.toarray() if hasattr(r, "toarray") else np.asarray(r)
        Wi = W[start:start + r.shape[0]]
        start += r.shape[0]
        norm = float(np.linalg.norm(r))
        out[i] = float(np.linalg.norm(r - Wi @ H)) / norm if norm > 0 else 0.0
    return out


def training_statistics(certainties: np.ndarray, errors: np.ndarray) -> TrainingStats:
    """Presence thresholds (k,) and the OOD error threshold from the training images."""
    cert = np.asarray(certainties, np.float64)
    if cert.shape[0] == 0:
        return TrainingStats(np.zeros(cert.shape[1], np.float32), np.zeros(0, np.float32),
                             float("inf"))
    thr = np.quantile(cert, PRESENCE_QUANTILE, axis=0).astype(np.float32)
    errs = np.asarray(errors, np.float32)
    return TrainingStats(thr, errs, float(np.quantile(errs, OOD_QUANTILE)))


def judge(certainties: np.ndarray, error: float, training_certainties: np.ndarray,
          presence_threshold: np.ndarray, ood_threshold: float
          ) -> tuple[np.ndarray, np.ndarray, bool]:
    """(present (k,) bool, relative_score (k,) training percentile 0..1, out_of_distribution)
    of one new image with concept certainties (k,) and relative reconstruction error."""
    c = np.asarray(certainties, np.float64)
    tc = np.asarray(training_certainties, np.float64)
    present = c >= np.asarray(presence_threshold, np.float64)
    if tc.shape[0]:
        rel = (tc <= c[None, :]).mean(axis=0)
    else:
        rel = np.full(c.shape, np.nan)
    ood = bool(error > ood_threshold)
    return present & (c > 0), rel.astype(np.float32), ood

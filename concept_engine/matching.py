"""Matching concept bases between two fits: Hungarian assignment on cosine similarity.

Used to compare fits on two halves of the images (stability), to align concepts of repeated
runs, and to build the k -> k+1 concept hierarchy. Bases H are (k, C) non-negative rows, so
cosines lie in [0, 1]. The similarity matrix is (k_a, k_b), tiny; it is copied to the host for
``scipy.optimize.linear_sum_assignment`` (a deliberate boundary: there is no device Hungarian).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment

from concept_engine.backend import get_namespace, to_host

__all__ = ["cosine_matrix", "hierarchy", "match_bases"]


def cosine_matrix(H_a: Any, H_b: Any) -> np.ndarray:
    """(k_a, k_b) float64 host array of cosines between the rows of H_a (k_a, C) and H_b (k_b, C).

    A zero row has cosine 0 with everything (not NaN).
    """
    xp = get_namespace(H_a, H_b)
    A = xp.asarray(H_a, dtype=xp.float64)
    B = xp.asarray(H_b, dtype=xp.float64)
    if A.ndim != 2 or B.ndim != 2 or A.shape[1] != B.shape[1]:
        raise ValueError(f"bases must be (k, C) with the same C, got {A.shape} and {B.shape}")
    na = xp.linalg.norm(A, axis=1)
    nb = xp.linalg.norm(B, axis=1)
    A = A / xp.where(na > 0, na, 1)[:, None]
    B = B / xp.where(nb > 0, nb, 1)[:, None]
    return to_host(A @ B.T)


def match_bases(H_a: Any, H_b: Any) -> tuple[np.ndarray, np.ndarray]:
    """One-to-one matching of the rows of H_a (k_a, C) to rows of H_b (k_b, C).

    Maximises the total cosine (Hungarian algorithm).

    Returns:
        perm: (k_a,) int64; ``perm[i]`` is the row of H_b matched to row i of H_a, or -1 when
            k_a > k_b and row i is left unmatched.
        cosines: (k_a,) float64 cosine of each matched pair (0 for unmatched rows).
    """
    sim = cosine_matrix(H_a, H_b)
    rows, cols = linear_sum_assignment(sim, maximize=True)
    perm = np.full(sim.shape[0], -1, dtype=np.int64)
    cosines = np.zeros(sim.shape[0], dtype=np.float64)
    perm[rows] = cols
    cosines[rows] = sim[rows, cols]
    return perm, cosines


def hierarchy(H_k: Any, H_k1: Any, *, return_cosines: bool = False) -> Any:
    """Parent of each concept of a (k+1)-concept fit among the concepts of a k-concept fit.

    Args:
        H_k: (k, C) bases of the coarser fit.
        H_k1: (k+1, C) bases of the finer fit (any number of rows works).
        return_cosines: also return the cosine to the parent.

    Returns:
        parents: (k+1,) int64, ``parents[j]`` = argmax_i cos(H_k1[j], H_k[i]) (ties: lowest i);
        with ``return_cosines``, the pair (parents, cosines (k+1,) float64).
    """
    sim = cosine_matrix(H_k1, H_k)  # (k+1, k)
    parents = np.argmax(sim, axis=1).astype(np.int64)
    if return_cosines:
        return parents, sim[np.arange(sim.shape[0]), parents]
    return parents

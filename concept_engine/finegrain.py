"""Fine-graining of a training folder: which images DFF learns from, and why.

Two filters, as in the seed project, each a pure function over scores that returns one
``Decision`` per image (kept or not, the stage, a human-readable reason and the score used):

- prediction filter: keep images the classifier assigns to the target class with probability
  >= ``min_probability`` (default 0.95). If fewer than ``min_images`` (default 10) pass, the seed
  stopped the program; here the documented outcome is: the filter is not applied, every image
  is kept and a notice says so.
- certainty filter: drop images whose mean concept certainty is below the ``quantile`` (default
  0.25) of all mean certainties - only if at least ``min_images`` (default 15) remain; otherwise
  the filter is skipped with a notice.

``resolve_class`` maps a class name (folder name or explicit) to the classifier's index:
case-, space-, dash- and underscore-insensitive, any comma-separated synonym, or a WordNet id.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from dff_protos.errors import InvalidInput

PREDICTION = "prediction_filter"
CERTAINTY = "certainty_filter"
ERROR = "error"


@dataclass(frozen=True)
class Decision:
    """One filter's verdict on one image. ``score`` is what the stage looked at (target-class
    probability or mean certainty; NaN when none), ``probability`` the target-class probability
    when known (NaN otherwise)."""

    id: str
    kept: bool
    stage: str
    reason: str
    score: float = math.nan
    probability: float = math.nan


@dataclass
class FilterOutcome:
    """Decisions of one filter. ``kept`` (N,) bool is what goes on; ``applied`` is False when
    the filter was skipped (then every image is kept and ``notice`` says why)."""

    decisions: list[Decision]
    kept: np.ndarray
    applied: bool
    threshold: float
    notice: str | None = None
    extra: dict = field(default_factory=dict)


def _norm(name: str) -> str:
    return re.sub(r"[\s_\-']+", "", name.strip().lower())


def resolve_class(name: str, class_names: Sequence[str],
                  wnids: Sequence[str] | None = None) -> int:
    """Index of ``name`` in ``class_names``.

    Matches, in order: a WordNet id (``n02219486``, if ``wnids`` is given), the full class name,
    any comma-separated synonym of it ("ant, emmet, pismire") - all ignoring case, spaces,
    dashes and underscores. Raises InvalidInput naming up to five close matches when nothing
    (or more than one class) matches."""
    if not name or not name.strip():
        raise InvalidInput("empty class name")
    key = _norm(name)
    if wnids:
        for i, wnid in enumerate(wnids):
            if wnid and wnid.lower() == name.strip().lower():
                return i
    exact = [i for i, c in enumerate(class_names) if _norm(c) == key]
    if len(exact) == 1:
        return exact[0]
    synonyms = [i for i, c in enumerate(class_names)
                if any(_norm(s) == key for s in c.split(","))]
    if len(synonyms) == 1:
        return synonyms[0]
    if len(exact) > 1 or len(synonyms) > 1:
        both = exact or synonyms
        options = ", ".join(f"{class_names[i]!r} ({i})" for i in both[:5])
        raise InvalidInput(f"class name {name!r} is ambiguous: {options}; give a WordNet id "
                           f"or the full class name")
    vocabulary: dict[str, str] = {}
    for c in class_names:
        for s in c.split(","):
            vocabulary.setdefault(s.strip().lower(), c)
    close = difflib.get_close_matches(name.strip().lower().replace("_", " "),
                                      list(vocabulary), n=5, cutoff=0.6)
    hint = (f"; close matches: {', '.join(repr(vocabulary[c]) for c in close)}" if close
            else "")
    raise InvalidInput(f"unknown class {name!r} for this classifier "
                       f"({len(class_names)} classes){hint}")


def prediction_filter(ids: Sequence[str], probs: np.ndarray, target_index: int,
                      min_probability: float = 0.95, min_images: int = 10,
                      class_name: str = "") -> FilterOutcome:
    """Keep images with probs[i, target_index] >= min_probability.

    probs (N, num_classes) softmax probabilities, one row per id. When fewer than
    ``min_images`` images pass, nothing is dropped (``applied`` False, a notice)."""
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[0] != len(ids):
        raise InvalidInput(f"probs must be (N={len(ids)}, classes), got {probs.shape}")
    if not 0 <= target_index < probs.shape[1]:
        raise InvalidInput(f"target class index {target_index} outside 0..{probs.shape[1] - 1}")
    label = class_name or f"class {target_index}"
    p = np.nan_to_num(probs[:, target_index], nan=0.0)
    passed = p >= min_probability
    n_pass = int(passed.sum())
    if n_pass < min_images:
        notice = (f"prediction filter not applied: only {n_pass} of {len(ids)} images have "
                  f"p({label}) >= {min_probability:g} (fewer than {min_images}); all kept")
        decisions = [Decision(i, True, PREDICTION,
                              f"p({label})={float(s):.3f}; filter skipped (too few pass)",
                              float(s), float(s)) for i, s in zip(ids, p, strict=True)]
        return FilterOutcome(decisions, np.ones(len(ids), bool), False, min_probability, notice)
    decisions = []
    for i, s, ok in zip(ids, p, passed, strict=True):
        op = ">=" if ok else "<"
        decisions.append(Decision(i, bool(ok), PREDICTION,
                                  f"p({label})={float(s):.3f} {op} {min_probability:g}",
                                  float(s), float(s)))
    return FilterOutcome(decisions, passed, True, min_probability)


def certainty_filter(ids: Sequence[str], mean_certainty: np.ndarray, quantile: float = 0.25,
                     min_images: int = 15) -> FilterOutcome:
    """Drop images whose mean certainty (N,) is below its ``quantile`` (linear interpolation,
    numpy's default), only if at least ``min_images`` remain; else keep all with a notice."""
    scores = np.nan_to_num(np.asarray(mean_certainty, dtype=np.float64), nan=0.0)
    if scores.shape != (len(ids),):
        raise InvalidInput(f"mean_certainty must be (N={len(ids)},), got {scores.shape}")
    if not 0.0 <= quantile <= 1.0:
        raise InvalidInput(f"certainty quantile must be in 0..1, got {quantile}")
    if len(ids) == 0:
        return FilterOutcome([], np.ones(0, bool), False, math.nan, "no images")
    cut = float(np.quantile(scores, quantile))
    passed = scores >= cut
    n_pass = int(passed.sum())
    if n_pass < min_images:
        notice = (f"certainty filter not applied: {n_pass} of {len(ids)} images would remain "
                  f"(fewer than {min_images}); all kept")
        decisions = [Decision(i, True, CERTAINTY,
                              f"mean certainty {float(s):.4g}; filter skipped (too few remain)",
                              float(s)) for i, s in zip(ids, scores, strict=True)]
        return FilterOutcome(decisions, np.ones(len(ids), bool), False, cut, notice)
    decisions = []
    for i, s, ok in zip(ids, scores, passed, strict=True):
        op = ">=" if ok else "<"
        decisions.append(Decision(
            i, bool(ok), CERTAINTY,
            f"mean certainty {float(s):.4g} {op} q{quantile:g}={cut:.4g}", float(s)))
    return FilterOutcome(decisions, passed, True, cut)

"""Fine-graining of a training folder: which images DFF learns from, and why.

Two filters, as in the seed project, each a pure function over scores that returns one
``Decision`` per image (kept or not, the stage, a human-readable reason and the score used):

- prediction filter: keep images the classifier assigns to the target class, by one of three
  rules (:data:`concept_engine.options.PREDICTION_MODES`): p(target) >= ``min_probability``, the
  target among the top-n classes, or a temperature-calibrated p(target) >= ``min_probability``.
  If fewer than ``min_images`` pass, the seed stopped the program and an earlier version kept
  EVERY image (a cliff: 9 passing kept all, 10 kept 10); here the ``min_images`` most probable
  images are kept and a notice says so.
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


def calibrate(probs: np.ndarray, temperature: float) -> np.ndarray:
    """Temperature scaling of softmax probabilities: softmax(log p / T) row by row (T > 1
    softens an over-confident classifier, T < 1 sharpens an under-confident one)."""
    if not temperature > 0:
        raise InvalidInput(f"temperature must be > 0, got {temperature}")
    logits = np.log(np.clip(np.asarray(probs, np.float64), 1e-30, None)) / temperature
    logits -= logits.max(axis=1, keepdims=True)
    e = np.exp(logits)
    return e / e.sum(axis=1, keepdims=True)


def prediction_filter(ids: Sequence[str], probs: np.ndarray, target_index: int,
                      min_probability: float = 0.95, min_images: int = 10,
                      class_name: str = "", *, mode: str = "probability", top_n: int = 5,
                      temperature: float = 1.0) -> FilterOutcome:
    """Keep the images the classifier assigns to the target class.

    probs (N, num_classes) softmax probabilities, one row per id. ``mode``:

    - ``probability``: p(target) >= min_probability;
    - ``top_n``: the target class is among the ``top_n`` most probable classes;
    - ``calibrated``: the temperature-scaled p(target) (:func:`calibrate`) >= min_probability.

    No cliff: when fewer than ``min_images`` pass, the ``min_images`` images with the highest
    p(target) are kept (all when there are fewer), and a notice records it."""
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[0] != len(ids):
        raise InvalidInput(f"probs must be (N={len(ids)}, classes), got {probs.shape}")
    if not 0 <= target_index < probs.shape[1]:
        raise InvalidInput(f"target class index {target_index} outside 0..{probs.shape[1] - 1}")
    label = class_name or f"class {target_index}"
    p = np.nan_to_num(probs[:, target_index], nan=0.0)
    if mode == "probability":
        score = p
        passed = p >= min_probability
        rule = f">= {min_probability:g}"
    elif mode == "calibrated":
        score = calibrate(np.nan_to_num(probs, nan=0.0), temperature)[:, target_index]
        passed = score >= min_probability
        rule = f"calibrated (T={temperature:.3g}) >= {min_probability:g}"
    elif mode == "top_n":
        if top_n < 1:
            raise InvalidInput(f"top_n must be >= 1, got {top_n}")
        rank = (np.nan_to_num(probs, nan=0.0) > p[:, None]).sum(axis=1)  # 0 = the top class
        score = p
        passed = rank < top_n
        rule = f"in the top {top_n}"
    else:
        raise InvalidInput(f"unknown prediction mode {mode!r}")
    n_pass = int(passed.sum())
    passed_rule = passed.copy()
    notice = None
    if n_pass < min_images:
        order = np.argsort(-score, kind="stable")
        passed = np.zeros(len(ids), bool)
        passed[order[:min(min_images, len(ids))]] = True
        notice = (f"prediction filter: only {n_pass} of {len(ids)} images have p({label}) "
                  f"{rule}; kept the {int(passed.sum())} most probable instead (min_images="
                  f"{min_images})")
    decisions = []
    for i, s, pp, ok, rule_ok in zip(ids, score, p, passed, passed_rule, strict=True):
        if mode == "top_n":
            why = f"p({label})={float(pp):.3f} {'' if rule_ok else 'not '}in the top {top_n}"
        else:
            op = ">=" if rule_ok else "<"
            cal = f" (calibrated T={temperature:.3g})" if mode == "calibrated" else ""
            why = f"p({label}){cal}={float(s):.3f} {op} {min_probability:g}"
        if ok and not rule_ok:
            why += f"; kept as one of the {min_images} most probable"
        decisions.append(Decision(i, bool(ok), PREDICTION, why, float(s), float(pp)))
    return FilterOutcome(decisions, passed, True, min_probability, notice,
                         extra={"mode": mode, "n_pass": n_pass})


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

"""Prediction and certainty filters, class-name resolution."""

from __future__ import annotations

import math

import numpy as np
import pytest
from dff_protos.errors import InvalidInput

from concept_engine.finegrain import (
    calibrate,
    certainty_filter,
    prediction_filter,
    resolve_class,
)

NAMES = ["tench", "ant", "bee", "golden retriever", "ant, emmet, pismire two"]


def test_resolve_class_variants():
    names = ["tench", "ant", "bee", "golden retriever"]
    assert resolve_class("ant", names) == 1
    assert resolve_class("ANT", names) == 1
    assert resolve_class("golden_retriever", names) == 3
    assert resolve_class("Golden-Retriever", names) == 3
    assert resolve_class("n02206856", names, ["n0", "n1", "n02206856", "n3"]) == 2
    assert resolve_class("pismire", ["tench", "ant, emmet, pismire"]) == 1


def test_resolve_class_unknown_lists_close_matches():
    with pytest.raises(InvalidInput, match="close matches: 'golden retriever'"):
        resolve_class("golden retreiver", ["tench", "golden retriever"])
    with pytest.raises(InvalidInput, match="unknown class"):
        resolve_class("zzzz", ["tench"])
    with pytest.raises(InvalidInput, match="ambiguous"):
        resolve_class("ant", ["ant, x", "ant, y"])


def _probs(p_target):
    p = np.zeros((len(p_target), 3))
    p[:, 1] = p_target
    return p


def test_prediction_filter_keeps_confident_images():
    ids = [f"i{n}" for n in range(12)]
    p = [0.99] * 10 + [0.5, 0.949]
    out = prediction_filter(ids, _probs(p), 1, 0.95, 10, class_name="ant")
    assert out.applied and out.notice is None
    assert out.kept.tolist() == [True] * 10 + [False, False]
    d = out.decisions[-1]
    assert (d.id, d.kept, d.stage) == ("i11", False, "prediction_filter")
    assert d.score == pytest.approx(0.949) and d.probability == pytest.approx(0.949)
    assert "p(ant)=0.949 < 0.95" in d.reason


def test_prediction_filter_no_cliff_keeps_the_most_probable():
    ids = ["a", "b", "c", "d", "e"]
    out = prediction_filter(ids, _probs([0.99, 0.2, 0.1, 0.6, 0.3]), 1, 0.95, 3)
    assert out.kept.tolist() == [True, False, False, True, True]
    assert "only 1 of 5" in out.notice and "kept the 3 most probable" in out.notice
    assert "most probable" in out.decisions[3].reason
    # fewer images than the minimum: all kept
    out = prediction_filter(ids[:2], _probs([0.99, 0.2]), 1, 0.95, 10)
    assert out.kept.all()


def test_prediction_filter_top_n_and_calibrated():
    probs = np.array([[0.5, 0.3, 0.2], [0.1, 0.2, 0.7], [0.05, 0.9, 0.05]])
    ids = ["a", "b", "c"]
    out = prediction_filter(ids, probs, 1, 0.95, 1, mode="top_n", top_n=2)
    assert out.kept.tolist() == [True, True, True]
    out = prediction_filter(ids, probs, 1, 0.95, 1, mode="top_n", top_n=1)
    assert out.kept.tolist() == [False, False, True]
    # T > 1 flattens: 0.9 drops below 0.8; T < 1 sharpens it above 0.95
    out = prediction_filter(ids, probs, 1, 0.8, 1, mode="calibrated", temperature=3.0)
    assert out.decisions[2].score < 0.8
    out = prediction_filter(ids, probs, 1, 0.95, 1, mode="calibrated", temperature=0.5)
    assert out.decisions[2].score > 0.95 and out.kept.tolist() == [False, False, True]
    assert calibrate(probs, 1.0) == pytest.approx(probs)


def test_certainty_filter_quantile():
    ids = [str(i) for i in range(20)]
    scores = np.arange(20, dtype=float)
    out = certainty_filter(ids, scores, 0.25, 15)
    assert out.applied and out.threshold == pytest.approx(4.75)
    assert out.kept.sum() == 15 and not out.kept[:5].any()
    assert out.decisions[0].stage == "certainty_filter" and not out.decisions[0].kept
    assert math.isnan(out.decisions[0].probability)


def test_certainty_filter_skipped_when_too_few_remain():
    ids = [str(i) for i in range(10)]
    out = certainty_filter(ids, np.linspace(0, 1, 10), 0.25, 15)
    assert not out.applied and out.kept.all() and "fewer than 15" in out.notice


def test_certainty_filter_nan_scores_are_zero():
    out = certainty_filter(["a", "b"], np.array([np.nan, 1.0]), 0.5, 1)
    assert out.kept.tolist() == [False, True]

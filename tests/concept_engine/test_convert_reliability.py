"""The issue-8 fields of the engine's messages: options, summary, explain answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
from dff_protos.errors import InvalidInput
from dff_protos.v1 import engine_pb2
from test_store import _v2_set

from concept_engine import convert
from concept_engine.discovery import Explanation
from concept_engine.options import K_CRITERIA, PREDICTION_MODES


def test_options_from_proto_new_fields_and_validation():
    o = convert.options_from_proto(engine_pb2.DiscoverOptions(
        name="ant", prediction_mode="top_n", prediction_top_n=3, bootstrap=-1,
        k_criterion="instability"))
    assert (o.prediction_mode, o.prediction_top_n, o.bootstrap, o.k_criterion) == (
        "top_n", 3, 0, "instability")
    d = convert.options_from_proto(engine_pb2.DiscoverOptions(name="ant"))
    assert d.prediction_mode in PREDICTION_MODES and d.bootstrap > 0 and d.temperature > 0
    with pytest.raises(InvalidInput, match="prediction_mode"):
        convert.options_from_proto(engine_pb2.DiscoverOptions(prediction_mode="vibes"))
    with pytest.raises(InvalidInput, match="k_criterion"):
        convert.options_from_proto(engine_pb2.DiscoverOptions(k_criterion="best"))
    assert "instability" in K_CRITERIA


def test_summary_carries_stability_and_warning():
    cs = _v2_set()
    msg = convert.summary_to_proto(cs, 5)
    assert list(msg.concept_stability) == pytest.approx([0.9, 0.8, 0.5])
    assert list(msg.stability_low) == pytest.approx([0.85, 0.7, 0.3])
    assert msg.set_stability == pytest.approx(0.77)
    assert msg.reliability_warning == ""  # mean 0.73, split-half 0.77: both >= 0.7
    cs.set_stability = 0.5
    assert "LOW RELIABILITY" in convert.summary_to_proto(cs, 5).reliability_warning
    info = convert.concept_set_to_proto(cs).info
    assert info.set_stability == pytest.approx(0.5) and len(info.concept_names) == 3


def test_explain_answer_carries_presence_and_ood():
    e = Explanation("x.jpg", np.zeros((2, 3, 3), np.float32), np.array([0.5, 0.01]),
                    [[np.array([[0, 0], [1, 1]], np.int32)], []], (30, 40), (224, 224),
                    None, np.array([True, False]), np.array([0.4, 0.0]), 0.93, True)
    msg = convert.explanation_to_proto(e, False, names=["thorax", ""])
    assert list(msg.present) == [True, False] and msg.out_of_distribution
    assert msg.reconstruction_error == pytest.approx(0.93)
    assert msg.regions[0].name == "thorax" and msg.regions[0].present
    assert not msg.regions[1].present and len(msg.regions[1].contours) == 0
    assert math.isclose(msg.regions[0].relative_score, 0.4, rel_tol=1e-6)


def test_client_options_round_trip_through_the_engine_message():
    from concept_engine.discovery import DiscoveryOptions

    msg = convert.options_to_proto(DiscoveryOptions(
        name="ant", prediction_mode="calibrated", prediction_top_n=3, bootstrap=0,
        temperature=0.5, certainty_filter="on"))
    o = convert.options_from_proto(msg)
    assert (o.prediction_mode, o.prediction_top_n, o.bootstrap, o.temperature,
            o.certainty_filter) == ("calibrated", 3, 0, 0.5, "on")


def test_listing_carries_the_set_stability(tmp_path):
    from concept_engine.store import read_summary, save_concept_set

    path = save_concept_set(tmp_path / "x.h5", _v2_set())
    info = convert.info_to_proto(read_summary(path))
    assert info.set_stability == pytest.approx(0.77)

"""The typed options on the engine protocol: DiscoveryOptions -> DiscoverOptions -> back."""

from __future__ import annotations

import dataclasses

import pytest
from dff_protos.errors import InvalidInput
from dff_protos.v1 import engine_pb2

from concept_engine.convert import options_from_proto, options_to_proto
from concept_engine.discovery import DiscoveryOptions

# a non-default value for EVERY field (float32 fields carry decimals of <= 7 digits exactly)
NON_DEFAULT = {
    "name": "ant", "target_class": "bee", "k": 4, "k_min": 3, "k_max": 5,
    "k_criterion": "certainty", "prediction_filter": "off", "min_probability": 0.75,
    "prediction_min_images": 4, "certainty_filter": "on", "certainty_quantile": 0.5,
    "certainty_min_images": 7, "solver": "mu", "init": "random", "max_iter": 50,
    "tol": 0.001, "seed": 7, "layer": "conv5_3", "resize_mode": "keep_aspect",
    "size": 256, "model": "resnet_block", "classifier": "other_classifier",
    "wire_dtype": "float16", "threshold": 0.6, "min_area": 0.0,
    "prediction_mode": "calibrated", "prediction_top_n": 3, "temperature": 0.5,
    "bootstrap": 0, "bootstrap_iters": 7, "precision": "fp16",
}


def test_every_field_round_trips():
    fields = {f.name for f in dataclasses.fields(DiscoveryOptions)}
    assert set(NON_DEFAULT) == fields, "a DiscoveryOptions field is not covered here"
    default = DiscoveryOptions()
    for name, value in NON_DEFAULT.items():
        assert getattr(default, name) != value, f"{name}: pick a non-default value"
    opts = DiscoveryOptions(**NON_DEFAULT)
    assert options_from_proto(options_to_proto(opts)) == opts
    # each field alone (so that no field hides behind another one's value)
    for name, value in NON_DEFAULT.items():
        one = dataclasses.replace(default, **{name: value})
        assert options_from_proto(options_to_proto(one)) == one, name


def test_defaults_and_zero_values():
    assert options_from_proto(options_to_proto(DiscoveryOptions())) == DiscoveryOptions()
    # an empty message (an old client) means the defaults
    assert options_from_proto(engine_pb2.DiscoverOptions()) == DiscoveryOptions()
    # min_area = 0 and threshold = 0 are values, not "unset" (proto3 optional)
    zero = DiscoveryOptions(min_area=0.0, threshold=0.0)
    assert options_from_proto(options_to_proto(zero)) == zero


def test_the_two_minimums_travel_separately_and_legacy_min_images_still_works():
    both = DiscoveryOptions(prediction_min_images=4, certainty_min_images=9)
    msg = options_to_proto(both)
    assert (msg.prediction_min_images, msg.certainty_min_images, msg.min_images) == (4, 9, 0)
    legacy = options_from_proto(engine_pb2.DiscoverOptions(min_images=6))
    assert (legacy.prediction_min_images, legacy.certainty_min_images) == (6, 6)
    same = options_to_proto(DiscoveryOptions(prediction_min_images=5, certainty_min_images=5))
    assert same.min_images == 5  # an engine without fields 42/43 still gets it


def test_modes_the_protocol_cannot_carry_are_refused():
    with pytest.raises(InvalidInput, match="prediction_filter"):
        options_to_proto(DiscoveryOptions(prediction_filter="sometimes"))
    with pytest.raises(InvalidInput, match="resize_mode"):
        options_to_proto(DiscoveryOptions(resize_mode="crop"))

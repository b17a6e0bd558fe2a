"""The exporter's options as the engine protocol's DiscoverOptions, and back (engine side)."""

from __future__ import annotations

from concept_engine.convert import options_from_proto
from concept_engine.discovery import DiscoveryOptions
from exporter.remote import options_message


def test_options_round_trip_through_the_engine_protocol():
    # probabilities are float32 on the wire: use values float32 holds exactly
    kw = {"k": 0, "k_min": 3, "k_max": 5, "k_criterion": "certainty", "solver": "mu",
          "init": "random", "seed": 7, "prediction_filter": "off", "certainty_filter": "on",
          "min_probability": 0.75, "certainty_quantile": 0.5, "prediction_min_images": 4,
          "max_iter": 50, "layer": "conv5_3", "resize_mode": "keep_aspect"}
    opts = options_from_proto(options_message("ant", kw))
    assert opts == DiscoveryOptions(name="ant", **{**kw, "certainty_min_images": 4})

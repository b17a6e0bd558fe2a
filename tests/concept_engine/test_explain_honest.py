"""Explanations judged against the training images, on REAL photos and the real models:
an ant concept set does not claim to see ants in the gymnast photos, and does see its main
concept in ants it was not trained on."""

from __future__ import annotations

import os

import numpy as np
import pytest

from concept_engine.cached_source import CachedSource
from concept_engine.discovery import DiscoveryOptions, discover, explain

pytestmark = pytest.mark.slow

N_TRAIN = 60
N_HELD = 14


@pytest.fixture(scope="module")
def setup(shared_data):
    from feature_server.extractor import Extractor

    source = CachedSource(Extractor.from_cache(os.environ.get("DFF_HOME"), batch_size=8))
    paths = sorted((shared_data / "imagenet_data" / "ant").glob("*.jp*g"))
    ants = [(p.name, p.read_bytes()) for p in paths]
    train, held = ants[:N_TRAIN], ants[-N_HELD:]
    cs = discover(train, source, DiscoveryOptions(
        name="ant", k=2, prediction_filter="off", certainty_filter="off", bootstrap=4))
    gymnasts = [(p.name, p.read_bytes())
                for p in sorted((shared_data / "gymnast").glob("*.jpg"))]
    return cs, source, held, gymnasts


def test_ant_concepts_are_not_found_in_gymnasts(setup):
    cs, source, _, gymnasts = setup
    out = [x for x in explain(cs, gymnasts, source) if x.error is None]
    assert len(out) == len(gymnasts)
    for x in out:
        # each gymnast photo is either out of distribution or shows none of the concepts
        assert x.out_of_distribution or not x.present.any(), (x.id, x.certainties)
        assert all(not polys for j, polys in enumerate(x.polygons) if not x.present[j])
        assert x.reconstruction_error > float(np.median(cs.reconstruction_errors))
    assert sum(x.out_of_distribution for x in out) >= len(out) - 1


def test_held_back_ants_show_the_main_concept(setup):
    cs, source, held, _ = setup
    out = [x for x in explain(cs, held, source) if x.error is None]
    assert len(out) >= 10
    main = int(np.argmax(np.asarray(cs.certainties).mean(axis=0)))
    present = np.array([x.present[main] for x in out])
    assert present.mean() >= 0.7, [(x.id, x.certainties) for x in out]
    assert sum(x.out_of_distribution for x in out) <= 0.2 * len(out)
    for x in out:
        assert x.relative_score.shape == (cs.k,) and np.all((0 <= x.relative_score)
                                                            & (x.relative_score <= 1))

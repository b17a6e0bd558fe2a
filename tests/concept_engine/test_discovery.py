"""The discovery pipeline and explain() on a deterministic fake feature source."""

from __future__ import annotations

import numpy as np
import pytest
from dff_protos.errors import InvalidInput, TooFewImages
from fake_source import FakeSource, make_image, make_items

from concept_engine.discovery import DiscoveryOptions, Progress, discover, explain
from concept_engine.finegrain import Decision
from concept_engine.store import load_concept_set, save_concept_set


@pytest.fixture(scope="module")
def items():
    return make_items(24)


def test_deterministic_for_a_seed(items):
    a = discover(items, FakeSource(), DiscoveryOptions(name="ant", k=3, seed=7))
    b = discover(items, FakeSource(), DiscoveryOptions(name="ant", k=3, seed=7))
    np.testing.assert_array_equal(a.bases, b.bases)
    np.testing.assert_array_equal(a.certainties, b.certainties)
    assert a.image_ids == b.image_ids
    assert [d.reason for d in a.decisions] == [d.reason for d in b.decisions]


def test_extract_once_errors_and_filters_recorded(items):
    src = FakeSource({"img003.png": 0.5, "img004.png": 0.94})
    data = items + [("broken.jpg", b"not an image"), ("empty.png", b"")]
    events: list = []
    cs = discover(data, src, DiscoveryOptions(name="ant", k=3, prediction_mode="probability",
                                              certainty_filter="auto"), progress=events.append)
    assert src.calls == 1 and src.items_seen == len(data)
    by_id: dict[str, list[Decision]] = {}
    for d in cs.decisions:
        by_id.setdefault(d.id, []).append(d)
    assert by_id["broken.jpg"][0].stage == "error" and not by_id["broken.jpg"][0].kept
    assert "cannot decode" in by_id["broken.jpg"][0].reason
    low = by_id["img003.png"][0]
    assert (low.stage, low.kept) == ("prediction_filter", False)
    assert low.probability == pytest.approx(0.5) and "p(ant)=0.500 < 0.95" in low.reason
    assert "img003.png" not in cs.image_ids and "img004.png" not in cs.image_ids
    # 22 pass the prediction filter; the certainty filter (q=0.25, interpolated at rank 5.25)
    # drops 6 -> 16 kept
    cert = [d for d in cs.decisions if d.stage == "certainty_filter"]
    assert len(cert) == 22 and sum(not d.kept for d in cert) == 6
    assert all(not np.isnan(d.probability) for d in cert)
    assert cs.n_images == 16 and cs.k == 3
    assert set(cs.stage_seconds) >= {"features", "prediction_filter", "certainty_filter",
                                      "k_sweep", "fit", "regions"}
    stages = {e.stage for e in events if isinstance(e, Progress)}
    assert {"features", "certainty_filter", "fit", "regions"} <= stages
    assert [e for e in events if isinstance(e, Decision)] == cs.decisions


def test_k_estimated_and_used(items):
    events: list = []
    cs = discover(items, FakeSource(), DiscoveryOptions(name="ant", certainty_filter="off"),
                  progress=events.append)
    sweep = [e for e in events if isinstance(e, Progress) and e.stage == "k_sweep"]
    # start, one event per NMF fit of the sweep (5 full + 2 splits x 5 ks), end
    assert len(sweep) == 1 + 15 + 1 and sweep[-2].done == sweep[-2].total == 15
    assert set(cs.k_curves) == {"stability", "certainty", "elbow"}
    assert sorted(cs.k_curves["stability"]) == [2, 3, 4, 5, 6]
    assert cs.k == 3  # three planted colour concepts
    assert cs.provenance["k"] == cs.k and cs.k_criterion == "stability"
    assert "k=3" in cs.k_reason
    assert cs.certainties.shape == (24, 3) and cs.heatmaps[0].shape == (3, 14, 14)


def test_k_given_has_no_sweep(items):
    cs = discover(items[:12], FakeSource(), DiscoveryOptions(name="ant", k=2))
    assert cs.k == 2 and cs.k_curves == {} and "given" in cs.k_reason


def test_unknown_class_auto_skips_with_notice_on_errors(items):
    cs = discover(items[:12], FakeSource(), DiscoveryOptions(name="antt", k=2))
    assert any("prediction filter skipped" in n and "close matches: 'ant'" in n
               for n in cs.notices)
    assert not any(d.stage == "prediction_filter" for d in cs.decisions)
    src = FakeSource()
    with pytest.raises(InvalidInput, match="unknown class 'antt'"):
        discover(items[:12], src, DiscoveryOptions(name="antt", k=2, prediction_filter="on"))
    assert src.calls == 0  # failed before any feature extraction


def test_probabilities_requested_only_when_the_filter_runs(items):
    seen = []

    class Spy(FakeSource):
        def extract(self, data, options):
            seen.append(options.return_probabilities)
            return super().extract(data, options)

    for name, mode in (("ant", "auto"), ("antt", "auto"), ("ant", "off")):
        discover(items[:4], Spy(), DiscoveryOptions(name=name, k=2, prediction_filter=mode))
    assert seen == [True, False, False]


def test_target_class_by_wordnet_id(items):
    src = FakeSource({"img000.png": 0.1})
    cs = discover(items[:12], src, DiscoveryOptions(name="folder", target_class="n02219486",
                                                    k=2, prediction_mode="probability"))
    assert "img000.png" not in cs.image_ids and not cs.notices[:0]


def test_too_few_pass_prediction_filter_keeps_the_most_probable(items):
    src = FakeSource({i: 0.3 for i, _ in items})
    cs = discover(items[:12], src, DiscoveryOptions(name="ant", k=2, prediction_mode="probability",
                                                    certainty_filter="auto"))
    assert cs.n_images == 10  # prediction_min_images, not everything (no cliff)
    assert any("kept the 10 most probable" in n for n in cs.notices)
    assert any("certainty filter not applied" in n for n in cs.notices)


def test_reliability_and_training_statistics(items, tmp_path):
    cs = discover(items, FakeSource(), DiscoveryOptions(name="ant", certainty_filter="off"))
    assert cs.stability.shape == (3,) and cs.stability_interval.shape == (3, 2)
    assert np.all(cs.stability > 0.9)  # three planted, well separated colour concepts
    assert np.all(cs.stability_interval[:, 0] <= cs.stability + 1e-6)
    assert cs.set_stability == pytest.approx(cs.k_curves["stability"][3])
    assert "reliability" in cs.stage_seconds
    assert cs.presence_threshold.shape == (3,) and cs.reconstruction_errors.shape == (24,)
    assert cs.ood_threshold >= float(np.median(cs.reconstruction_errors))
    assert sorted(cs.hierarchy) == [2, 3, 4, 5, 6]
    assert cs.hierarchy[3]["parents"].shape == (3,) and cs.hierarchy[2]["parents"].tolist() == [
        -1, -1]
    back = load_concept_set(save_concept_set(tmp_path / "c.h5", cs))
    np.testing.assert_array_equal(back.stability, cs.stability)
    np.testing.assert_array_equal(back.hierarchy[4]["parents"], cs.hierarchy[4]["parents"])
    assert back.set_stability == pytest.approx(cs.set_stability) and back.schema_version == 2


def test_the_sets_split_half_stability_is_measured_without_the_bootstrap(items):
    """--bootstrap 0 turns off the per-concept bootstrap only: the set's split-half stability
    (and so its LOW RELIABILITY warning) is still measured when k is given."""
    cs = discover(items, FakeSource(), DiscoveryOptions(name="ant", k=3, bootstrap=0))
    assert np.isnan(cs.stability).all()
    assert 0.9 < cs.set_stability <= 1.0
    noisy = discover(items[:12], FakeSource(noise=30.0),  # noise only: no stable concepts
                     DiscoveryOptions(name="ant", k=6, bootstrap=0))
    assert noisy.set_stability < 0.7
    assert any(n.startswith("LOW RELIABILITY: split-half") for n in noisy.notices)


def test_the_order_the_images_come_in_does_not_change_the_set(items):
    """The k sweep's split halves and the bootstrap's resamples are drawn over the images
    sorted by content, so a permuted folder gives the same k, the same split-half curve (bit
    for bit: the same half fits) and the same reliability."""
    from concept_engine.matching import match_bases

    opts = DiscoveryOptions(name="ant", bootstrap=4)
    a = discover(items, FakeSource(), opts)
    shuffled = [items[i] for i in np.random.default_rng(5).permutation(len(items))]
    b = discover(shuffled, FakeSource(), opts)
    assert a.k == b.k and a.k_curves["stability"] == b.k_curves["stability"]
    assert a.set_stability == b.set_stability
    np.testing.assert_allclose(a.stability, b.stability, atol=1e-5)
    _, cos = match_bases(a.bases, b.bases)
    assert np.min(cos) > 0.99999
    assert sorted(a.image_ids) == sorted(b.image_ids)


def test_the_bootstrap_is_bounded_and_can_be_cancelled(items):
    """An engine's Discover slot is held while the bootstrap runs: a client that gave up on
    bootstrap=100000 held the only slot ~80 s after its deadline. The option is bounded, and
    every batch of resamples emits an event, where a cancel (a raising callback) stops it."""
    with pytest.raises(InvalidInput, match="bootstrap must be in 0..1000"):
        discover(items, FakeSource(), DiscoveryOptions(name="ant", k=2, bootstrap=100_000))
    with pytest.raises(InvalidInput, match="max_iter must be in 1..100000"):
        discover(items, FakeSource(), DiscoveryOptions(name="ant", k=2, max_iter=10**9))

    class Cancelled(Exception):
        pass

    seen = []

    def progress(event):
        if isinstance(event, Progress) and event.message.endswith(" resamples"):
            seen.append(event.message)
            raise Cancelled

    with pytest.raises(Cancelled):
        discover(items, FakeSource(), DiscoveryOptions(name="ant", k=2, bootstrap=1000),
                 progress)
    assert len(seen) == 1 and seen[0].endswith("/1000 resamples")


def test_fit_cache_shared_between_calls(items):
    from concept_engine.discovery import FitCache

    cache = FitCache()
    opts = DiscoveryOptions(name="ant", k=3, certainty_filter="off", bootstrap=0)
    a = discover(items, FakeSource(), opts, cache=cache)
    assert cache.misses == 1 and cache.hits == 0
    b = discover(items, FakeSource(), opts, cache=cache)
    assert cache.misses == 1 and cache.hits == 1
    np.testing.assert_array_equal(a.bases, b.bases)


def test_too_few_images():
    with pytest.raises(TooFewImages, match="1 usable image.*errors: cannot decode x.png"):
        discover(make_items(1) + [("x.png", b"junk")], FakeSource(), DiscoveryOptions(k=2))
    with pytest.raises(TooFewImages, match="k=5"):
        discover(make_items(3), FakeSource(), DiscoveryOptions(k=5))


def test_duplicate_ids_and_bad_options():
    with pytest.raises(InvalidInput, match="duplicate"):
        discover(make_items(2) + make_items(1), FakeSource(), DiscoveryOptions(k=2))
    with pytest.raises(InvalidInput, match="k_criterion"):
        discover(make_items(3), FakeSource(), DiscoveryOptions(k_criterion="best"))


def test_polygons_at_original_size_keep_aspect():
    data = [("wide.png", make_image(1, (37, 301))), ("tall.png", make_image(2, (200, 90)))]
    data += make_items(4)
    opts = DiscoveryOptions(name="ant", k=3, resize_mode="keep_aspect",
                            certainty_filter="off", min_area=0.0)
    cs = discover(data, FakeSource(), opts)
    shapes = {i: m.shape for i, m in zip(cs.image_ids, cs.heatmaps, strict=True)}
    assert shapes["wide.png"][1:] != shapes["tall.png"][1:]
    for i, size in zip(cs.image_ids, cs.original_sizes, strict=True):
        h, w = size
        for polys in cs.polygons[cs.image_ids.index(i)]:
            for p in polys:
                assert p.dtype == np.int32 and p.shape[1] == 2
                assert 0 <= p[:, 0].min() and p[:, 0].max() < w
                assert 0 <= p[:, 1].min() and p[:, 1].max() < h
    assert cs.original_sizes[cs.image_ids.index("wide.png")].tolist() == [37, 301]
    # k estimation works across images of different feature-map sizes too
    auto = discover(data, FakeSource(), DiscoveryOptions(
        name="ant", resize_mode="keep_aspect", certainty_filter="off", k_max=4))
    assert auto.k in (2, 3, 4) and set(auto.k_curves["stability"]) == {2, 3, 4}
    assert all(np.isfinite(v) for v in auto.k_curves["certainty"].values())


def test_explain_with_fixed_bases(tmp_path, items):
    src = FakeSource()
    cs = discover(items[:16], src, DiscoveryOptions(name="ant", k=3, certainty_filter="off"))
    cs = load_concept_set(save_concept_set(tmp_path / "c.h5", cs))
    held_out = make_items(3, start=100) + [("bad.png", b"zz")]
    out = {e.id: e for e in explain(cs, held_out, src)}
    assert out["bad.png"].error is not None and out["bad.png"].heatmaps is None
    e = out["img100.png"]
    assert e.error is None and e.heatmaps.shape == (3, 14, 14)
    assert e.certainties.shape == (3,) and len(e.polygons) == 3
    assert e.original_size == (96, 128)
    # a training image explained with H fixed reproduces its training heatmaps
    (again,) = explain(cs, items[:1], src)
    a, b = again.heatmaps.ravel(), cs.heatmaps[0].ravel()
    assert np.corrcoef(a, b)[0, 1] > 0.99


class _OtherWeights(FakeSource):
    """The same network re-registered with other weights (same name, same channels)."""

    def describe(self) -> dict:
        out = super().describe()
        out["models"][0] = {**out["models"][0], "weights_sha256": "0" * 64}
        return out


class _Dead(FakeSource):
    """A layer that is zero everywhere (a ReLU after a large negative bias)."""

    def extract(self, items, options):
        for res in super().extract(items, options):
            if res.error is None:
                res.activations = {k: np.zeros_like(v) for k, v in res.activations.items()}
            yield res


class _DiesAfter(FakeSource):
    """A feature source that fails after ``n`` answers: the rest are Unavailable (a killed
    feature server), or never answered (``silent``)."""

    def __init__(self, n: int, silent: bool = False):
        super().__init__()
        self.n, self.silent = n, silent

    def extract(self, items, options):
        from dff_protos.errors import Unavailable

        from feature_server.extractor import ExtractResult

        for i, res in enumerate(super().extract(items, options)):
            if i < self.n:
                yield res
            elif not self.silent:
                yield ExtractResult(res.id, error=Unavailable("127.0.0.1:1: UNAVAILABLE"))


@pytest.mark.parametrize("silent", [False, True])
def test_a_feature_source_that_dies_fails_the_discovery(items, silent):
    """A set fitted on the images that arrived before a feature server died would not be the
    class's set: discovery fails (UNAVAILABLE on the engine) instead of fitting on a few."""
    from dff_protos.errors import Unavailable

    with pytest.raises(Unavailable, match="20 of 24 images got no features"):
        discover(items, _DiesAfter(4, silent), DiscoveryOptions(name="ant", k=2))


def test_explain_refuses_a_network_with_other_weights(items):
    cs = discover(items[:12], FakeSource(), DiscoveryOptions(name="ant", k=2))
    assert cs.provenance["weights_sha256"] == "f" * 64
    with pytest.raises(InvalidInput, match="weights sha256 ffffffffffffffff.*has weights "
                                           "0000000000000000"):
        next(explain(cs, items[12:14], _OtherWeights()))
    # unknown on either side (a version-1 set, a source that does not say) is not checked
    cs.provenance["weights_sha256"] = ""
    assert all(e.error is None for e in explain(cs, items[12:14], _OtherWeights()))


def test_a_dead_layer_is_refused_by_name(items):
    with pytest.raises(InvalidInput, match="'conv5_4' of vgg19 is zero everywhere in all 8"):
        discover(items[:8], _Dead(), DiscoveryOptions(name="ant", k=2))


def test_unconverged_fit_is_noticed(items):
    cs = discover(items[:12], FakeSource(), DiscoveryOptions(name="ant", k=3, max_iter=1,
                                                             tol=1e-12))
    assert any("max_iter=1" in n for n in cs.notices)
    assert cs.provenance["converged"] is False and cs.provenance["n_iter"] == 1


def test_missing_classifier_skips_auto_filter(items):
    from dff_protos.errors import NotFound

    class NoClassifier(FakeSource):
        def class_names(self, classifier=None):
            raise NotFound(f"model {classifier!r} not built")

    cs = discover(items[:4], NoClassifier(), DiscoveryOptions(name="ant", k=2))
    assert any("unavailable" in n and "not built" in n for n in cs.notices)
    with pytest.raises(InvalidInput, match="not built"):
        discover(items[:4], NoClassifier(), DiscoveryOptions(name="ant", k=2,
                                                             prediction_filter="on"))


def test_a_small_class_stays_on_the_host_where_a_gpu_is_seen(monkeypatch, caplog):
    import logging

    from concept_engine import discovery

    class FakeDevice:  # stands for CuPy: any use of it would fail the run
        pass

    monkeypatch.setattr(discovery, "compute_namespace", lambda: FakeDevice)
    items = make_items(12)
    with caplog.at_level(logging.INFO, logger="concept_engine.discovery"):
        cs = discover(items, FakeSource(), DiscoveryOptions(name="ant", k=2, seed=1))
    reference = discover(items, FakeSource(), DiscoveryOptions(name="ant", k=2, seed=1))
    np.testing.assert_array_equal(cs.bases, reference.bases)
    assert "below DFF_GPU_MIN_ROWS=10000: the concept engine runs on the host" in caplog.text
    monkeypatch.setenv("DFF_GPU_MIN_ROWS", "50")
    assert discovery.gpu_min_rows() == 50
    monkeypatch.setenv("DFF_GPU_MIN_ROWS", "many")
    assert discovery.gpu_min_rows() == 10000


class _Tracked(FakeSource):
    """A FakeSource whose answer generators record when they are closed."""

    def __init__(self) -> None:
        super().__init__()
        self.closed = 0

    def extract(self, items, options):
        try:
            yield from super().extract(items, options)
        finally:
            self.closed += 1


class _Stop(Exception):
    pass


def test_the_sources_answers_are_closed_at_once_when_discovery_stops(items, tmp_path):
    """A remote source cancels its streams when its answers are closed: discovery closes them
    when it stops (a cancelled Discover, a progress callback that raises), and explain when
    its caller walks away - not whenever the garbage collector gets to them, which a kept
    traceback (a notebook's last error) can put off for good."""
    src = _Tracked()

    def stop_at_the_first_answer(event) -> None:
        if isinstance(event, Progress) and event.stage == "features" and event.done == 1:
            raise _Stop()

    with pytest.raises(_Stop) as kept:  # the traceback (and its frames) stay referenced
        discover(items, src, DiscoveryOptions(name="ant", k=3), progress=stop_at_the_first_answer)
    assert kept.value is not None and src.closed == 1 and src.items_seen == 1
    cs = discover(items[:12], src, DiscoveryOptions(name="ant", k=3, certainty_filter="off"))
    assert src.closed == 2
    answers = explain(cs, make_items(5, start=100), src)
    next(answers)
    answers.close()
    assert src.closed == 3 and src.items_seen == 12 + 1 + 1

    class ListSource(FakeSource):  # a source whose extract returns a list: nothing to close
        def extract(self, items, options):
            return list(super().extract(items, options))

    assert len(list(explain(cs, make_items(2, start=100), ListSource()))) == 2

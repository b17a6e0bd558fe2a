"""The ConceptEngine gRPC service, in process on loopback port 0.

Fast tests use the deterministic fake feature source; the ``slow`` test runs the real pair:
a feature server (ONNX Runtime, VGG-19 + EfficientNet-Lite0) and the engine talking to it over
gRPC, on a subset of real ant photos."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import grpc
import numpy as np
import pytest
from dff_protos import wire
from dff_protos.v1 import common_pb2, engine_pb2, engine_pb2_grpc
from fake_source import FakeSource, make_items
from grpc_health.v1 import health_pb2, health_pb2_grpc

from concept_engine.discovery import DiscoveryOptions
from concept_engine.service import EngineConfig, RunningEngine, start_server
from concept_engine.store import load_concept_set

TIMEOUT = 120


def _engine(tmp: Path, source, data_root: Path | None = None,
            feature_servers: tuple[str, ...] = ()) -> RunningEngine:
    config = EngineConfig(host="127.0.0.1", port=0, store_dir=str(tmp / "store"),
                          data_root=str(data_root) if data_root else None,
                          feature_servers=feature_servers, grace_s=2)
    return start_server(config, source)


@pytest.fixture(scope="module")
def fake_engine(tmp_path_factory) -> Iterator[tuple[RunningEngine, Path]]:
    tmp = tmp_path_factory.mktemp("engine")
    root = tmp / "data"
    (root / "ant").mkdir(parents=True)
    for i, data in make_items(12):
        (root / "ant" / i).write_bytes(data)
    outside = tmp / "outside"
    outside.mkdir()
    (outside / "x.png").write_bytes(make_items(1)[0][1])
    (root / "escape").symlink_to(outside, target_is_directory=True)
    (root / "mixed").mkdir()
    (root / "mixed" / "link.png").symlink_to(outside / "x.png")
    running = _engine(tmp, FakeSource(), data_root=root)
    yield running, root
    running.stop(grace=1)


@pytest.fixture(scope="module")
def stub(fake_engine) -> Iterator[engine_pb2_grpc.ConceptEngineStub]:
    running, _ = fake_engine
    with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        yield engine_pb2_grpc.ConceptEngineStub(channel)


def _discover(stub, options: engine_pb2.DiscoverOptions, items=()) -> list:
    def requests():
        yield engine_pb2.DiscoverRequest(options=options)
        for i, data in items:
            yield engine_pb2.DiscoverRequest(image=common_pb2.ImageInput(id=i, data=data))
    return list(stub.Discover(requests(), timeout=TIMEOUT))


def _explain(stub, options: engine_pb2.ExplainOptions, items) -> list:
    def requests():
        yield engine_pb2.ExplainRequest(options=options)
        for i, data in items:
            yield engine_pb2.ExplainRequest(image=common_pb2.ImageInput(id=i, data=data))
    return list(stub.Explain(requests(), timeout=TIMEOUT))


def _split(events):
    kinds = [e.WhichOneof("kind") for e in events]
    assert kinds[-1] == "summary" and kinds.count("summary") == 1
    return ([e.progress for e in events if e.HasField("progress")],
            [e.decision for e in events if e.HasField("decision")], events[-1].summary)


def test_health_and_reflection_names(fake_engine):
    running, _ = fake_engine
    with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        h = health_pb2_grpc.HealthStub(channel)
        resp = h.Check(health_pb2.HealthCheckRequest(service="dff.v1.ConceptEngine"),
                       timeout=10)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
        from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
            ProtoReflectionDescriptorDatabase,
        )

        services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
        assert {"dff.v1.ConceptEngine", "grpc.health.v1.Health"} <= services


def test_discover_streamed_explain_list_get_delete(stub, fake_engine):
    running, _ = fake_engine
    items = make_items(10) + [("junk.jpg", b"\x00\x01")]
    events = _discover(stub, engine_pb2.DiscoverOptions(name="ant", k=3), items)
    progress, decisions, summary = _split(events)
    assert {"features", "fit", "regions", "save"} <= {p.stage for p in progress}
    bad = [d for d in decisions if d.id == "junk.jpg"]
    assert bad and bad[0].stage == "error" and not bad[0].kept
    assert summary.k == 3 and summary.n_images == 11 and summary.n_kept == 10
    assert summary.concept_set_id and summary.n_iter > 0
    assert "fit" in summary.stage_seconds
    pred = [d for d in decisions if d.stage == "prediction_filter"]
    assert len(pred) == 10 and all(d.kept and d.score > 0.95 for d in pred)
    assert not any("certainty" in n for n in summary.notices)  # off by default (issue 8)

    listed = stub.ListConceptSets(engine_pb2.ListConceptSetsRequest(), timeout=10)
    assert summary.concept_set_id in [c.id for c in listed.concept_sets]
    got = stub.GetConceptSet(engine_pb2.GetConceptSetRequest(id=summary.concept_set_id),
                             timeout=10)
    assert got.info.k == 3 and got.info.layer == "conv5_4"
    assert wire.from_tensor(got.bases).shape == (3, 16)

    held_out = make_items(2, start=200) + [("bad.png", b"nope")]
    resp = _explain(stub, engine_pb2.ExplainOptions(
        concept_set_id=summary.concept_set_id, render_overlay=True, return_heatmaps=True),
        held_out)
    by_id = {r.id: r for r in resp}
    assert by_id["bad.png"].HasField("error")
    ok = by_id["img200.png"]
    assert not ok.HasField("error")
    assert wire.from_tensor(ok.heatmaps).shape == (3, 14, 14)
    assert len(ok.certainties) == 3 and len(ok.regions) == 3
    assert (ok.info.original_height, ok.info.original_width) == (96, 128)
    poly = np.asarray(ok.regions[1].contours[0].xy).reshape(-1, 2)
    assert poly[:, 0].max() < 128 and poly[:, 1].max() < 96
    img = cv2.imdecode(np.frombuffer(ok.overlay_png, np.uint8), cv2.IMREAD_COLOR)
    assert img.shape[1] == 128 and img.shape[0] > 96  # image + legend strip

    deleted = stub.DeleteConceptSet(
        engine_pb2.DeleteConceptSetRequest(id=summary.concept_set_id), timeout=10)
    assert deleted.deleted
    with pytest.raises(grpc.RpcError) as err:
        stub.GetConceptSet(engine_pb2.GetConceptSetRequest(id=summary.concept_set_id),
                           timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_discover_from_data_dir(stub):
    events = _discover(stub, engine_pb2.DiscoverOptions(data_dir="ant", k=2))
    _, decisions, summary = _split(events)
    assert summary.n_images == 12 and summary.k == 2
    got = stub.GetConceptSet(engine_pb2.GetConceptSetRequest(id=summary.concept_set_id),
                             timeout=10)
    assert got.info.name == "ant"  # the folder name is the class


def _assert_same_set(a, b) -> None:
    assert (a.id, a.name, a.k, a.image_ids, a.created) == (b.id, b.name, b.k, b.image_ids,
                                                           b.created)
    np.testing.assert_array_equal(a.bases, b.bases)
    np.testing.assert_array_equal(a.certainties, b.certainties)
    for x, y in zip(a.heatmaps, b.heatmaps, strict=True):
        np.testing.assert_array_equal(x, y)
    for pa, pb in zip(a.polygons, b.polygons, strict=True):
        for ca, cb in zip(pa, pb, strict=True):
            assert [c.tolist() for c in ca] == [c.tolist() for c in cb]
    assert a.decisions == b.decisions and a.k_curves == b.k_curves
    assert a.provenance == b.provenance


def test_get_concept_set_with_its_file(stub, fake_engine, tmp_path):
    running, _ = fake_engine
    _, _, summary = _split(_discover(stub, engine_pb2.DiscoverOptions(name="ant", k=3),
                                     make_items(10)))
    request = engine_pb2.GetConceptSetRequest(id=summary.concept_set_id)
    assert stub.GetConceptSet(request, timeout=10).hdf5 == b""  # only when asked for
    got = stub.GetConceptSet(engine_pb2.GetConceptSetRequest(id=summary.concept_set_id,
                                                             include_file=True), timeout=10)
    stored = running.servicer.store.path(summary.concept_set_id)
    assert got.hdf5 == stored.read_bytes()  # the file as stored, byte for byte
    (tmp_path / "got.h5").write_bytes(got.hdf5)
    _assert_same_set(load_concept_set(tmp_path / "got.h5"), load_concept_set(stored))
    np.testing.assert_array_equal(wire.from_tensor(got.bases),
                                  load_concept_set(stored).bases)
    with pytest.raises(grpc.RpcError) as err:
        stub.GetConceptSet(engine_pb2.GetConceptSetRequest(id="missing", include_file=True),
                           timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_concept_set_file_over_the_message_limit(tmp_path, caplog):
    """A file too big for one message: RESOURCE_EXHAUSTED naming the sizes; the exporter then
    falls back to Explain (with a warning) and still gets the concept set."""
    import dataclasses

    from exporter.remote import EngineDiscoverer

    running = _engine(tmp_path, FakeSource())
    try:
        address = f"127.0.0.1:{running.port}"
        discoverer = EngineDiscoverer(address, timeout=TIMEOUT)
        try:  # within the limit: the engine's file itself, no Explain
            cs = discoverer.discover("ant", make_items(10), DiscoveryOptions(k=3))
        finally:
            discoverer.close()
        assert cs.hdf5 == running.servicer.store.path(cs.id).read_bytes()
        assert "explain" not in cs.stage_seconds and cs.provenance["engine"] == address
        discoverer = EngineDiscoverer(address, timeout=TIMEOUT)
        try:  # region options travel in DiscoverOptions (40/41): the engine's file is exact
            other = discoverer.discover("ant", make_items(10),
                                        DiscoveryOptions(k=3, threshold=0.5))
        finally:
            discoverer.close()
        assert other.hdf5 != b"" and "explain" not in other.stage_seconds
        from concept_engine.heatmaps import concept_polygons

        def lists(per_concept):
            return [[c.tolist() for c in polys] for polys in per_concept]

        assert other.threshold == 0.5 and lists(other.polygons[0]) != lists(cs.polygons[0])
        assert lists(other.polygons[0]) == lists(concept_polygons(
            other.heatmaps[0], tuple(other.original_sizes[0]), 0.5, other.min_area))
        with grpc.insecure_channel(address) as channel:
            stub = engine_pb2_grpc.ConceptEngineStub(channel)
            _, _, summary = _split(_discover(stub, engine_pb2.DiscoverOptions(name="ant", k=3),
                                             make_items(10)))
            size = running.servicer.store.path(summary.concept_set_id).stat().st_size
            # the server's transport limit stays 64 MiB; only the engine's own check sees 0
            running.servicer.config = dataclasses.replace(running.config, max_message_mb=0)
            with pytest.raises(grpc.RpcError) as err:
                stub.GetConceptSet(engine_pb2.GetConceptSetRequest(
                    id=summary.concept_set_id, include_file=True), timeout=10)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert f"its file is {size} bytes" in err.value.details()
            assert "max message size of 0 bytes" in err.value.details()
        discoverer = EngineDiscoverer(address, timeout=TIMEOUT)
        try:
            with caplog.at_level("WARNING", logger="exporter.remote"):
                cs = discoverer.discover("ant", make_items(10), DiscoveryOptions(k=3))
        finally:
            discoverer.close()
        # the warning names this run's concept set and ITS file size (two runs' files may
        # differ by a few bytes: ids and timestamps are strings of varying length)
        own = running.servicer.store.path(cs.id).stat().st_size
        assert "cannot send concept set" in caplog.text and cs.id in caplog.text
        assert f"{own} bytes" in caplog.text, caplog.text
        assert cs.hdf5 == b"" and "explain" in cs.stage_seconds
        assert cs.k == 3 and cs.n_images == 10 and len(cs.heatmaps) == 10
    finally:
        running.stop(grace=1)


@pytest.mark.parametrize("data_dir", ["../outside", "/etc", "escape", "ant/../../outside",
                                      "mixed"])
def test_data_dir_outside_root_refused(stub, data_dir):
    with pytest.raises(grpc.RpcError) as err:
        _discover(stub, engine_pb2.DiscoverOptions(data_dir=data_dir, k=2))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "data root" in err.value.details()


def test_errors_map_to_status_codes(stub, tmp_path):
    with pytest.raises(grpc.RpcError) as err:
        _discover(stub, engine_pb2.DiscoverOptions(k=2), make_items(1))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION  # TooFewImages
    with pytest.raises(grpc.RpcError) as err:
        _discover(stub, engine_pb2.DiscoverOptions(name="antt", k=2,
                                                   prediction_filter=engine_pb2.ON),
                  make_items(4))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "close matches" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        _discover(stub, engine_pb2.DiscoverOptions(data_dir="nothing-here", k=2))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as err:
        _explain(stub, engine_pb2.ExplainOptions(concept_set_id="../x"), [])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as err:
        _explain(stub, engine_pb2.ExplainOptions(concept_set_id="missing"), [])
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_no_data_root_refuses_data_dir(tmp_path):
    running = _engine(tmp_path, FakeSource())
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = engine_pb2_grpc.ConceptEngineStub(channel)
            with pytest.raises(grpc.RpcError) as err:
                _discover(stub, engine_pb2.DiscoverOptions(data_dir="ant"))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        running.stop(grace=1)


def test_cli_registers_serve_engine(tmp_path):
    from exporter.cli import build_parser

    data = str(tmp_path)  # --data-root must exist (checked at start)
    args = build_parser().parse_args(["serve", "engine", "--port", "0", "--store",
                                      str(tmp_path / "s"), "--data-root", data,
                                      "--feature-server", "a:1,b:2"])
    from concept_engine.cli import config_from_args

    config = config_from_args(args)
    assert config.feature_servers == ("a:1", "b:2") and config.data_root == data
    assert config.port == 0 and callable(args.func)


# ------------------------------------------------------------------ the real pair (slow)
N_TRAIN = 24
N_HELD_OUT = 3


@pytest.fixture(scope="module")
def real_pair(tmp_path_factory, shared_data) -> Iterator[tuple[RunningEngine, Path, list]]:
    """Feature server + engine (talking gRPC) over a copy of the first ant photos."""
    from feature_server.extractor import Extractor
    from feature_server.service import ServerConfig
    from feature_server.service import start_server as start_features

    ants = sorted(p for p in (shared_data / "imagenet_data" / "ant").iterdir()
                  if p.suffix.lower() in (".jpg", ".jpeg"))
    tmp = tmp_path_factory.mktemp("real")
    root = tmp / "data"
    (root / "ant").mkdir(parents=True)
    for p in ants[:N_TRAIN]:
        shutil.copy(p, root / "ant" / p.name)
    shutil.copy(shared_data / "imagenet_data" / "ant" / "imageNotFound.gif",
                root / "ant" / "imageNotFound.gif")
    held_out = [(p.name, p.read_bytes()) for p in ants[-N_HELD_OUT:]]
    extractor = Extractor.from_cache(os.environ.get("DFF_HOME"), batch_size=8)
    features = start_features(ServerConfig(host="127.0.0.1", port=0, max_batch_size=8,
                                           max_wait_ms=20), extractor)
    engine = _engine(tmp, None, data_root=root,
                     feature_servers=(f"127.0.0.1:{features.port}",))
    yield engine, tmp, held_out
    engine.stop(grace=2)
    features.stop(grace=2)


@pytest.mark.slow
def test_real_discover_and_explain(real_pair):
    engine, tmp, held_out = real_pair
    with grpc.insecure_channel(f"127.0.0.1:{engine.port}") as channel:
        stub = engine_pb2_grpc.ConceptEngineStub(channel)
        opts = engine_pb2.DiscoverOptions(data_dir="ant", k_min=2, k_max=4,
                                          certainty_filter=engine_pb2.ON)
        progress, decisions, summary = _split(_discover(stub, opts))
        n_in = N_TRAIN + 1
        assert summary.n_images == n_in
        by_stage: dict[str, list] = {}
        for d in decisions:
            by_stage.setdefault(d.stage, []).append(d)
        (gif,) = by_stage["error"]
        assert gif.id == "imageNotFound.gif" and not gif.kept
        # prediction filter on the folder's class ('ant'): applied, or skipped with a notice
        pred = by_stage["prediction_filter"]
        assert len(pred) == N_TRAIN and all(0.0 <= d.score <= 1.0 for d in pred)
        n_after_pred = sum(d.kept for d in pred)  # all kept when the filter was skipped
        if n_after_pred == N_TRAIN and any(d.score < 0.95 for d in pred):
            # kept although p < 0.95: the default top-5 rule (issue 8) or a skipped filter
            assert all("top 5" in d.reason for d in pred) or any(
                "prediction filter" in n for n in summary.notices)
        cert = by_stage["certainty_filter"]
        assert len(cert) == n_after_pred
        if any(not d.kept for d in cert):
            assert summary.n_kept == sum(d.kept for d in cert) >= 15
        # k estimated over 2..4 and that k is the one fitted and stored
        curves = {c.criterion: dict(zip(c.k, c.value, strict=True)) for c in summary.curves}
        assert sorted(curves["stability"]) == [2, 3, 4]
        assert 2 <= summary.k <= 4 and f"k={summary.k}" in summary.k_reason
        cs = load_concept_set(tmp / "store" / f"{summary.concept_set_id}.h5")
        assert cs.k == summary.k and cs.bases.shape == (summary.k, 512)
        assert cs.n_images == summary.n_kept and cs.heatmaps[0].shape == (summary.k, 14, 14)
        # precision "auto" resolved by the engine against its feature source, as in-process
        from feature_server.extractor import precision_model

        assert cs.provenance["model"] == precision_model("vgg19", cs.provenance["precision"])
        assert len(cs.provenance["weights_sha256"]) == 64
        assert cs.provenance["layer"] == "conv5_4" and cs.provenance["k"] == summary.k
        for i, (h, w) in enumerate(cs.original_sizes):
            for polys in cs.polygons[i]:
                for p in polys:
                    assert p[:, 0].max() < w and p[:, 1].max() < h
        assert sum(len(p) for p in cs.polygons[0]) > 0

        resp = _explain(stub, engine_pb2.ExplainOptions(
            concept_set_id=summary.concept_set_id, render_overlay=True), held_out)
        assert sorted(r.id for r in resp) == sorted(i for i, _ in held_out)
        for r in resp:
            assert not r.HasField("error")
            assert len(r.certainties) == summary.k and np.isfinite(r.certainties).all()
            assert r.overlay_png[:8] == b"\x89PNG\r\n\x1a\n"
            assert any(len(reg.contours) for reg in r.regions)


class _SlowSource(FakeSource):
    """A fake source that takes 50 ms per image, so a client can cancel mid-stream."""

    def extract(self, items, options):
        for result in super().extract(items, options):
            time.sleep(0.05)
            yield result


def test_cancelled_discover_stops_and_frees_its_slot(tmp_path):
    source = _SlowSource()
    running = _engine(tmp_path, source)
    items = make_items(60)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = engine_pb2_grpc.ConceptEngineStub(channel)
            for _ in range(3):  # more than max_concurrent_discover=2: slots must be released
                def requests():
                    yield engine_pb2.DiscoverRequest(options=engine_pb2.DiscoverOptions(k=2))
                    for i, data in items:
                        yield engine_pb2.DiscoverRequest(
                            image=common_pb2.ImageInput(id=i, data=data))
                call = stub.Discover(requests(), timeout=TIMEOUT)
                first = next(call)
                assert first.HasField("progress")
                call.cancel()
                time.sleep(0.3)  # the worker notices at its next progress event (50 ms)

            time.sleep(1.5)
            assert source.items_seen < 3 * len(items)  # the workers stopped early
            events = _discover(stub, engine_pb2.DiscoverOptions(k=2), make_items(3))
            assert events[-1].summary.k == 2
    finally:
        running.stop(grace=1)


def test_serve_engine_process_sigterm(tmp_path):
    """`dff serve engine` as a process whose only feature server is down: health NOT_SERVING,
    Discover UNAVAILABLE naming the address, List still answers; SIGTERM -> graceful exit 0."""
    import signal
    import subprocess
    import sys

    from tests.ports import free_port

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "exporter.cli", "serve", "engine", "--host", "127.0.0.1",
         "--port", str(port), "--store", str(tmp_path / "store"),
         "--feature-server", "127.0.0.1:1", "--grace", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            grpc.channel_ready_future(channel).result(timeout=60)
            resp = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="dff.v1.ConceptEngine"), timeout=10)
            assert resp.status == health_pb2.HealthCheckResponse.NOT_SERVING
            # ... while the process itself is alive: what the k8s liveness probe asks (the
            # engine was restarted during every feature-server outage longer than a minute)
            alive = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="liveness"), timeout=10)
            assert alive.status == health_pb2.HealthCheckResponse.SERVING
            stub = engine_pb2_grpc.ConceptEngineStub(channel)
            listed = stub.ListConceptSets(engine_pb2.ListConceptSetsRequest(), timeout=10)
            assert list(listed.concept_sets) == []
            with pytest.raises(grpc.RpcError) as err:
                list(stub.Discover(iter([engine_pb2.DiscoverRequest(
                    options=engine_pb2.DiscoverOptions(name="x"))]), timeout=30))
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "127.0.0.1:1" in err.value.details()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ---------------------------------------------------------------------- store edge cases
def _a_set(stub) -> str:
    events = _discover(stub, engine_pb2.DiscoverOptions(name="ant", k=2), make_items(8))
    return _split(events)[2].concept_set_id


def test_list_skips_a_file_with_a_malformed_attribute(stub, fake_engine):
    import h5py

    running, _ = fake_engine
    sid = _a_set(stub)
    store = Path(running.config.store_dir)
    shutil.copy(store / f"{sid}.h5", store / "badattr.h5")
    with h5py.File(store / "badattr.h5", "r+") as f:
        f.attrs["k"] = "not-a-number"  # read_summary: int() -> ValueError
    try:
        listed = stub.ListConceptSets(engine_pb2.ListConceptSetsRequest(), timeout=10)
    finally:
        (store / "badattr.h5").unlink()
    ids = [c.id for c in listed.concept_sets]
    assert sid in ids and "badattr" not in ids


def test_a_folder_named_like_a_set_is_not_found_with_or_without_its_file(stub, fake_engine):
    running, _ = fake_engine
    folder = Path(running.config.store_dir) / "adir.h5"
    folder.mkdir()
    try:
        codes = []
        for include_file in (False, True):
            with pytest.raises(grpc.RpcError) as err:
                stub.GetConceptSet(engine_pb2.GetConceptSetRequest(
                    id="adir", include_file=include_file), timeout=10)
            codes.append(err.value.code())
        deleted = stub.DeleteConceptSet(engine_pb2.DeleteConceptSetRequest(id="adir"),
                                        timeout=10).deleted
        listed = stub.ListConceptSets(engine_pb2.ListConceptSetsRequest(), timeout=10)
    finally:
        folder.rmdir()
    assert codes == [grpc.StatusCode.NOT_FOUND, grpc.StatusCode.NOT_FOUND]
    assert not deleted and "adir" not in [c.id for c in listed.concept_sets]


def test_a_set_deleted_while_it_is_read_is_not_found(stub, fake_engine, monkeypatch):
    """Get racing Delete: the file vanishes between the existence check and its reading."""
    from concept_engine import store as store_module

    running, _ = fake_engine
    sid = _a_set(stub)
    path = Path(running.config.store_dir) / f"{sid}.h5"

    def deleted_meanwhile(p, *a, **kw):
        path.unlink()  # DeleteConceptSet ran while h5py was opening the file
        raise OSError("Unable to synchronously open file (truncated file: eof = 96)")

    monkeypatch.setattr(store_module, "load_concept_set", deleted_meanwhile)
    with pytest.raises(grpc.RpcError) as err:
        stub.GetConceptSet(engine_pb2.GetConceptSetRequest(id=sid), timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND, err.value.details()
    assert "unreadable or corrupt" not in err.value.details()


def test_an_id_with_a_trailing_newline_is_invalid(stub):
    for call in (lambda: stub.GetConceptSet(engine_pb2.GetConceptSetRequest(id="ant\n"),
                                            timeout=10),
                 lambda: stub.DeleteConceptSet(engine_pb2.DeleteConceptSetRequest(id="ant\n"),
                                               timeout=10)):
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_explain_refuses_duplicate_image_ids(stub):
    sid = _a_set(stub)
    a, b = make_items(2, start=300)
    with pytest.raises(grpc.RpcError) as err:
        _explain(stub, engine_pb2.ExplainOptions(concept_set_id=sid, render_overlay=True),
                 [("dup", a[1]), ("dup", b[1])])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "duplicate image ids" in err.value.details() and "'dup'" in err.value.details()

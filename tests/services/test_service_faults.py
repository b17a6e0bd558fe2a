"""Fault and load tests against real feature-server processes on loopback (``python -m
exporter.cli serve features``), real models, real photos, bounded in time:

- a replica frozen with SIGSTOP: the run completes with the same activations as a clean run,
  within 2x the clean time plus the per-item deadline;
- a TIFF bomb (30000 x 30000) sent to two replicas under a memory watchdog: neither dies, the
  bomb gets a per-item error, the other images come back;
- 20 idle streams plus one real client: the real client completes and health stays SERVING;
- a replica killed with SIGKILL mid-run: the run completes with the same activations.
(SIGTERM during a stream drains: tests/feature_server/test_process.py.)
"""

from __future__ import annotations

import os
import signal
import struct
import threading
import time
from collections.abc import Iterator

import grpc
import numpy as np
import procs
import pytest
from dff_protos import errors
from dff_protos.v1 import features_pb2, features_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from feature_server.client import FeatureClient
from feature_server.extractor import ExtractOptions

pytestmark = pytest.mark.slow

OPTIONS = ExtractOptions(size=112)  # 7x7 conv5_4: the same code path at a quarter of the cost
ITEM_DEADLINE = 3.0
SERVER_ARGS = ("--no-build", "--max-batch-size", "4", "--max-wait-ms", "2",
               "--max-concurrent-streams", "4", "--max-waiting-streams", "4",
               "--stream-wait-s", "1", "--idle-timeout-s", "2", "--grace-s", "5",
               "--decode-workers", "2")


@pytest.fixture(scope="module")
def photos(shared_data) -> list[tuple[str, bytes]]:
    files = sorted((shared_data / "imagenet_sample").glob("*.JPEG"))[:8]
    return [(p.name, p.read_bytes()) for p in files]


@pytest.fixture(scope="module")
def pair(models_home) -> Iterator[list[procs.Proc]]:
    env = {"DFF_HOME": str(models_home), "OMP_NUM_THREADS": "1"}
    replicas = [procs.start("features", *SERVER_ARGS, env=env) for _ in range(2)]
    yield replicas
    for r in replicas:
        r.stop()


def _extract(addresses: list[str], items: list[tuple[str, bytes]], **kw) -> dict:
    kw.setdefault("item_deadline", ITEM_DEADLINE)
    with FeatureClient(addresses, streams_per_address=1, timeout=120, **kw) as client:
        return {r.id: r for r in client.extract(items, OPTIONS)}


@pytest.fixture(scope="module")
def clean(pair, photos) -> tuple[dict, float]:
    addresses = [r.address for r in pair]
    _extract(addresses, photos[:2])  # warm both replicas
    t0 = time.monotonic()
    results = _extract(addresses, photos)
    elapsed = time.monotonic() - t0
    assert all(r.error is None for r in results.values()) and len(results) == len(photos)
    return results, elapsed


def _same(results: dict, reference: dict) -> None:
    assert set(results) == set(reference)
    for item_id, r in results.items():
        assert r.error is None, (item_id, r.error)
        np.testing.assert_allclose(r.activations["conv5_4"],
                                   reference[item_id].activations["conv5_4"],
                                   rtol=1e-4, atol=1e-4)


def _health(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                         timeout=10).status


def test_frozen_replica_moves_its_items_within_the_item_deadline(pair, photos, clean):
    reference, clean_s = clean
    os.kill(pair[0].pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        results = _extract([r.address for r in pair], photos)
        elapsed = time.monotonic() - t0
    finally:
        os.kill(pair[0].pid, signal.SIGCONT)
    _same(results, reference)
    # the bound of the issue (2x clean + the per-item deadline), plus 5 s for a shared CI box
    assert elapsed <= 2 * clean_s + ITEM_DEADLINE + 5.0, (elapsed, clean_s)


def tiff_bomb(width: int = 30000, height: int = 30000) -> bytes:
    """A valid baseline TIFF header (8-bit grayscale, one uncompressed strip) that claims
    width x height pixels while holding a few bytes."""
    entries = [(256, 4, 1, width), (257, 4, 1, height), (258, 3, 1, 8), (259, 3, 1, 1),
               (262, 3, 1, 1), (273, 4, 1, 8), (277, 3, 1, 1), (278, 4, 1, height),
               (279, 4, 1, width * height)]
    ifd_offset = 8 + 16
    head = b"II*\x00" + struct.pack("<I", ifd_offset) + b"\x00" * 16
    ifd = struct.pack("<H", len(entries))
    for tag, typ, count, value in entries:
        packed = struct.pack("<H", value) + b"\x00\x00" if typ == 3 else struct.pack("<I", value)
        ifd += struct.pack("<HHI", tag, typ, count) + packed
    return head + ifd + struct.pack("<I", 0)


def test_tiff_bomb_to_two_replicas_under_a_memory_watchdog(pair, photos, clean):
    reference, _ = clean
    baseline = [r.rss_bytes() for r in pair]
    peak = list(baseline)
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(0.02):
            for n, r in enumerate(pair):
                if r.alive():
                    peak[n] = max(peak[n], r.rss_bytes())

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        items = [("bomb.tif", tiff_bomb())] + photos[:4]
        results = _extract([r.address for r in pair], items)
    finally:
        stop.set()
        watcher.join()
    assert all(r.alive() for r in pair)
    assert isinstance(results["bomb.tif"].error, errors.ImageTooLarge)
    assert "30000x30000" in str(results["bomb.tif"].error)
    _same({k: v for k, v in results.items() if k != "bomb.tif"},
          {k: reference[k] for k, _ in photos[:4]})
    growth = [p - b for p, b in zip(peak, baseline, strict=True)]
    assert max(growth) < 300 << 20, growth  # decoding it would take > 900 MB


def test_twenty_idle_streams_do_not_lock_out_a_real_client(pair, photos, clean):
    reference, _ = clean
    target = pair[1]
    release = threading.Event()

    def never() -> Iterator[features_pb2.ExtractRequest]:
        release.wait(60)
        return
        yield  # pragma: no cover - a generator that sends nothing

    channel = grpc.insecure_channel(target.address)
    stub = features_pb2_grpc.FeatureServiceStub(channel)
    calls = [stub.Extract(never(), timeout=60) for _ in range(20)]
    outcomes: list[str] = []

    def drain(call) -> None:
        try:
            for _ in call:
                pass
            outcomes.append("OK")
        except grpc.RpcError as exc:
            outcomes.append(exc.code().name)

    drains = [threading.Thread(target=drain, args=(c,), daemon=True) for c in calls]
    for t in drains:
        t.start()
    try:
        time.sleep(0.5)  # let the idle streams take every slot first (not a correctness check)
        assert _health(target.address) == health_pb2.HealthCheckResponse.SERVING
        results = _extract([target.address], photos[:3], retry_budget=60.0)
        assert _health(target.address) == health_pb2.HealthCheckResponse.SERVING
    finally:
        release.set()
        for t in drains:
            t.join(30)
        channel.close()
    _same(results, {k: reference[k] for k, _ in photos[:3]})
    # idle streams were refused or closed, none was served for ever
    assert len(outcomes) == 20
    assert set(outcomes) <= {"RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED", "OK"}, outcomes


def test_sigkill_replica_mid_run_same_activations(pair, photos, clean):
    reference, _ = clean
    addresses = [r.address for r in pair]
    results = {}
    with FeatureClient(addresses, streams_per_address=1, timeout=120,
                       item_deadline=ITEM_DEADLINE) as client:
        for r in client.extract(photos, OPTIONS):
            results[r.id] = r
            if len(results) == 1:
                pair[0].proc.kill()  # SIGKILL while the other items are in flight
    pair[0].proc.wait(10)
    _same(results, reference)
    assert pair[1].alive()

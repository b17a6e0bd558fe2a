"""Bounded cost: every accepted format's size is read from its header before decoding (and an
unparseable header is refused), the memory budget makes items wait, and the engine's limits
(streamed bytes, idle streams, corrupt store files, orphan temporary files)."""

from __future__ import annotations

import struct
import threading
import time
from pathlib import Path

import cv2
import grpc
import numpy as np
import pytest
from dff_protos import errors
from dff_protos.status import error_from_rpc
from dff_protos.v1 import common_pb2, engine_pb2, engine_pb2_grpc
from fake_source import FakeSource, make_items

from concept_engine.service import EngineConfig, start_server
from feature_server.images import ALL_FORMATS, DecodeLimits, check_header, decode_image
from feature_server.service import MemoryBudget

LIMITS = DecodeLimits(max_pixels=50_000_000, formats=ALL_FORMATS)


def _encoded(ext: str, h: int = 20, w: int = 30) -> bytes:
    img = np.full((h, w, 3), 128, np.uint8)
    ok, buf = cv2.imencode(ext, img)
    assert ok
    return buf.tobytes()


def _tiff(pages: list[tuple[int, int]], tiles: tuple[int, int] | None = None) -> bytes:
    """A little-endian TIFF whose IFDs claim the given (width, height) sizes."""
    out = bytearray(b"II*\x00" + struct.pack("<I", 8))
    for n, (w, h) in enumerate(pages):
        entries = [(256, 4, w), (257, 4, h), (258, 3, 8), (259, 3, 1), (262, 3, 1)]
        if tiles:
            entries += [(322, 4, tiles[0]), (323, 4, tiles[1])]
        start = len(out)
        ifd = struct.pack("<H", len(entries))
        for tag, typ, value in entries:
            data = struct.pack("<HH", value, 0) if typ == 3 else struct.pack("<I", value)
            ifd += struct.pack("<HHI", tag, typ, 1) + data
        nxt = 0 if n == len(pages) - 1 else start + len(ifd) + 4
        out += ifd + struct.pack("<I", nxt)
    return bytes(out)


def _claim(data: bytes, fmt: str, w: int, h: int) -> bytes:
    """Rewrite the header's size fields (the pixel data stays small)."""
    b = bytearray(data)
    if fmt == "png":
        b[16:24] = struct.pack(">II", w, h)
    elif fmt == "bmp":
        b[18:26] = struct.pack("<ii", w, h)
    elif fmt == "gif":
        b[6:10] = struct.pack("<HH", w, h)
    elif fmt == "jpeg":
        i = 2
        while b[i + 1] not in range(0xC0, 0xC4):
            i += 2 + struct.unpack(">H", b[i + 2:i + 4])[0]
        b[i + 5:i + 9] = struct.pack(">HH", h, w)
    elif fmt == "webp":
        chunk = bytes(b[12:16])
        if chunk == b"VP8 ":
            b[26:30] = struct.pack("<HH", w, h)
        elif chunk == b"VP8L":
            bits = (w - 1) | ((h - 1) << 14) | (int.from_bytes(b[21:25], "little") & ~0xFFFFFFF)
            b[21:25] = (bits & 0xFFFFFFFF).to_bytes(4, "little")
    return bytes(b)


@pytest.mark.parametrize("fmt, ext", [("png", ".png"), ("jpeg", ".jpg"), ("bmp", ".bmp"),
                                      ("webp", ".webp")])
def test_every_format_is_sized_from_its_header_before_decoding(fmt, ext):
    data = _encoded(ext)
    assert check_header(data, LIMITS) == (fmt, 30, 20)
    bomb = _claim(data, fmt, 15000, 15000)  # within the format's field range
    with pytest.raises(errors.ImageTooLarge, match="15000x15000"):
        check_header(bomb, LIMITS)
    with pytest.raises(errors.ImageTooLarge):
        decode_image(bomb, LIMITS)


def test_gif_is_sized_from_its_header_when_enabled_and_refused_by_default():
    gif = b"GIF89a" + struct.pack("<HH", 60000, 60000) + b"\x00" * 20
    with pytest.raises(errors.ImageTooLarge):
        check_header(gif, LIMITS)
    with pytest.raises(errors.InvalidInput, match="not accepted"):
        check_header(gif, DecodeLimits())


def test_tiff_every_page_and_tile_is_checked():
    assert check_header(_tiff([(30, 20)]), LIMITS) == ("tiff", 30, 20)
    with pytest.raises(errors.ImageTooLarge, match="30000x30000"):
        check_header(_tiff([(30000, 30000)]), LIMITS)
    # a small first page hides a bomb in the second
    with pytest.raises(errors.ImageTooLarge, match="30000x30000"):
        check_header(_tiff([(30, 20), (30000, 30000)]), LIMITS)
    # tiles larger than the limit
    with pytest.raises(errors.ImageTooLarge):
        check_header(_tiff([(64, 64)], tiles=(60000, 60000)), LIMITS)
    # a real TIFF from OpenCV
    assert check_header(_encoded(".tiff"), LIMITS)[1:] == (30, 20)


@pytest.mark.parametrize("data", [
    b"\x89PNG\r\n\x1a\n" + b"\x00" * 30,               # no IHDR
    b"RIFF\x00\x00\x00\x00WEBPXXXX" + b"\x00" * 20,    # unknown WebP chunk
    b"II*\x00" + struct.pack("<I", 9999),               # IFD offset past the end
    b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", 0) + struct.pack("<I", 8),  # loop
    b"BM\x00\x00",                                      # short BMP
    b"\xff\xd8\xff\xe0\x00\x10JFIF",                    # JPEG without a frame header
], ids=["png", "webp", "tiff-offset", "tiff-loop", "bmp", "jpeg"])
def test_an_unparseable_header_with_an_accepted_magic_is_refused(data):
    with pytest.raises(errors.InvalidInput, match="header"):
        check_header(data, LIMITS)


def test_memory_budget_makes_items_wait_and_refuses_what_never_fits():
    budget = MemoryBudget(100)
    stop = threading.Event()
    assert budget.acquire(80, stop)
    got: list[float] = []

    def second() -> None:
        assert budget.acquire(50, stop)
        got.append(time.monotonic())

    t = threading.Thread(target=second)
    t.start()
    time.sleep(0.2)
    assert not got  # waiting, not piling up
    released = time.monotonic()
    budget.release(80)
    t.join(5)
    assert got and got[0] >= released and budget.used == 50
    with pytest.raises(errors.ImageTooLarge, match="memory budget"):
        budget.acquire(101, stop)
    stop.set()
    assert budget.acquire(60, stop) is False  # a stopped stream stops waiting


# ---------------------------------------------------------------------- engine
def _engine(tmp: Path, **kw):
    return start_server(EngineConfig(host="127.0.0.1", port=0, store_dir=str(tmp / "store"),
                                     grace_s=1, **kw), FakeSource())


def test_engine_cleans_orphans_and_reports_a_corrupt_file_as_data_loss(tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    (store / ".ant-1.h5.abc123.tmp").write_bytes(b"half a file")
    (store / "broken-1.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\x00" * 64)
    running = _engine(tmp_path)
    try:
        assert not (store / ".ant-1.h5.abc123.tmp").exists()
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = engine_pb2_grpc.ConceptEngineStub(channel)
            with pytest.raises(grpc.RpcError) as err:
                stub.GetConceptSet(engine_pb2.GetConceptSetRequest(id="broken-1"), timeout=10)
            listed = stub.ListConceptSets(engine_pb2.ListConceptSetsRequest(), timeout=10)
    finally:
        running.stop(grace=1)
    assert err.value.code() == grpc.StatusCode.DATA_LOSS
    assert "broken-1.h5" in err.value.details()
    assert isinstance(error_from_rpc(err.value), errors.DataLoss)
    assert list(listed.concept_sets) == []  # the list skips it (logged), and answers


def _discover_requests(items, **options):
    yield engine_pb2.DiscoverRequest(options=engine_pb2.DiscoverOptions(name="ant", **options))
    for i, d in items:
        yield engine_pb2.DiscoverRequest(image=common_pb2.ImageInput(id=i, data=d))


def test_engine_caps_streamed_bytes_per_discover(tmp_path):
    running = _engine(tmp_path, max_discover_mb=1)
    big = [(f"big{i}.png", b"\x00" * (400 << 10)) for i in range(4)]  # 1.6 MB in all
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = engine_pb2_grpc.ConceptEngineStub(channel)
            with pytest.raises(grpc.RpcError) as err:
                list(stub.Discover(_discover_requests(big, k=2), timeout=30))
            # the bytes were given back: a small Discover still runs
            events = list(stub.Discover(_discover_requests(
                make_items(6), k=2, prediction_filter=3, certainty_filter=3, min_images=2),
                timeout=60))
    finally:
        running.stop(grace=1)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max-discover-mb" in err.value.details()
    assert events[-1].HasField("summary")
    assert running.servicer._streamed_bytes == 0


def test_engine_closes_an_idle_discover_stream_and_stays_responsive(tmp_path):
    running = _engine(tmp_path, idle_timeout_s=1.0, max_concurrent_discover=1)
    release = threading.Event()

    def idle():
        yield engine_pb2.DiscoverRequest(options=engine_pb2.DiscoverOptions(name="x"))
        release.wait(30)

    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = engine_pb2_grpc.ConceptEngineStub(channel)
            call = stub.Discover(idle(), timeout=30)
            listed = stub.ListConceptSets(engine_pb2.ListConceptSetsRequest(), timeout=5)
            with pytest.raises(grpc.RpcError) as err:
                list(call)
            release.set()
    finally:
        release.set()
        running.stop(grace=1)
    assert list(listed.concept_sets) == []
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "idle" in err.value.details()


def test_engine_mode_oversized_file_fails_alone(tmp_path):
    from concept_engine.discovery import DiscoveryOptions
    from exporter.remote import EngineDiscoverer

    running = _engine(tmp_path)
    items = make_items(6) + [("huge.png", b"\x89PNG" + b"\x00" * 5000)]
    try:
        client = EngineDiscoverer(f"127.0.0.1:{running.port}", timeout=60,
                                  max_image_bytes=4096)
        try:
            cs = client.discover("ant", items, DiscoveryOptions(
                k=2, prediction_filter="off", certainty_filter="off", prediction_min_images=2))
        finally:
            client.close()
    finally:
        running.stop(grace=1)
    assert cs.k == 2 and "huge.png" not in cs.image_ids
    [huge] = [d for d in cs.decisions if d.id == "huge.png"]
    assert not huge.kept and huge.stage == "error" and "message limit" in huge.reason


def test_sixteen_idle_discover_streams_do_not_starve_health_and_list(tmp_path):
    running = _engine(tmp_path, idle_timeout_s=30.0, stream_wait_s=20.0)
    release = threading.Event()

    def idle():
        yield engine_pb2.DiscoverRequest(options=engine_pb2.DiscoverOptions(name="x"))
        release.wait(30)

    outcomes: list[str] = []

    def drain(call) -> None:
        try:
            list(call)
            outcomes.append("OK")
        except grpc.RpcError as exc:
            outcomes.append(exc.code().name)

    channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
    try:
        stub = engine_pb2_grpc.ConceptEngineStub(channel)
        calls = [stub.Discover(idle(), timeout=60) for _ in range(16)]
        threads = [threading.Thread(target=drain, args=(c,), daemon=True) for c in calls]
        for t in threads:
            t.start()
        # the streams hold every Discover slot and waiting place; the rest are refused
        deadline = time.monotonic() + 20
        while outcomes.count("RESOURCE_EXHAUSTED") < 6 and time.monotonic() < deadline:
            time.sleep(0.05)
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        for _ in range(5):
            health = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=3)
            listed = stub.ListConceptSets(engine_pb2.ListConceptSetsRequest(), timeout=3)
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            assert list(listed.concept_sets) == []
    finally:
        release.set()
        for c in calls:
            c.cancel()
        channel.close()
        running.stop(grace=1)
    assert outcomes.count("RESOURCE_EXHAUSTED") >= 6  # 16 - 2 running - 8 waiting


def test_data_dir_unreadable_and_oversized_files_fail_alone(tmp_path):
    import os

    root = tmp_path / "data"
    (root / "ant").mkdir(parents=True)
    for i, d in make_items(6):
        (root / "ant" / i).write_bytes(d)
    (root / "ant" / "huge.png").write_bytes(b"\x89PNG" + b"\x00" * (2 << 20))
    locked = root / "ant" / "locked.png"
    locked.write_bytes(make_items(1)[0][1])
    locked.chmod(0)
    running = _engine(tmp_path, data_root=str(root), max_message_mb=1)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = engine_pb2_grpc.ConceptEngineStub(channel)
            events = list(stub.Discover(iter([engine_pb2.DiscoverRequest(
                options=engine_pb2.DiscoverOptions(
                    data_dir="ant", k=2, prediction_filter=3, certainty_filter=3,
                    min_images=2))]), timeout=60))
    finally:
        locked.chmod(0o644)
        running.stop(grace=1)
    errors_by_id = {e.decision.id: e.decision.reason for e in events
                    if e.HasField("decision") and e.decision.stage == "error"}
    assert events[-1].HasField("summary") and events[-1].summary.k == 2
    assert "not read" in errors_by_id["huge.png"]
    if os.geteuid() != 0:  # root reads a mode-000 file anyway
        assert "cannot read" in errors_by_id["locked.png"]
    assert running.servicer._streamed_bytes == 0

"""In-process extraction decodes the next chunk on a thread pool while the network runs: same
results, same order, per-image errors kept in place, whatever the number of decode threads."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from feature_server.extractor import ExtractOptions, Extractor

DATA = Path(__file__).resolve().parents[3] / "shared" / "data"


def items() -> list[tuple[str, bytes]]:
    photos = sorted((DATA / "gymnast").glob("*.jpg"))
    out = [(p.name, p.read_bytes()) for p in photos]
    out.insert(2, ("broken.jpg", b"\xff\xd8\xff not a jpeg"))
    out.append(("empty.png", b""))
    return out


def test_pooled_decoding_matches_inline_decoding(registry):
    inline = Extractor(registry, batch_size=3, decode_workers=1, precisions=("int8",))
    pooled = Extractor(registry, batch_size=3, decode_workers=3, precisions=("int8",))
    assert pooled.decode_workers == 3
    options = ExtractOptions(precision="int8", return_probabilities=True)
    a = list(inline.extract(items(), options))
    b = list(pooled.extract(items(), options))
    assert [r.id for r in a] == [r.id for r in b] == [i for i, _ in items()]
    for x, y in zip(a, b, strict=True):
        assert (x.error is None) == (y.error is None)
        if x.error is None:
            np.testing.assert_array_equal(x.activations["conv5_4"], y.activations["conv5_4"])
            np.testing.assert_array_equal(x.probabilities, y.probabilities)
            assert x.original_size == y.original_size
        else:
            assert type(x.error) is type(y.error)
    assert b[2].error is not None and b[-1].error is not None


def test_decoding_runs_on_pool_threads(registry):
    ex = Extractor(registry, batch_size=2, decode_workers=2, precisions=("int8",))
    seen: list[tuple[str, str]] = []
    prepare, run = ex.prepare, ex.run

    def spy_prepare(item_id, data, options):
        seen.append(("decode " + item_id, threading.current_thread().name))
        return prepare(item_id, data, options)

    def spy_run(model, batch, outputs):
        seen.append(("run", threading.current_thread().name))
        return run(model, batch, outputs)

    ex.prepare, ex.run = spy_prepare, spy_run  # type: ignore[method-assign]
    photos = items()[:2] + items()[3:5]  # two chunks of two good photos
    results = list(ex.extract(photos, ExtractOptions(precision="int8")))
    assert all(r.error is None for r in results)
    decode_threads = {name for what, name in seen if what.startswith("decode")}
    run_threads = {name for what, name in seen if what == "run"}
    assert len([w for w, _ in seen if w.startswith("decode")]) == 4
    assert decode_threads and all(name.startswith("dff-decode") for name in decode_threads)
    assert run_threads == {threading.current_thread().name}


def test_onnx_runtime_threads_do_not_spin_unless_asked(registry, monkeypatch):
    # idle intra-op threads that spin take the cores from the decode threads (and from the
    # other session); off by default, DFF_ORT_SPIN=1 turns spinning back on
    key = "session.intra_op.allow_spinning"
    monkeypatch.delenv("DFF_ORT_SPIN", raising=False)
    ex = Extractor(registry, precisions=("int8",))
    assert ex._session_options.get_session_config_entry(key) == "0"
    monkeypatch.setenv("DFF_ORT_SPIN", "1")
    ex = Extractor(registry, precisions=("int8",))
    assert ex._session_options.get_session_config_entry(key) == "1"

"""Multi-class exports: the class pipeline (fit/render of class i overlaps extraction of
class i+1) and sharding (N shards into one OUT == one unsharded run), plus OUT/index.html."""

from __future__ import annotations

import argparse
import json
import threading
from pathlib import Path

import h5py
import numpy as np
import pytest
from exporter_fakes import fake_module, make_class_folder

from exporter import commands, export, site_index
from exporter.export import ExportSettings, LocalDiscoverer

CLASSES = ("ant", "bee", "cat")


def _options(**kw):
    from concept_engine.discovery import DiscoveryOptions

    return DiscoveryOptions(**{"k": 3, "certainty_filter": "off", "max_iter": 100, **kw})


def _data(root: Path, sizes=(7, 6, 8)) -> Path:
    data = root / "data"
    for name, n in zip(CLASSES, sizes, strict=True):
        make_class_folder(data, name, n)
    return data


def _files(class_dir: Path) -> list[str]:
    return sorted(str(p.relative_to(class_dir)) for p in class_dir.rglob("*") if p.is_file())


def _bases(class_dir: Path) -> np.ndarray:
    with h5py.File(class_dir / "concepts.h5") as f:
        return np.asarray(f["bases"])


def _same_export(a: Path, b: Path) -> None:
    for name in CLASSES:
        assert _files(a / name) == _files(b / name), name
        np.testing.assert_array_equal(_bases(a / name), _bases(b / name))
        sa = json.loads((a / name / "summary.json").read_text())
        sb = json.loads((b / name / "summary.json").read_text())
        for key in ("k", "n_images", "n_kept", "dropped", "status", "n_errors"):
            assert sa[key] == sb[key], (name, key)
    assert (a / "index.html").read_bytes() == (b / "index.html").read_bytes()


def test_pipelined_export_equals_sequential(tmp_path):
    data = _data(tmp_path)
    classes = export.find_classes(data)
    order = []
    for out, pipeline in (("seq", False), ("pipe", True)):
        settings = ExportSettings(out=tmp_path / out, discovery=_options(), show_progress=False,
                                  pipeline=pipeline)
        reports = export.export(classes, settings, LocalDiscoverer(fake_module().FakeSource()),
                                on_class=lambda r: order.append(r.name))
        assert [r.status for r in reports] == ["done"] * 3
        assert [r.name for r in reports] == list(CLASSES)
    assert order == list(CLASSES) * 2  # reported in class order either way
    _same_export(tmp_path / "seq", tmp_path / "pipe")


def test_rendering_of_one_class_overlaps_extraction_of_the_next(tmp_path):
    """Class ant's rendering waits until bee's extraction has begun: that only completes when
    the two overlap (sequentially it would wait for nothing and fail the check)."""
    data = _data(tmp_path, sizes=(7, 6, 8))
    by_size = {7: "ant", 6: "bee", 8: "cat"}  # the classes differ by their number of images
    fake = fake_module().FakeSource()
    started: dict[str, threading.Event] = {n: threading.Event() for n in CLASSES}
    extract = fake.extract

    def extract_and_signal(items, options):
        items = list(items)
        started[by_size[len(items)]].set()
        yield from extract(items, options)

    fake.extract = extract_and_signal
    waited = {}

    def progress_for(name):
        def progress(stage, done=0, total=0, message=""):
            if stage == "render" and done == 1 and name != CLASSES[-1]:
                nxt = CLASSES[CLASSES.index(name) + 1]
                waited[name] = started[nxt].wait(timeout=60)
        return progress

    settings = ExportSettings(out=tmp_path / "out", discovery=_options(), show_progress=False)
    reports = export.export(export.find_classes(data), settings, LocalDiscoverer(fake),
                            progress_for=progress_for)
    assert [r.status for r in reports] == ["done"] * 3
    assert waited == {"ant": True, "bee": True}


def test_shard_classes_is_a_partition():
    classes = [(f"c{i:02d}", Path(f"c{i:02d}")) for i in (5, 1, 9, 3, 7, 0, 2)]
    for n in (1, 2, 3, 7, 10):
        shards = [export.shard_classes(classes, i, n) for i in range(n)]
        names = [c for s in shards for c, _ in s]
        assert sorted(names) == sorted(c for c, _ in classes)
        assert max(map(len, shards)) - min(map(len, shards)) <= 1
    assert export.shard_classes(classes, 0, 2) == export.shard_classes(classes[::-1], 0, 2)
    with pytest.raises(export.InvalidInput):
        export.shard_classes(classes, 2, 2)


def _parse(argv):
    parser = argparse.ArgumentParser(prog="dff")
    commands.register(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args([str(a) for a in argv])


@pytest.fixture
def fake_source(monkeypatch):
    src = fake_module().FakeSource()
    monkeypatch.setattr(export, "make_source", lambda *a, **k: src)
    return src


FAST = ["--k", "3", "--no-certainty-filter", "--max-iter", "100", "--no-progress"]


def test_two_shards_equal_one_unsharded_run(tmp_path, fake_source, capsys, monkeypatch):
    data = _data(tmp_path)
    (data / "ant" / "broken.png").write_bytes(b"not an image")  # errors are sharded too
    whole = tmp_path / "whole"
    args = _parse(["discover", data, "--out", whole, *FAST])
    assert args.func(args) == commands.EXIT_PARTIAL  # the broken image
    capsys.readouterr()
    sharded = tmp_path / "sharded"
    args = _parse(["discover", data, "--out", sharded, *FAST, "--shard", "1/2"])
    args.func(args)
    out = capsys.readouterr().out
    assert "[done] bee" in out and "] ant" not in out and "] cat" not in out
    index = (sharded / "index.html").read_text()
    assert "bee/index.html" in index and "ant/index.html" not in index  # built by shard 1
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "0")  # shard 0 as a Kubernetes Indexed Job
    monkeypatch.setenv("JOB_COMPLETIONS", "2")
    args = _parse(["discover", data, "--out", sharded, *FAST])
    args.func(args)
    out = capsys.readouterr().out
    assert "[done] ant" in out and "[done] cat" in out and "] bee" not in out
    _same_export(whole, sharded)
    assert sorted(p.name for p in sharded.iterdir() if not p.name.startswith(".")) == \
        sorted(p.name for p in whole.iterdir() if not p.name.startswith("."))


def test_site_index_lists_finished_classes_only(tmp_path, fake_source, capsys):
    data = _data(tmp_path)
    out = tmp_path / "out"
    args = _parse(["discover", data, "--out", out, *FAST])
    assert args.func(args) == 0
    (out / ".dog.partial").mkdir()  # unfinished: not listed
    (out / "notes").mkdir()  # not a class: not listed
    summary = json.loads((out / "bee" / "summary.json").read_text())
    summary["stability"] = {"value": 0.8125}
    (out / "bee" / "summary.json").write_text(json.dumps(summary))
    site_index.write_site_index(out)
    entries = site_index.finished_classes(out)
    assert [e.name for e in entries] == list(CLASSES)
    # ant: the split-half stability the export itself recorded; bee: the value edited above
    ant_summary = json.loads((out / "ant" / "summary.json").read_text())
    assert isinstance(ant_summary["stability"], float)
    assert entries[1].stability == 0.8125 and entries[0].stability == ant_summary["stability"]
    assert all(e.k == 3 and e.thumbnail == f"{e.name}/thumbnail.jpg" for e in entries)
    html = (out / "index.html").read_text()
    assert "0.812" in html and "dog" not in html and "notes" not in html
    for name in CLASSES:
        assert f'src="{name}/thumbnail.jpg"' in html
        thumb = (out / name / "thumbnail.jpg").read_bytes()
        assert thumb[:3] == b"\xff\xd8\xff"
    assert not list(out.glob(".index-*"))  # no temporary file left


def test_a_rerun_with_every_class_done_skips_without_loading_anything(tmp_path, fake_source,
                                                                      capsys, monkeypatch):
    data = _data(tmp_path)
    args = _parse(["discover", data, "--out", tmp_path / "out", *FAST])
    assert args.func(args) == 0

    def no_source(*a, **k):
        raise AssertionError("nothing to do: no feature source may be made")

    monkeypatch.setattr(export, "make_source", no_source)
    assert args.func(args) == 0
    assert capsys.readouterr().out.count("skipped (already done") == 3


def test_pipeline_default_is_on_only_where_extraction_runs_elsewhere():
    from types import SimpleNamespace

    from exporter.cli import build_parser
    from exporter.export import pipeline_pays

    cpu = SimpleNamespace(source=SimpleNamespace(providers=["CPUExecutionProvider"]))
    gpu = SimpleNamespace(source=SimpleNamespace(
        providers=["CUDAExecutionProvider", "CPUExecutionProvider"]))
    remote = SimpleNamespace(source=SimpleNamespace())  # feature servers: no providers here
    assert not pipeline_pays(cpu) and pipeline_pays(gpu) and pipeline_pays(remote)
    assert pipeline_pays(SimpleNamespace())  # an engine discoverer
    parse = build_parser().parse_args
    assert parse(["discover", "d", "--out", "o"]).pipeline is None
    assert parse(["discover", "d", "--out", "o", "--pipeline"]).pipeline is True
    assert parse(["discover", "d", "--out", "o", "--no-pipeline"]).pipeline is False

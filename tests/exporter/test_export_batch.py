"""Batch export over a fake feature source: outputs, atomicity, skipping, determinism, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from exporter_fakes import fake_module, make_class_folder

from exporter import commands, export
from exporter.export import ExportSettings, LocalDiscoverer

FAST = {"k": 3, "certainty_filter": "off", "max_iter": 100}


def _opts(**kw):
    from concept_engine.discovery import DiscoveryOptions

    return DiscoveryOptions(**kw)


@pytest.fixture
def fake_source(monkeypatch):
    """Every exporter entry point uses the fake feature source instead of ONNX Runtime."""
    src = fake_module().FakeSource()
    monkeypatch.setattr(export, "make_source", lambda *a, **k: src)
    return src


def _settings(out: Path, **discovery) -> ExportSettings:
    return ExportSettings(out=out, discovery=_opts(**{**FAST, **discovery}),
                          show_progress=False)


def test_find_classes_single_and_many(tmp_path):
    single = make_class_folder(tmp_path / "data", "ant", 2)
    make_class_folder(tmp_path / "data", "bee", 2)
    assert export.find_classes(single) == [("ant", single)]
    assert [n for n, _ in export.find_classes(tmp_path / "data")] == ["ant", "bee"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(export.InvalidInput):
        export.find_classes(tmp_path / "empty")
    with pytest.raises(export.NotFound):
        export.find_classes(tmp_path / "missing")


def test_export_class_writes_everything(tmp_path, fake_source):
    folder = make_class_folder(tmp_path / "data", "ant", 8)
    settings = _settings(tmp_path / "out")
    report = export.export_class("ant", folder, settings, LocalDiscoverer(fake_source))
    assert report.status == "done", report.error
    d = tmp_path / "out" / "ant"
    assert export.is_done(d)
    assert not (tmp_path / "out" / ".ant.partial").exists()
    for j in range(3):
        assert len(list((d / "overlays" / f"concept_{j:02d}").glob("*.jpg"))) == 8
        assert (d / "grids" / f"concept_{j:02d}_all.jpg").stat().st_size > 0
        assert (d / "grids" / f"concept_{j:02d}_top.jpg").stat().st_size > 0
    assert len(list((d / "combined").glob("*.jpg"))) == 8
    html = (d / "index.html").read_text()
    assert "concepts.h5" in html and "grids/concept_00_top.jpg" in html
    summary = json.loads((d / "summary.json").read_text())
    assert summary["k"] == 3 and summary["n_kept"] == 8 and summary["status"] == "done"
    with h5py.File(d / "concepts.h5") as f:
        assert f["bases"].shape[0] == 3


def test_k_sweep_plot_and_resume_skip_force(tmp_path, fake_source):
    folder = make_class_folder(tmp_path / "data", "ant", 8)
    settings = ExportSettings(out=tmp_path / "out", show_progress=False,
                              discovery=_opts(k=0, k_min=2, k_max=4,
                                              certainty_filter="off", max_iter=100))
    disc = LocalDiscoverer(fake_source)
    first = export.export(export.find_classes(folder), settings, disc)
    assert first[0].status == "done", first[0].error
    assert (tmp_path / "out" / "ant" / "k_sweep.png").stat().st_size > 1000
    assert first[0].k_reason
    calls = fake_source.calls
    again = export.export(export.find_classes(folder), settings, disc)
    assert again[0].status == "skipped" and fake_source.calls == calls
    forced = export.export(export.find_classes(folder),
                           ExportSettings(**{**settings.__dict__, "force": True}), disc)
    assert forced[0].status == "done" and fake_source.calls > calls


def test_leftover_partial_is_redone(tmp_path, fake_source):
    folder = make_class_folder(tmp_path / "data", "ant", 6)
    partial = tmp_path / "out" / ".ant.partial"
    partial.mkdir(parents=True)
    (partial / "concepts.h5").write_bytes(b"half a file")
    report = export.export_class("ant", folder, _settings(tmp_path / "out"),
                                 LocalDiscoverer(fake_source))
    assert report.status == "done"
    assert not partial.exists()
    with h5py.File(tmp_path / "out" / "ant" / "concepts.h5") as f:
        assert f["bases"].shape == (3, 16)


def test_same_seed_same_concepts(tmp_path, fake_source):
    folder = make_class_folder(tmp_path / "data", "ant", 8)
    disc = LocalDiscoverer(fake_source)
    bases = []
    for out in ("a", "b"):
        export.export_class("ant", folder, _settings(tmp_path / out), disc)
        with h5py.File(tmp_path / out / "ant" / "concepts.h5") as f:
            bases.append(np.asarray(f["bases"]))
    np.testing.assert_array_equal(bases[0], bases[1])


def test_too_few_images_fails_cleanly(tmp_path, fake_source):
    folder = make_class_folder(tmp_path / "data", "ant", 2)
    report = export.export_class("ant", folder, _settings(tmp_path / "out"),
                                 LocalDiscoverer(fake_source))
    assert report.status == "failed" and "usable image" in report.error
    assert not (tmp_path / "out" / "ant").exists()
    assert not (tmp_path / "out" / ".ant.partial").exists()


def _parse(argv):
    import argparse

    parser = argparse.ArgumentParser(prog="dff")
    commands.register(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_cli_discover_exit_codes_and_summary(tmp_path, fake_source, capsys):
    data = tmp_path / "data"
    make_class_folder(data, "ant", 8)
    bee = make_class_folder(data, "bee", 2)  # too few usable images: partial failure
    (bee / "broken.png").write_bytes(b"not an image")
    args = _parse(["discover", str(data), "--out", str(tmp_path / "out"), "--k", "3",
                   "--no-certainty-filter", "--no-progress"])
    assert args.func(args) == commands.EXIT_PARTIAL
    out = capsys.readouterr().out
    assert "[done] ant" in out and "[FAILED] bee" in out
    assert "1 done, 0 skipped, 1 failed" in out
    assert (tmp_path / "out" / "ant" / "index.html").is_file()
    args = _parse(["discover", str(tmp_path / "nope"), "--out", str(tmp_path / "out")])
    assert args.func(args) == commands.EXIT_USAGE
    with pytest.raises(SystemExit) as exc:
        _parse(["discover", str(data), "--out", "x", "--k", "0"])
    assert exc.value.code == 2


def test_cli_kwargs_map_to_discovery_options(tmp_path):
    from concept_engine.discovery import DiscoveryOptions

    args = _parse(["discover", "d", "--out", "o", "--k-range", "3-5", "--k-criterion",
                   "certainty", "--solver", "mu", "--seed", "7", "--no-prediction-filter",
                   "--min-images", "4", "--threshold", "0.6"])
    opts = export.discovery_options("ant", commands.options_from_args(args))
    assert opts == DiscoveryOptions(name="ant", k_min=3, k_max=5, k_criterion="certainty",
                                    solver="mu", seed=7, prediction_filter="off",
                                    prediction_min_images=4, threshold=0.6)


def test_cli_explain(tmp_path, fake_source, capsys):
    folder = make_class_folder(tmp_path / "data", "ant", 8)
    export.export_class("ant", folder, _settings(tmp_path / "out"), LocalDiscoverer(fake_source))
    new = tmp_path / "new"
    new.mkdir()
    for i, data in fake_module().make_items(3, prefix="new", start=50):
        (new / i).write_bytes(data)
    (new / "broken.png").write_bytes(b"not an image")
    args = _parse(["explain", str(new), "--concepts",
                   str(tmp_path / "out" / "ant" / "concepts.h5"), "--out",
                   str(tmp_path / "ex"), "--no-progress"])
    assert args.func(args) == commands.EXIT_PARTIAL  # one image could not be explained
    record = json.loads((tmp_path / "ex" / "explanations.json").read_text())
    assert len(record["images"]) == 3 and len(record["errors"]) == 1
    assert all(len(x["certainties"]) == 3 for x in record["images"])
    assert len(list((tmp_path / "ex" / "combined").glob("*.jpg"))) == 3
    assert (tmp_path / "ex" / "index.html").is_file()


def _wait_for(predicate, what: str) -> None:
    import time

    deadline = time.monotonic() + 120
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.01)


def test_a_class_locked_by_another_run_is_waited_for(tmp_path, fake_source, caplog):
    """A run that finds a class locked (a retried Job pod, an overlapping shard or --force)
    waits instead of failing (exit 3 would fail the Job although the class completes): it
    then skips the class the other run finished, or does the one it left unfinished."""
    import shutil
    import threading

    folder = make_class_folder(tmp_path / "data", "ant", 6)
    done = export.export_class("ant", folder, _settings(tmp_path / "other"),
                               LocalDiscoverer(fake_source))
    assert done.status == "done"
    calls = fake_source.calls
    out = tmp_path / "out"
    for finish_it in (True, False):
        reports: list[export.ClassReport] = []

        def wait_and_export(into: list = reports) -> None:
            into.append(export.export_class("ant", folder, _settings(out),
                                            LocalDiscoverer(fake_source)))

        with export._class_lock(out, "ant") as locked:
            assert locked
            waiter = threading.Thread(target=wait_and_export)
            waiter.start()
            _wait_for(lambda: "waiting for it" in caplog.text, "the waiting message")
            assert waiter.is_alive() and fake_source.calls == calls  # nothing touched
            if finish_it:  # the lock holder publishes the finished class
                shutil.copytree(tmp_path / "other" / "ant", out / "ant")
        waiter.join()
        caplog.clear()
        if finish_it:
            assert reports[0].status == "skipped" and fake_source.calls == calls
            shutil.rmtree(out / "ant")
        else:
            assert reports[0].status == "done" and fake_source.calls == calls + 1


def test_damaged_or_moved_outputs_are_handled(tmp_path, fake_source):
    """A summary.json that parses but is not a finished class's, a class folder missing its
    concepts.h5 (both: redone, not a crash or a refusal), the .partial of a killed --force
    run next to a finished class (removed), and an OUT that moved (skip messages and
    summary.json name where the class is now, not where it was written)."""
    from exporter.site_index import finished_classes

    folder = make_class_folder(tmp_path / "data", "ant", 6)
    out = tmp_path / "out"
    first = export.export_class("ant", folder, _settings(out), LocalDiscoverer(fake_source))
    summary = json.loads((out / "ant" / "summary.json").read_text())
    assert summary["out_dir"] == "ant"  # relative to OUT: N shards write what one run writes
    for edit in ({}, {**summary, "k": "two"}, {"name": "ant"}, {**summary, "n_kept": 0}):
        (out / "ant" / "summary.json").write_text(json.dumps(edit))
        assert not export.is_done(out / "ant") and finished_classes(out) == []
        again = export.export_class("ant", folder, _settings(out), LocalDiscoverer(fake_source))
        assert again.status == "done" and again.k == first.k
    (out / "ant" / "concepts.h5").unlink()
    again = export.export_class("ant", folder, _settings(out), LocalDiscoverer(fake_source))
    assert again.status == "done" and (out / "ant" / "concepts.h5").is_file()
    (out / ".ant.partial").mkdir()
    (out / ".ant.partial" / "half.png").write_bytes(b"x")
    skipped = export.export_class("ant", folder, _settings(out), LocalDiscoverer(fake_source))
    assert skipped.status == "skipped" and not (out / ".ant.partial").exists()
    moved = tmp_path / "moved"
    out.rename(moved)
    skipped = export.export_class("ant", folder, _settings(moved), LocalDiscoverer(fake_source))
    assert skipped.out_dir == str(moved / "ant")


def test_an_empty_shard_still_builds_the_site_index(tmp_path, fake_source, capsys):
    make_class_folder(tmp_path / "data", "ant", 6)
    out = tmp_path / "out"
    args = _parse(["discover", str(tmp_path / "data"), "--out", str(out), "--shard", "1/2",
                   "--k", "3", "--no-progress"])
    assert args.func(args) == commands.EXIT_OK
    assert (out / "index.html").is_file()
    assert "none falls to this shard" in capsys.readouterr().err


def test_foreign_folder_is_not_replaced_without_force(tmp_path, fake_source):
    folder = make_class_folder(tmp_path / "data", "ant", 6)
    (tmp_path / "out" / "ant").mkdir(parents=True)
    (tmp_path / "out" / "ant" / "mine.txt").write_text("keep me")
    report = export.export_class("ant", folder, _settings(tmp_path / "out"),
                                 LocalDiscoverer(fake_source))
    assert report.status == "failed" and "--force" in report.error
    assert (tmp_path / "out" / "ant" / "mine.txt").read_text() == "keep me"

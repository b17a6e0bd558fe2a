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


def test_a_class_locked_by_another_run_is_not_touched(tmp_path, fake_source):
    folder = make_class_folder(tmp_path / "data", "ant", 6)
    out = tmp_path / "out"
    with export._class_lock(out, "ant") as locked:
        assert locked
        report = export.export_class("ant", folder, _settings(out), LocalDiscoverer(fake_source))
    assert report.status == "failed" and "another dff discover" in report.error
    assert fake_source.calls == 0
    report = export.export_class("ant", folder, _settings(out), LocalDiscoverer(fake_source))
    assert report.status == "done"


def test_foreign_folder_is_not_replaced_without_force(tmp_path, fake_source):
    folder = make_class_folder(tmp_path / "data", "ant", 6)
    (tmp_path / "out" / "ant").mkdir(parents=True)
    (tmp_path / "out" / "ant" / "mine.txt").write_text("keep me")
    report = export.export_class("ant", folder, _settings(tmp_path / "out"),
                                 LocalDiscoverer(fake_source))
    assert report.status == "failed" and "--force" in report.error
    assert (tmp_path / "out" / "ant" / "mine.txt").read_text() == "keep me"

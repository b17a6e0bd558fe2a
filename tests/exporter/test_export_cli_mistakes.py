"""Ordinary mistakes of discover, explain, extract and label exit 2 with one line before any
feature is extracted; per-image problems are named, and exit 3 (the QA pass of the CLI)."""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor

import grpc
import h5py
import pytest
from exporter_fakes import fake_module, make_class_folder
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from exporter import commands, export
from exporter.cli import main

FAST = ["--k", "3", "--no-certainty-filter", "--max-iter", "50", "--bootstrap", "0",
        "--no-progress"]
ALL_LAYERS = [f"conv{b}_{i}" for b, n in ((1, 2), (2, 2), (3, 4), (4, 4), (5, 4))
              for i in range(1, n + 1)]


class _Source(fake_module().FakeSource):
    """The fake feature source, describing vgg19 and its int8 variant (which lacks the early
    layers, like the real one) and int8 as its default precision."""

    def describe(self) -> dict:
        d = super().describe()
        fp32 = {**d["models"][0], "layers": {n: {} for n in ALL_LAYERS}}
        int8 = {**fp32, "name": "vgg19_int8", "precision": "int8",
                "layers": {n: {} for n in ALL_LAYERS if n >= "conv4"}}
        return {**d, "models": [fp32, int8, *d["models"][1:]], "default_precision": "int8"}

    def close(self) -> None:
        pass


@pytest.fixture
def source(monkeypatch):
    """The fake source wherever a feature source is made (feature servers, in-process)."""
    from feature_server.extractor import Extractor

    src = _Source()
    monkeypatch.setattr(export, "make_source", lambda *a, **k: src)
    monkeypatch.setattr(Extractor, "from_cache", staticmethod(lambda *a, **k: src))
    monkeypatch.delenv("JOB_COMPLETION_INDEX", raising=False)
    monkeypatch.delenv("JOB_COMPLETIONS", raising=False)
    return src


@pytest.fixture
def server():
    """A feature server's health service (what discover probes --feature-server with)."""
    srv = grpc.server(ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, srv)
    for name in ("dff.v1.FeatureService", ""):
        servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    port = srv.add_insecure_port("127.0.0.1:0")
    srv.start()
    yield f"127.0.0.1:{port}"
    srv.stop(0)


def _run(argv, capsys):
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def _usage(rc, err, *pieces):
    assert rc == commands.EXIT_USAGE, err
    assert err.count("\n") == 1, err  # one line
    for piece in pieces:
        assert piece in err, (piece, err)


@pytest.fixture
def concepts(tmp_path, source, capsys):
    """A concept set made by discover (out/ant/concepts.h5)."""
    folder = make_class_folder(tmp_path / "data", "ant", 6)
    rc, out, err = _run(["discover", folder, "--out", tmp_path / "out", *FAST], capsys)
    assert rc == 0, out + err
    return tmp_path / "out" / "ant" / "concepts.h5"


# ------------------------------------------------------------------ explain

def test_explain_refuses_to_write_over_a_discover_report(tmp_path, concepts, capsys):
    new = make_class_folder(tmp_path, "new", 2)
    class_dir = concepts.parent
    before = {p.name: p.stat().st_mtime_ns for p in class_dir.iterdir()}
    rc, _, err = _run(["explain", new, "--concepts", concepts, "--out", class_dir,
                       "--no-progress"], capsys)
    _usage(rc, err, f"--out {class_dir}", "`dff discover` report", "give another folder")
    rc, _, err = _run(["explain", new, "--concepts", concepts, "--out", class_dir.parent,
                       "--no-progress"], capsys)
    _usage(rc, err, "`dff discover` output folder", "index.html")
    assert {p.name: p.stat().st_mtime_ns for p in class_dir.iterdir()} == before


def test_explain_rerun_holds_only_this_runs_pictures(tmp_path, concepts, capsys):
    new = make_class_folder(tmp_path, "new", 3)
    ex = tmp_path / "ex"
    ex.mkdir()
    (ex / "notes.txt").write_text("mine")
    rc, _, err = _run(["explain", new, "--concepts", concepts, "--out", ex, "--no-progress"],
                      capsys)
    assert rc == 0, err
    assert len(list((ex / "combined").glob("*.jpg"))) == 3
    one = sorted(new.iterdir())[0]
    rc, _, err = _run(["explain", one, "--concepts", concepts, "--out", ex, "--no-progress"],
                      capsys)
    assert rc == 0, err
    assert [p.stem for p in (ex / "combined").glob("*.jpg")] == [one.stem]
    for folder in (ex / "overlays").iterdir():
        assert [p.stem for p in folder.glob("*.jpg")] == [one.stem]
    assert (ex / "notes.txt").read_text() == "mine"  # not explain's: untouched
    # a folder with pictures explain did not write is not mixed into
    other = tmp_path / "other"
    (other / "combined").mkdir(parents=True)
    rc, _, err = _run(["explain", one, "--concepts", concepts, "--out", other,
                       "--no-progress"], capsys)
    _usage(rc, err, "combined", "not written by `dff explain`")


def test_explain_one_file_given_twice_is_refused(tmp_path, concepts, capsys, monkeypatch):
    new = make_class_folder(tmp_path, "new", 2)
    one = sorted(new.iterdir())[0]
    monkeypatch.chdir(tmp_path)
    for images in ([f"new/{one.name}", f"new/./{one.name}"], [new, new], [new, one]):
        rc, _, err = _run(["explain", *images, "--concepts", concepts, "--out",
                           tmp_path / "ex", "--no-progress"], capsys)
        _usage(rc, err, "given twice", one.name)
    assert not (tmp_path / "ex").exists()


def test_explain_damaged_concept_set_is_a_usage_error(tmp_path, concepts, capsys):
    new = make_class_folder(tmp_path, "new", 1)
    damaged = tmp_path / "damaged.h5"
    damaged.write_bytes(concepts.read_bytes())
    with h5py.File(damaged, "r+") as f:
        del f["bases"]
    rc, _, err = _run(["explain", new, "--concepts", damaged, "--out", tmp_path / "ex",
                       "--no-progress"], capsys)
    _usage(rc, err, f"--concepts {damaged}", "not a usable concept set")


def test_explain_unreachable_feature_server_is_a_usage_error(tmp_path, concepts, capsys,
                                                             monkeypatch):
    monkeypatch.undo()  # the real feature client: nothing listens on port 1
    new = make_class_folder(tmp_path, "new", 1)
    rc, _, err = _run(["explain", new, "--concepts", concepts, "--out", tmp_path / "ex",
                       "--feature-server", "127.0.0.1:1", "--timeout", "5", "--no-progress"],
                      capsys)
    _usage(rc, err, "--feature-server 127.0.0.1:1 cannot be used")


def test_out_a_dangling_link_is_a_usage_error(tmp_path, concepts, capsys):
    link = tmp_path / "dl"
    link.symlink_to(tmp_path / "nowhere" / "dir")
    folder = concepts.parent.parent.parent / "data" / "ant"
    rc, _, err = _run(["discover", folder, "--out", link, *FAST], capsys)
    _usage(rc, err, f"--out {link}", "symbolic link")
    rc, _, err = _run(["explain", folder, "--concepts", concepts, "--out", link / "x",
                       "--no-progress"], capsys)
    _usage(rc, err, "symbolic link")


# ------------------------------------------------------------------ discover

def test_a_damaged_summary_means_unfinished_and_the_class_is_redone(tmp_path, source, capsys):
    data = tmp_path / "data"
    make_class_folder(data, "aaa", 5)
    make_class_folder(data, "bbb", 5)
    out = tmp_path / "out"
    assert _run(["discover", data, "--out", out, *FAST], capsys)[0] == 0
    (out / "aaa" / "summary.json").write_text('{"trunc')
    rc, text, err = _run(["discover", data, "--out", out, *FAST], capsys)
    assert rc == 0, err
    assert "[done] aaa" in text and "skipped" in text and "summary.json" in err
    assert json.loads((out / "aaa" / "summary.json").read_text())["status"] == "done"


def test_class_names_cannot_take_site_level_names(tmp_path, source, capsys):
    data = tmp_path / "data"
    make_class_folder(data, "index.html", 5)
    rc, _, err = _run(["discover", data, "--out", tmp_path / "out", *FAST], capsys)
    _usage(rc, err, "index.html", "rename the folder")
    assert source.calls == 0
    # a class named "index": its lock is not the site index's
    data = tmp_path / "data2"
    make_class_folder(data, "index", 5)
    out = tmp_path / "out2"
    with export._class_lock(out, "index") as locked:
        assert locked
        from exporter.site_index import write_site_index

        write_site_index(out)  # would wait for the class lock forever if they were one
    assert _run(["discover", data, "--out", out, *FAST], capsys)[0] == 0
    assert (out / "index.html").is_file() and (out / "index" / "index.html").is_file()


def test_layer_and_model_are_checked_against_the_model_that_runs(tmp_path, source, server,
                                                                 capsys):
    folder = make_class_folder(tmp_path / "data", "ant", 4)
    common = [folder, "--out", tmp_path / "out", "--feature-server", server, *FAST]
    rc, _, err = _run(["discover", *common, "--layer", "conv1_1"], capsys)
    _usage(rc, err, "--layer conv1_1", "vgg19_int8", "conv4_1", "--precision")
    rc, _, err = _run(["discover", *common, "--model", "bogus"], capsys)
    _usage(rc, err, "--model bogus", "vgg19, vgg19_int8")
    rc, _, err = _run(["discover", *common, "--classifier", "bogus"], capsys)
    _usage(rc, err, "--classifier bogus", "efficientnet_lite0")
    assert source.calls == 0
    rc, _, err = _run(["discover", *common, "--layer", "conv1_1", "--precision", "fp32"],
                      capsys)
    assert rc == commands.EXIT_PARTIAL  # passes the check (the fake computes conv5_4 only)


def test_layer_the_int8_model_lacks_in_process(tmp_path, capsys, monkeypatch):
    """The repro: conv1_1 is a layer of vgg19 but not of vgg19_int8, which --precision auto
    runs on a CPU; refused up front naming the layers (models built here, no extraction)."""
    from feature_server.extractor import select_providers
    from feature_server.models.registry import load_registry

    try:
        registry = load_registry()
    except Exception:  # noqa: BLE001
        registry = {}
    if "vgg19_int8" not in registry or select_providers()[0] != "CPUExecutionProvider":
        pytest.skip("needs the int8 model (`dff models build`) and a CPU-only machine")
    monkeypatch.setattr(export, "make_source", lambda *a, **k: pytest.fail("extracted"))
    folder = make_class_folder(tmp_path / "data", "ant", 4)
    rc, _, err = _run(["discover", folder, "--out", tmp_path / "out", "--layer", "conv1_1",
                       *FAST], capsys)
    _usage(rc, err, "--layer conv1_1", "vgg19_int8", "conv5_4")
    rc, _, err = _run(["discover", folder, "--out", tmp_path / "out", "--model", "bogus",
                       *FAST], capsys)
    _usage(rc, err, "--model bogus", "vgg19")
    rc, _, err = _run(["discover", folder, "--out", tmp_path / "out", "--classifier",
                       "bogus", *FAST], capsys)
    _usage(rc, err, "--classifier bogus", "efficientnet_lite0")


def test_default_classifier_missing_is_not_a_usage_error(tmp_path, source, server, capsys,
                                                         monkeypatch):
    describe = _Source.describe
    monkeypatch.setattr(_Source, "describe", lambda self: {
        **describe(self), "models": describe(self)["models"][:2]})
    monkeypatch.setattr(_Source, "class_names", lambda self, c=None: (_ for _ in ()).throw(
        __import__("dff_protos.errors").errors.NotFound("no classifier")))
    folder = make_class_folder(tmp_path / "data", "ant", 4)
    rc, text, err = _run(["discover", folder, "--out", tmp_path / "out", "--feature-server",
                          server, *FAST], capsys)
    assert rc == 0, err
    assert "prediction filter skipped" in text


def test_files_that_could_not_be_used_are_named(tmp_path, source, capsys):
    folder = make_class_folder(tmp_path / "data", "ant", 6)
    (folder / "notimg.png").write_bytes(b"x\n")
    (folder / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    rc, text, _ = _run(["discover", folder, "--out", tmp_path / "out", *FAST], capsys)
    assert rc == commands.EXIT_PARTIAL
    assert "error: notimg.png: cannot decode" in text
    assert "error: gone.jpg: cannot read the file" in text
    summary = json.loads((tmp_path / "out" / "ant" / "summary.json").read_text())
    assert summary["n_errors"] == 2  # the keys of before are kept
    assert sorted(e["id"] for e in summary["errors"]) == ["gone.jpg", "notimg.png"]
    assert all(e["reason"] for e in summary["errors"])
    with h5py.File(tmp_path / "out" / "ant" / "concepts.h5") as f:  # every input, also unread
        assert "gone.jpg" in json.loads(f.attrs["provenance_json"])["input_images"]
    # a failed class names them too
    few = make_class_folder(tmp_path / "few", "bee", 1)
    (few / "empty.jpg").write_bytes(b"")
    rc, text, _ = _run(["discover", few, "--out", tmp_path / "out", *FAST, "--k", "2"],
                       capsys)
    assert rc == commands.EXIT_PARTIAL and "[FAILED] bee" in text
    assert "empty.jpg: " in text


def test_summary_json_is_strict_json_without_the_bootstrap(tmp_path, source, capsys):
    """--bootstrap 0 leaves the concepts' stabilities unmeasured (NaN): summary.json said
    ``NaN``, which JSON readers refuse; the set's split-half stability is still measured."""
    folder = make_class_folder(tmp_path / "data", "ant", 8)
    rc, text, _ = _run(["discover", folder, "--out", tmp_path / "out", *FAST], capsys)
    assert rc == 0 and "split-half nan" not in text
    assert "concept stability not measured (--bootstrap 0)" in text

    def refuse(constant: str) -> None:
        raise ValueError(f"not JSON: {constant}")

    summary = json.loads((tmp_path / "out" / "ant" / "summary.json").read_text(),
                         parse_constant=refuse)
    assert summary["concept_stability"] == [] and 0 < summary["stability"] <= 1


def test_job_completions_without_an_index_is_a_usage_error(tmp_path, source, capsys,
                                                          monkeypatch):
    folder = make_class_folder(tmp_path / "data", "ant", 4)
    monkeypatch.setenv("JOB_COMPLETIONS", "2")
    rc, _, err = _run(["discover", folder, "--out", tmp_path / "out", *FAST], capsys)
    _usage(rc, err, "JOB_COMPLETIONS=2", "JOB_COMPLETION_INDEX")
    monkeypatch.setenv("JOB_COMPLETIONS", "")  # empty counts as unset
    assert _run(["discover", folder, "--out", tmp_path / "out", *FAST], capsys)[0] == 0


# ------------------------------------------------------------------ label

def test_label_checks_every_argument_before_storing_names(tmp_path, concepts, capsys):
    from concept_engine.store import load_concept_set

    folder = concepts.parent.parent.parent / "data" / "ant"
    for images, message in ((tmp_path / "missing", "no such folder"),
                            (next(folder.iterdir()), "is a file"),
                            (make_class_folder(tmp_path, "other", 2), "training image(s)")):
        rc, _, err = _run(["label", concepts, "0=head", "--images", images], capsys)
        _usage(rc, err, f"--images {images}", message)
        assert load_concept_set(concepts).concept_names in ([], ["", "", ""])
    rc, out, err = _run(["label", concepts, "0=head", "--images", folder], capsys)
    assert rc == 0, err
    assert load_concept_set(concepts).concept_names[0] == "head"


# ------------------------------------------------------------------ extract

def test_extract_ordinary_mistakes_exit_2_with_one_line(tmp_path, source, capsys):
    d1, d2 = make_class_folder(tmp_path, "d1", 1), make_class_folder(tmp_path, "d2", 1)
    a, b = next(d1.iterdir()), next(d2.iterdir())
    h5 = tmp_path / "f.h5"
    cases = [
        ([a, b, "--out", h5], ["same id", str(a), str(b)]),
        ([a, a, "--out", h5], ["given twice"]),
        ([tmp_path / "nonexist", "--out", h5], ["no such image file or folder"]),
        ([d1, "--out", tmp_path], [f"--out {tmp_path} is a folder"]),
        ([d1, "--out", h5, "--model", "nosuch"], ["--model nosuch", "vgg19"]),
        ([d1, "--out", h5, "--size", "16"], ["--size 16"]),
        ([d1, "--out", h5, "--layers", "conv9_9"], ["--layers conv9_9", "conv5_4"]),
        ([d1, "--out", h5, "--top-k", "-1"], ["--top-k -1"]),
    ]
    for argv, pieces in cases:
        rc, _, err = _run(["extract", *argv], capsys)
        _usage(rc, err, *pieces)
    assert source.calls == 0 and not h5.exists()


def test_extract_per_image_errors_exit_3(tmp_path, source, capsys):
    folder = make_class_folder(tmp_path, "imgs", 2)
    (folder / "zero.jpg").write_bytes(b"")
    (folder / "dangling.jpg").symlink_to(tmp_path / "gone.jpg")
    os.mkfifo(folder / "fifo.png")  # never opened: not a regular file
    h5 = tmp_path / "f.h5"
    rc, out, err = _run(["extract", folder, "--out", h5], capsys)
    assert rc == commands.EXIT_PARTIAL, err
    assert "2 of 5 images" in out
    for name in ("zero.jpg", "dangling.jpg", "fifo.png"):
        assert name in err
    with h5py.File(h5) as f:
        ids = [x.decode() for x in f["ids"][()]]
        errors = dict(zip(ids, (x.decode() for x in f["errors"][()]), strict=True))
    assert sorted(ids) == sorted(p.name for p in folder.iterdir())
    assert errors["dangling.jpg"] and errors["fifo.png"] and errors["zero.jpg"]
    rc, out, _ = _run(["extract", make_class_folder(tmp_path, "ok", 2), "--out", h5], capsys)
    assert rc == 0 and "2 of 2 images" in out

"""Batch robustness (issue 7 part 5): per-file errors, OUT inside DATA_DIR, collision-free names,
the sub-folder rule, and the ordinary mistakes that exit 2 before any feature is extracted."""

from __future__ import annotations

import argparse
import builtins
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import h5py
import pytest
from exporter_fakes import fake_module, make_class_folder
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from exporter import commands, export

ROOT_USER = hasattr(os, "geteuid") and os.geteuid() == 0


@pytest.fixture
def fake_source(monkeypatch):
    src = fake_module().FakeSource()
    monkeypatch.setattr(export, "make_source", lambda *a, **k: src)
    return src


def _parse(argv):
    parser = argparse.ArgumentParser(prog="dff")
    commands.register(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def _discover(argv, capsys):
    args = _parse(["discover", *[str(a) for a in argv], "--no-progress"])
    rc = args.func(args)
    out = capsys.readouterr()
    return rc, out.out, out.err


FAST = ["--k", "3", "--no-certainty-filter", "--max-iter", "100"]


# ------------------------------------------------------------------ per-file problems

def test_bad_files_are_per_image_errors_and_every_class_goes_on(tmp_path, fake_source,
                                                                 capsys, monkeypatch):
    data = tmp_path / "data"
    ant = make_class_folder(data, "ant", 6)
    make_class_folder(data, "bee", 6)
    make_class_folder(data, "cat", 6)
    (ant / "broken.png").write_bytes(b"not an image at all")
    (ant / "dangling.jpg").symlink_to(tmp_path / "gone.jpg")
    big = ant / "huge.jpg"  # 3 GB, sparse: must be refused from its size, never read
    with open(big, "wb") as fh:
        fh.truncate(3 << 30)
    os.mkfifo(data / "bee" / "pipe.png")  # a FIFO: reading it would block forever
    locked = data / "cat" / "locked.png"
    locked.write_bytes(fake_module().make_image(99))
    locked.chmod(0)
    real_open = builtins.open
    opened = []

    def spy_open(file, *a, **k):
        opened.append(str(file))
        if str(file) == str(locked) and ROOT_USER:  # root reads mode 000: simulate the denial
            raise PermissionError(13, "Permission denied")
        return real_open(file, *a, **k)

    monkeypatch.setattr(builtins, "open", spy_open)
    rc, out, err = _discover([data, "--out", tmp_path / "out", *FAST], capsys)
    monkeypatch.setattr(builtins, "open", real_open)
    assert rc == commands.EXIT_PARTIAL, out + err
    assert out.count("[done]") == 3, out
    assert "5 image(s) could not be used" in out
    assert str(big) not in opened and str(data / "bee" / "pipe.png") not in opened
    summary = json.loads((tmp_path / "out" / "ant" / "summary.json").read_text())
    assert summary["n_images"] == 9 and summary["n_kept"] == 6 and summary["n_errors"] == 3
    reasons = " | ".join(summary["dropped"])
    assert "above the limit of 67108864 bytes" in reasons
    assert "cannot read the file" in reasons and "cannot decode" in reasons
    with h5py.File(tmp_path / "out" / "ant" / "concepts.h5") as f:  # recorded in the set too
        ids = [x.decode() if isinstance(x, bytes) else x for x in f["decisions/ids"][()]]
    assert {"broken.png", "dangling.jpg", "huge.jpg"} <= set(ids)
    for name in ("bee", "cat"):
        summary = json.loads((tmp_path / "out" / name / "summary.json").read_text())
        assert summary["n_errors"] == 1 and summary["n_kept"] == 6


def test_max_file_size_is_configurable(tmp_path, fake_source, capsys):
    folder = make_class_folder(tmp_path / "data", "ant", 5)
    sizes = sorted(p.stat().st_size for p in folder.iterdir())
    limit = sizes[-1] - 1  # the largest file is now too large
    rc, out, _ = _discover([folder, "--out", tmp_path / "out", *FAST,
                            "--max-file-size", str(limit)], capsys)
    assert rc == commands.EXIT_PARTIAL and "1 image(s) could not be used" in out
    summary = json.loads((tmp_path / "out" / "ant" / "summary.json").read_text())
    assert summary["n_kept"] == 4
    with pytest.raises(SystemExit):
        _parse(["discover", "d", "--out", "o", "--max-file-size", "lots"])
    assert commands._byte_size("64M") == 64 << 20 and commands._byte_size("1g") == 1 << 30


def test_all_files_unreadable_fails_the_class_with_the_reason(tmp_path, fake_source, capsys):
    folder = tmp_path / "data" / "ant"
    folder.mkdir(parents=True)
    for i in range(3):
        (folder / f"{i}.jpg").symlink_to(tmp_path / f"missing{i}.jpg")
    rc, out, _ = _discover([folder, "--out", tmp_path / "out", "--k", "2"], capsys)
    assert rc == commands.EXIT_PARTIAL
    assert "[FAILED] ant" in out and "3 file(s) unreadable" in out


# ------------------------------------------------------------------ layout

def test_out_inside_data_dir_is_never_read(tmp_path, fake_source, capsys):
    data = tmp_path / "data"
    make_class_folder(data, "ant", 6)
    make_class_folder(data, "bee", 6)
    out = data / "out"
    rc, _, _ = _discover([data, "--out", out, *FAST], capsys)
    assert rc == 0
    assert export.find_classes(data, out=out) == [("ant", data / "ant"), ("bee", data / "bee")]
    seen = fake_source.items_seen
    rc, out_text, _ = _discover([data, "--out", out, *FAST, "--force"], capsys)
    assert rc == 0 and "2 done" in out_text
    assert fake_source.items_seen - seen == 12  # the overlays in data/out were not read
    # a single class folder with OUT inside it: not refused as "images + sub-folders"
    single = data / "ant"
    rc, _, _ = _discover([single, "--out", single / "results", *FAST], capsys)
    assert rc == 0
    summary = json.loads((single / "results" / "ant" / "summary.json").read_text())
    assert summary["n_images"] == 6
    # DATA_DIR inside OUT (or equal to it) would mix inputs and outputs: refused
    rc, _, err = _discover([single, "--out", data, *FAST], capsys)
    assert rc == commands.EXIT_USAGE and "inside the output folder" in err


def test_output_names_never_collide(tmp_path, fake_source, capsys):
    folder = tmp_path / "data" / "ant"
    folder.mkdir(parents=True)
    make = fake_module().make_image
    names = ["a.jpg", "a.png", "photo 1.jpg", "photo_1.jpg", "b.jpg", "c.jpg"]
    for i, name in enumerate(names):
        (folder / name).write_bytes(make(i))
    rc, _, _ = _discover([folder, "--out", tmp_path / "out", *FAST], capsys)
    assert rc == 0
    combined = sorted(p.name for p in (tmp_path / "out" / "ant" / "combined").iterdir())
    assert len(combined) == len(names)
    assert "b.jpg" in combined and "c.jpg" in combined  # names stay readable when unique
    for j in range(3):
        overlays = list((tmp_path / "out" / "ant" / "overlays" / f"concept_{j:02d}").iterdir())
        assert len(overlays) == len(names)


def test_output_stems_are_deterministic_and_case_insensitively_unique():
    ids = ["a.jpg", "a.png", "A.JPG", "photo 1.jpg", "photo_1.jpg", "sub/x.jpg", "sub__x.jpg",
           "only.jpg", "ünï.jpg"]
    stems = export.output_stems(ids)
    assert stems == export.output_stems(list(reversed(ids)))  # order does not matter
    assert len({s.lower() for s in stems.values()}) == len(ids)
    assert stems["only.jpg"] == "only"
    assert all(set(s) <= set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")
               for s in stems.values() if s != stems["ünï.jpg"])


def test_a_folder_with_images_and_image_subfolders_is_refused(tmp_path, fake_source, capsys):
    data = tmp_path / "data"
    ant = make_class_folder(data, "ant", 4)
    make_class_folder(ant, "queens", 3)
    make_class_folder(data, "bee", 4)
    rc, _, err = _discover([data, "--out", tmp_path / "out", *FAST], capsys)
    assert rc == commands.EXIT_USAGE and fake_source.calls == 0
    assert str(ant) in err and "queens" in err and "sub-folder" in err
    assert err.count("\n") == 1  # one line
    rc, _, err = _discover([ant, "--out", tmp_path / "out", *FAST], capsys)
    assert rc == commands.EXIT_USAGE and "queens" in err
    # a sub-folder without images (notes/, hidden ones) is fine
    (ant / "queens").rename(tmp_path / "queens")
    (ant / "notes").mkdir()
    (ant / "notes" / "readme.txt").write_text("x")
    make_class_folder(ant, ".thumbs", 2)
    rc, out, _ = _discover([ant, "--out", tmp_path / "out", *FAST], capsys)
    assert rc == 0 and "4 found" in out


def test_a_folder_of_folders_below_data_dir_is_skipped_with_a_warning(tmp_path, fake_source,
                                                                       caplog):
    data = tmp_path / "data"
    make_class_folder(data, "ant", 4)
    make_class_folder(data / "insects", "bee", 4)
    with caplog.at_level("WARNING"):
        classes = export.find_classes(data)
    assert [n for n, _ in classes] == ["ant"]
    assert "insects" in caplog.text and "skipped" in caplog.text


# ------------------------------------------------------------------ ordinary mistakes: exit 2

def _health_server(service: str):
    server = grpc.server(ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, f"127.0.0.1:{port}"


def test_engine_pointed_at_a_feature_server_and_the_reverse(tmp_path, fake_source, capsys):
    folder = make_class_folder(tmp_path / "data", "ant", 4)
    server, address = _health_server("dff.v1.FeatureService")
    try:
        rc, _, err = _discover([folder, "--out", tmp_path / "out", "--engine", address],
                               capsys)
        assert rc == commands.EXIT_USAGE
        assert f"{address} is a feature server" in err and "use --feature-server" in err
    finally:
        server.stop(0)
    server, address = _health_server("dff.v1.ConceptEngine")
    try:
        rc, _, err = _discover([folder, "--out", tmp_path / "out", "--feature-server",
                                address], capsys)
        assert rc == commands.EXIT_USAGE
        assert f"{address} is a concept engine" in err and "use --engine" in err
    finally:
        server.stop(0)
    assert fake_source.calls == 0 and not (tmp_path / "out" / "ant").exists()


def test_unknown_layer_is_refused_before_extraction(tmp_path, fake_source, capsys,
                                                    monkeypatch):
    class Described:
        def describe(self):
            return {"models": [{"name": "vgg19", "layers": {"conv5_4": {}, "conv4_4": {}}}]}

        def close(self):
            pass

    folder = make_class_folder(tmp_path / "data", "ant", 4)
    server, address = _health_server("dff.v1.FeatureService")
    monkeypatch.setattr(export, "make_source", lambda *a, **k: Described())
    try:
        rc, _, err = _discover([folder, "--out", tmp_path / "out", "--feature-server",
                                address, "--layer", "conv9_9"], capsys)
    finally:
        server.stop(0)
    assert rc == commands.EXIT_USAGE
    assert "--layer conv9_9" in err and "conv5_4, conv4_4" in err


def test_unknown_layer_in_process(tmp_path, capsys):
    from feature_server.models.registry import load_registry

    if "vgg19" not in load_registry():
        pytest.skip("models not built (run `dff models build`)")
    folder = make_class_folder(tmp_path / "data", "ant", 4)
    rc, _, err = _discover([folder, "--out", tmp_path / "out", "--layer", "fc7"], capsys)
    assert rc == commands.EXIT_USAGE and "--layer fc7" in err and "conv5_4" in err


def test_k_larger_than_the_images_of_a_class(tmp_path, fake_source, capsys):
    data = tmp_path / "data"
    make_class_folder(data, "ant", 8)
    make_class_folder(data, "bee", 3)
    rc, _, err = _discover([data, "--out", tmp_path / "out", "--k", "4"], capsys)
    assert rc == commands.EXIT_USAGE and fake_source.calls == 0
    assert "--k 4" in err and "class bee (3" in err and "lower --k" in err


def test_out_is_a_file_or_read_only(tmp_path, fake_source, capsys):
    folder = make_class_folder(tmp_path / "data", "ant", 4)
    out_file = tmp_path / "out.txt"
    out_file.write_text("x")
    rc, _, err = _discover([folder, "--out", out_file, *FAST], capsys)
    assert rc == commands.EXIT_USAGE and "is a file" in err
    rc, _, err = _discover([folder, "--out", out_file / "deeper", *FAST], capsys)
    assert rc == commands.EXIT_USAGE and "is a file" in err
    if ROOT_USER:  # permissions do not stop root: a file system that refuses writes does
        read_only = Path("/sys/dff-read-only-test")
    else:
        read_only = tmp_path / "ro"
        read_only.mkdir()
        read_only.chmod(0o555)
    rc, _, err = _discover([folder, "--out", read_only, *FAST], capsys)
    assert rc == commands.EXIT_USAGE and "not writable" in err and str(read_only) in err
    assert fake_source.calls == 0


def test_shard_mistakes(tmp_path, fake_source, capsys, monkeypatch):
    folder = make_class_folder(tmp_path / "data", "ant", 4)
    for bad in ("2/2", "1/0", "x", "-1/3"):
        with pytest.raises(SystemExit) as exc:
            _parse(["discover", str(folder), "--out", "o", "--shard", bad])
        assert exc.value.code == 2
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "3")
    monkeypatch.delenv("JOB_COMPLETIONS", raising=False)
    rc, _, err = _discover([folder, "--out", tmp_path / "out", *FAST], capsys)
    assert rc == commands.EXIT_USAGE and "JOB_COMPLETIONS" in err
    monkeypatch.setenv("JOB_COMPLETIONS", "2")
    rc, _, err = _discover([folder, "--out", tmp_path / "out", *FAST], capsys)
    assert rc == commands.EXIT_USAGE and "JOB_COMPLETION_INDEX=3" in err


def _explain(argv, capsys):
    args = _parse(["explain", *[str(a) for a in argv], "--no-progress"])
    rc = args.func(args)
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_explain_mistakes_exit_2_with_one_line(tmp_path, fake_source, capsys):
    new = make_class_folder(tmp_path, "new", 2)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["x"] = [1, 2, 3]
    cases = [
        ([new, "--concepts", text, "--out", tmp_path / "ex"], "is not an HDF5 file"),
        ([new, "--concepts", foreign, "--out", tmp_path / "ex"], "not a dff concept set"),
        ([new, "--concepts", tmp_path / "nope.h5", "--out", tmp_path / "ex"], "no such file"),
        ([new, "--concepts", tmp_path, "--out", tmp_path / "ex"], "is not a file"),
    ]
    for argv, message in cases:
        rc, _, err = _explain(argv, capsys)
        assert rc == commands.EXIT_USAGE and message in err, (argv, err)
        assert err.count("\n") == 1 and "OUT/<class>/concepts.h5" in err
    # a real concept set, then an OUT that is a file and two images with one id
    folder = make_class_folder(tmp_path / "data", "ant", 6)
    rc, _, _ = _discover([folder, "--out", tmp_path / "out", *FAST], capsys)
    concepts = tmp_path / "out" / "ant" / "concepts.h5"
    rc, _, err = _explain([new, "--concepts", concepts, "--out", text], capsys)
    assert rc == commands.EXIT_USAGE and "is a file" in err
    other = make_class_folder(tmp_path / "other", "new", 2)
    rc, _, err = _explain([new, other, "--concepts", concepts, "--out", tmp_path / "ex"],
                          capsys)
    assert rc == commands.EXIT_USAGE and "same file name" in err
    calls = fake_source.calls
    rc, _, err = _explain([tmp_path / "missing", "--concepts", concepts, "--out",
                           tmp_path / "ex"], capsys)
    assert rc == commands.EXIT_USAGE and "no such file or folder" in err
    assert fake_source.calls == calls


def test_explain_unreadable_file_is_a_per_image_error(tmp_path, fake_source, capsys):
    folder = make_class_folder(tmp_path / "data", "ant", 6)
    _discover([folder, "--out", tmp_path / "out", *FAST], capsys)
    new = make_class_folder(tmp_path, "new", 2)
    (new / "dangling.png").symlink_to(tmp_path / "gone.png")
    rc, out, err = _explain([new, "--concepts", tmp_path / "out" / "ant" / "concepts.h5",
                             "--out", tmp_path / "ex"], capsys)
    assert rc == commands.EXIT_PARTIAL, err
    record = json.loads((tmp_path / "ex" / "explanations.json").read_text())
    assert len(record["images"]) == 2
    assert [e["id"] for e in record["errors"]] == ["dangling.png"]


def test_client_decode_reaches_the_feature_client(tmp_path):
    from exporter.cli import build_parser

    args = build_parser().parse_args(["discover", str(tmp_path), "--out", str(tmp_path / "o"),
                                      "--feature-server", "127.0.0.1:1", "--client-decode",
                                      "--client-prepare"])
    assert args.client_decode and args.client_prepare
    for flag in (True, False):
        d = export.make_discoverer(export.ExportSettings(
            out=tmp_path, feature_servers=("127.0.0.1:1",), client_decode=flag,
            client_prepare=not flag))
        try:
            assert d.source.decode_locally is flag and d.source.prepare_locally is not flag
        finally:
            d.source.close()


def test_client_decode_reaches_explain(tmp_path, monkeypatch):
    seen = []

    class Source:
        def close(self):
            pass

    def fake_make_source(servers, timeout, client_decode=None, client_prepare=None):
        seen.append((tuple(servers), client_decode, client_prepare))
        return Source()

    monkeypatch.setattr(export, "make_source", fake_make_source)
    monkeypatch.setattr("concept_engine.discovery.explain", lambda *a, **k: iter(()))
    assert export.explain_items(object(), [], feature_servers=["127.0.0.1:1"],
                                client_decode=True, client_prepare=True) == []
    assert seen == [(("127.0.0.1:1",), True, True)]

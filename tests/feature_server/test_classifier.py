"""The EfficientNet-Lite0 classifier on real photos (class index = sorted WordNet ids)."""

from __future__ import annotations

import pytest

from feature_server.client import FeatureClient
from feature_server.extractor import ExtractOptions

CLASSIFY_ONLY = ExtractOptions(layers=(), top_k=5)


@pytest.mark.slow
def test_top1_on_imagenet_sample(extractor, registry, shared_data):
    wnids = list(registry["efficientnet_lite0"].class_wnids)
    assert wnids == sorted(wnids)  # the class index is the sorted wnid order
    files = sorted((shared_data / "imagenet_sample").glob("*.JPEG"))
    assert len(files) == 89
    results = list(extractor.extract([(p.name, p.read_bytes()) for p in files], CLASSIFY_ONLY))
    assert all(r.error is None for r in results)
    correct = sum(r.top_k[0][0] == wnids.index(r.id.split("_")[0]) for r in results)
    assert correct / len(files) >= 0.85, f"top-1 {correct}/{len(files)}"


@pytest.mark.slow
@pytest.mark.parametrize("folder,index", [("ant", 310), ("bee", 309)])
def test_ants_and_bees(extractor, shared_data, folder, index):
    files = sorted((shared_data / "imagenet_data" / folder).glob("*.jpg"))
    results = list(extractor.extract([(p.name, p.read_bytes()) for p in files], CLASSIFY_ONLY))
    top1 = [r.top_k[0][0] for r in results]
    assert len(top1) > 100
    assert sum(t == index for t in top1) / len(top1) >= 0.75


@pytest.mark.slow
def test_probabilities_over_the_wire_match_in_process(address, extractor, shared_data):
    files = sorted((shared_data / "imagenet_data" / "bee").glob("*.jpg"))[:3]
    items = [(p.name, p.read_bytes()) for p in files]
    options = ExtractOptions(return_probabilities=True, top_k=3)
    local = {r.id: r for r in extractor.extract(items, options)}
    with FeatureClient(address) as client:
        remote = {r.id: r for r in client.extract(items, options)}
        assert client.class_names()[309] == "bee"
    for item_id, r in remote.items():
        assert r.probabilities.shape == (1000,)
        assert abs(float(r.probabilities.sum()) - 1.0) < 1e-4
        assert r.top_k[0][:2] == local[item_id].top_k[0][:2]
        assert float(abs(r.probabilities - local[item_id].probabilities).max()) < 1e-5

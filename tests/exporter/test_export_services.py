"""Same concepts either way: in-process, through feature servers, and on the concept engine
service (feature server + engine on loopback, started here), with real models on real photos."""

from __future__ import annotations

import json
import os
from pathlib import Path

import h5py
import numpy as np
import pytest

from exporter import export
from exporter.export import ExportSettings, LocalDiscoverer
from exporter.remote import EngineDiscoverer

pytestmark = pytest.mark.slow

N_PHOTOS = 12
DISCOVERY = {"k": 3, "seed": 0}


def _options():
    from concept_engine.discovery import DiscoveryOptions

    return DiscoveryOptions(**DISCOVERY)


def _models_or_skip() -> None:
    from feature_server.models.registry import load_registry

    try:
        registry = load_registry()
    except Exception:  # noqa: BLE001 - any failure: no usable model cache
        registry = {}
    if not {"vgg19", "efficientnet_lite0"} <= set(registry):
        pytest.skip("models not built (run `dff models build`)")


@pytest.fixture(scope="module")
def ant_folder(shared_data, tmp_path_factory) -> Path:
    src = shared_data / "imagenet_data" / "ant"
    photos = sorted(p for p in src.iterdir() if p.suffix.lower() == ".jpg")[:N_PHOTOS]
    folder = tmp_path_factory.mktemp("data") / "ant"
    folder.mkdir()
    for p in photos:
        os.symlink(p, folder / p.name)
    return folder


@pytest.fixture(scope="module")
def services(tmp_path_factory):
    _models_or_skip()
    from concept_engine.service import EngineConfig
    from concept_engine.service import start_server as start_engine
    from feature_server.service import ServerConfig
    from feature_server.service import start_server as start_features

    features = start_features(ServerConfig(host="127.0.0.1", port=0))
    engine = start_engine(EngineConfig(
        host="127.0.0.1", port=0, store_dir=str(tmp_path_factory.mktemp("store")),
        feature_servers=(f"127.0.0.1:{features.port}",)))
    yield f"127.0.0.1:{features.port}", f"127.0.0.1:{engine.port}", engine
    engine.stop(0)
    features.stop(0)


def _run(folder: Path, out: Path, discoverer) -> Path:
    settings = ExportSettings(out=out, discovery=_options(), show_progress=False)
    try:
        report = export.export_class("ant", folder, settings, discoverer)
    finally:
        discoverer.close()
    assert report.status == "done", report.error
    return out / "ant"


def _arrays(class_dir: Path) -> dict[str, np.ndarray]:
    with h5py.File(class_dir / "concepts.h5") as f:
        return {name: np.asarray(f[name]) for name in
                ("bases", "images/ids", "images/certainties", "images/heatmaps")}


def test_in_process_feature_servers_and_engine_agree(ant_folder, services, tmp_path,
                                                     monkeypatch):
    feature_addr, engine_addr, engine_server = services
    explain_calls = []
    explain = EngineDiscoverer._explain

    def counting_explain(self, *args, **kwargs):
        explain_calls.append(args[0])
        return explain(self, *args, **kwargs)

    monkeypatch.setattr(EngineDiscoverer, "_explain", counting_explain)
    local = _run(ant_folder, tmp_path / "local", LocalDiscoverer.embedded())
    remote = _run(ant_folder, tmp_path / "features",
                  LocalDiscoverer.remote_features([feature_addr], 120))
    engine = _run(ant_folder, tmp_path / "engine", EngineDiscoverer(engine_addr, 300))
    a_local = _arrays(local)
    assert a_local["bases"].shape == (3, 512)
    s_local = json.loads((local / "summary.json").read_text())
    for other in (remote, engine):
        a_other = _arrays(other)
        np.testing.assert_array_equal(a_other["images/ids"], a_local["images/ids"])
        for name, a in a_local.items():
            if name == "images/ids":
                continue
            # the same fit on the same features (float32; features via gRPC or in-process)
            scale = float(np.abs(a).max())
            np.testing.assert_allclose(a_other[name], a, rtol=1e-4, atol=1e-5 * scale,
                                       err_msg=f"{other.name}: {name}")
        # the same images were used, and the folder has the same pictures
        s_other = json.loads((other / "summary.json").read_text())
        assert s_other["n_kept"] == s_local["n_kept"] and s_other["k"] == 3
        assert sorted(p.name for p in (other / "combined").iterdir()) == \
            sorted(p.name for p in (local / "combined").iterdir())
        assert (other / "index.html").is_file()
    # precision "auto" is resolved by the library against each feature source: the same
    # variant everywhere (an engine does not fall back to fp32 next to an int8 CLI)
    models = set()
    for d in (local, remote, engine):
        with h5py.File(d / "concepts.h5") as f:
            models.add(json.loads(f.attrs["provenance_json"])["model"])
    assert len(models) == 1, models
    # the engine sent its stored file, written unchanged; nothing was explained again
    s_engine = json.loads((engine / "summary.json").read_text())
    assert explain_calls == [] and "explain" not in s_engine["stage_seconds"]
    stored = engine_server.servicer.store.path(s_engine["concept_set_id"])
    assert (engine / "concepts.h5").read_bytes() == stored.read_bytes()


def test_folder_that_is_not_a_class_still_gets_concepts(shared_data, tmp_path, capsys):
    """gymnast is no ImageNet class: the prediction filter is skipped with a notice."""
    _models_or_skip()
    from exporter.cli import main

    rc = main(["discover", str(shared_data / "gymnast"), "--out", str(tmp_path), "--k", "3",
               "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "notice: prediction filter skipped: unknown class 'gymnast'" in out
    summary = json.loads((tmp_path / "gymnast" / "summary.json").read_text())
    assert summary["n_kept"] == 6 and summary["k"] == 3
    rc = main(["discover", str(shared_data / "gymnast"), "--out", str(tmp_path / "off"),
               "--k", "2", "--no-prediction-filter", "--no-certainty-filter", "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0 and "prediction filter skipped" not in out

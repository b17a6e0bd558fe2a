"""HDF5 concept sets: round trip, plain-h5py readability, schema version, atomic writes, store."""

from __future__ import annotations

import math
from pathlib import Path

import h5py
import numpy as np
import pytest
from dff_protos.errors import InvalidInput, NotFound

from concept_engine import store as st
from concept_engine.finegrain import Decision
from concept_engine.store import ConceptSet, ConceptSetStore, load_concept_set, save_concept_set


def make_set(name: str = "ant") -> ConceptSet:
    rng = np.random.default_rng(0)
    k = 3
    heat = [rng.random((k, 14, 14)).astype(np.float32), rng.random((k, 10, 14)).astype(np.float32)]
    square = np.array([[0, 0], [0, 9], [9, 9], [9, 0]], np.int32)
    polygons = [[[square], [], [square + 3, square + 20]], [[], [], []]]
    return ConceptSet(
        name=name, bases=rng.random((k, 8)).astype(np.float32), image_ids=["a.jpg", "b.jpg"],
        heatmaps=heat, certainties=rng.random((2, k)).astype(np.float32),
        original_sizes=np.array([[100, 120], [37, 301]]),
        input_sizes=np.array([[224, 224], [160, 224]]), polygons=polygons,
        decisions=[Decision("a.jpg", True, "prediction_filter", "p=0.99", 0.99, 0.99),
                   Decision("b.jpg", True, "certainty_filter", "ok", 0.3),
                   Decision("c.gif", False, "error", "GIF refused")],
        k_curves={"stability": {2: 0.9, 3: 0.8}, "certainty": {2: 0.5, 3: 0.4}},
        k_criterion="stability", k_reason="max stability", provenance={
            "model": "vgg19", "layer": "conv5_4", "weights_sha256": "ab" * 32, "seed": 0},
        notices=["certainty filter skipped"], stage_seconds={"fit": 1.5})


def test_round_trip(tmp_path):
    cs = make_set()
    cs.id = "ant-1"
    path = save_concept_set(tmp_path / "x.h5", cs)
    back = load_concept_set(path)
    np.testing.assert_array_equal(back.bases, cs.bases)
    assert back.image_ids == cs.image_ids
    for a, b in zip(back.heatmaps, cs.heatmaps, strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(back.certainties, cs.certainties)
    np.testing.assert_array_equal(back.original_sizes, cs.original_sizes)
    assert [[len(p) for p in img] for img in back.polygons] == [[1, 0, 2], [0, 0, 0]]
    np.testing.assert_array_equal(back.polygons[0][2][1], cs.polygons[0][2][1])
    assert back.polygons[0][0][0].dtype == np.int32
    assert back.decisions[0] == cs.decisions[0]
    b = back.decisions[1]
    assert (b.id, b.kept, b.stage, b.reason, b.score) == ("b.jpg", True, "certainty_filter",
                                                         "ok", 0.3)
    assert math.isnan(b.probability)
    assert back.decisions[2].id == "c.gif" and math.isnan(back.decisions[2].score)
    assert back.k_curves == cs.k_curves and back.k_reason == "max stability"
    assert back.provenance == cs.provenance and back.notices == cs.notices
    assert back.stage_seconds == {"fit": 1.5} and back.id == "ant-1" and back.k == 3
    assert back.created  # filled at save time


def test_plain_h5py_layout(tmp_path):
    path = save_concept_set(tmp_path / "x.h5", make_set())
    with h5py.File(path, "r") as f:
        assert f.attrs["schema_version"] == st.SCHEMA_VERSION
        for g in ("images", "regions", "decisions", "k_sweep"):
            assert f[g].attrs["schema_version"] == st.SCHEMA_VERSION
        assert f["bases"].shape == (3, 8)
        heat = f["images/heatmaps"]
        assert heat.shape == (2, 3, 14, 14) and heat.compression == "gzip"
        assert heat.chunks == (1, 3, 14, 14)
        assert f["images/heatmap_sizes"][()].tolist() == [[14, 14], [10, 14]]
        assert list(f["images/ids"].asstr()[()]) == ["a.jpg", "b.jpg"]
        offsets = f["regions/offsets"][()]
        assert offsets.tolist() == [0, 4, 8, 12]
        assert f["regions/owner"][()].tolist() == [[0, 0], [0, 2], [0, 2]]
        assert f["k_sweep/stability/k"][()].tolist() == [2, 3]
        assert f["decisions/kept"][()].tolist() == [True, True, False]


def test_newer_schema_is_refused(tmp_path):
    path = save_concept_set(tmp_path / "x.h5", make_set())
    with h5py.File(path, "a") as f:
        f.attrs["schema_version"] = 99
    with pytest.raises(InvalidInput, match="schema_version 99"):
        load_concept_set(path)


def test_atomic_write_leaves_no_file_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "x.h5"

    def boom(f, cs):
        f.create_dataset("partial", data=np.zeros(3))
        raise RuntimeError("disk full")

    monkeypatch.setattr(st, "_write", boom)
    with pytest.raises(RuntimeError):
        save_concept_set(target, make_set())
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_keeps_old_file_on_failure(tmp_path, monkeypatch):
    target = save_concept_set(tmp_path / "x.h5", make_set("old"))
    monkeypatch.setattr(st, "_write", lambda f, cs: (_ for _ in ()).throw(OSError("x")))
    with pytest.raises(OSError):
        save_concept_set(target, make_set("new"))
    assert load_concept_set(target).name == "old"


def test_store_list_get_delete(tmp_path):
    store = ConceptSetStore(tmp_path / "sets")
    cs_id = store.save(make_set("ant"))
    assert cs_id.startswith("ant-") and store.ids() == [cs_id]
    (info,) = store.list()
    assert (info.id, info.name, info.k, info.n_images, info.model, info.layer) == \
        (cs_id, "ant", 3, 2, "vgg19", "conv5_4")
    assert store.get(cs_id).image_ids == ["a.jpg", "b.jpg"]
    second = store.save(make_set("ant"))
    assert second != cs_id
    assert store.delete(cs_id) is True and store.delete(cs_id) is False
    with pytest.raises(NotFound):
        store.get(cs_id)


@pytest.mark.parametrize("bad", ["../x", "/etc/passwd", "a/b", "..", ".hidden", "", "a\\b",
                                 "x" * 200, "a..b"])
def test_store_refuses_unsafe_ids(tmp_path, bad):
    store = ConceptSetStore(tmp_path)
    with pytest.raises(InvalidInput):
        store.get(bad)
    with pytest.raises(InvalidInput):
        store.delete(bad)


def test_missing_file(tmp_path):
    with pytest.raises(NotFound):
        load_concept_set(tmp_path / "none.h5")


GOLDEN = Path(__file__).parent / "data" / "concept_set_v1.h5"


def test_golden_v1_file_still_reads():
    """A file written by schema version 1 (regenerate only when adding version 2: keep this
    one and add a new golden file)."""
    back = load_concept_set(GOLDEN)
    want = make_set()
    assert back.id == "ant-golden" and back.created == "2026-11-25T16:00:00+00:00"
    np.testing.assert_array_equal(back.bases, want.bases)
    np.testing.assert_array_equal(back.heatmaps[1], want.heatmaps[1])
    assert back.k_curves == want.k_curves and back.provenance == want.provenance
    assert [d.id for d in back.decisions] == ["a.jpg", "b.jpg", "c.gif"]
    assert back.schema_version == 1 and back.stability is None and back.hierarchy == {}
    assert back.concept_label(1) == "concept 1"


def _v2_set() -> ConceptSet:
    cs = make_set()
    cs.stability = np.array([0.9, 0.8, 0.5], np.float32)
    cs.stability_interval = np.array([[0.85, 0.95], [0.7, 0.9], [0.3, 0.6]], np.float32)
    cs.set_stability = 0.77
    cs.presence_threshold = np.array([0.1, 0.2, 0.3], np.float32)
    cs.reconstruction_errors = np.array([0.5, 0.6], np.float32)
    cs.ood_threshold = 0.6
    rng = np.random.default_rng(1)
    cs.hierarchy = {2: {"bases": rng.random((2, 8)), "parents": np.array([-1, -1]),
                        "cosines": np.ones(2), "top_image": np.array([0, 1])},
                    3: {"bases": rng.random((3, 8)), "parents": np.array([0, 1, 1]),
                        "cosines": np.array([0.9, 0.8, 0.7]), "top_image": np.array([0, 1, 1])}}
    return cs


def test_v2_round_trip_and_labels(tmp_path):
    path = save_concept_set(tmp_path / "x.h5", _v2_set())
    back = load_concept_set(path)
    assert back.schema_version == 2 and back.set_stability == pytest.approx(0.77)
    assert back.stability_interval[2].tolist() == pytest.approx([0.3, 0.6])
    assert back.hierarchy[3]["parents"].tolist() == [0, 1, 1]
    assert back.ood_threshold == pytest.approx(0.6)
    assert back.concept_names == []  # unnamed, as the set that was saved
    st.label_concepts(path, {0: "thorax", 2: "legs"})
    back = load_concept_set(path)
    assert back.concept_names == ["thorax", "", "legs"] and back.concept_label(1) == "concept 1"
    with pytest.raises(InvalidInput, match="outside"):
        st.label_concepts(path, {5: "x"})
    # a version-1 file is upgraded by labelling
    v1 = tmp_path / "v1.h5"
    v1.write_bytes(GOLDEN.read_bytes())
    st.label_concepts(v1, {1: "head"})
    assert load_concept_set(v1).concept_names[1] == "head"


def test_v2_named_dimensions_and_strings_in_xarray(tmp_path):
    xr = pytest.importorskip("xarray")
    pytest.importorskip("h5netcdf")
    path = save_concept_set(tmp_path / "x.h5", _v2_set())
    with xr.open_dataset(path, engine="h5netcdf", group="images") as ds:
        assert ds["heatmaps"].dims == ("image", "concept", "y", "x")
        assert ds["certainties"].dims == ("image", "concept")
        assert ds["original_sizes"].dims == ("image", "hw")
        assert [str(v) for v in ds["ids"].values] == ["a.jpg", "b.jpg"]
        assert isinstance(ds["ids"].values[0], str)
    with xr.open_dataset(path, engine="h5netcdf") as ds:
        assert ds["bases"].dims == ("concept", "channel")
    with xr.open_dataset(path, engine="h5netcdf", group="concepts") as ds:
        assert ds["stability_interval"].dims == ("concept", "bound")
    with xr.open_dataset(path, engine="h5netcdf", group="decisions") as ds:
        assert ds["reason"].dims == ("decision",) and ds["stage"].values[2] == "error"
    with xr.open_dataset(path, engine="h5netcdf", group="k_sweep/stability") as ds:
        assert ds["value"].dims == ("k",) and ds["k"].values.tolist() == [2, 3]
    with h5py.File(path, "r") as f:  # plain h5py: strings read back as str with .asstr()
        assert f["concepts/names"].asstr()[0] == ""
        assert f["decisions/reason"].asstr()[1] == "ok"

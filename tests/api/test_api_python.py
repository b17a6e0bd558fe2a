"""The notebook API (``import dff``): the same concept set as the library, RGB pictures that
display themselves, pandas/xarray views, save/load, explain, HTML, progress on/off, and the
feature-server / engine modes. Real models on the paper's six gymnast photos."""

from __future__ import annotations

import os
import subprocess
import sys

import cv2
import numpy as np
import pytest

import dff
from concept_engine.drawing import palette
from feature_server.extractor import precision_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gymnast(shared_data):
    return shared_data / "gymnast"


@pytest.fixture(scope="module")
def cs(gymnast):
    return dff.discover(gymnast, k="auto", prediction_filter=False, progress=False)


def test_discover_is_the_library_discovery(cs, gymnast):
    from concept_engine.discovery import DiscoveryOptions, discover
    from feature_server.extractor import Extractor
    from feature_server.images import read_items

    items = [(i, p.read_bytes()) for i, p in read_items(gymnast)]
    ref = discover(items, Extractor.from_cache(),
                   DiscoveryOptions(name="gymnast", prediction_filter="off"))
    assert cs.name == "gymnast" and cs.k == ref.k and 2 <= cs.k <= 6
    assert cs.image_ids == ref.image_ids
    np.testing.assert_array_equal(cs.bases, ref.bases)
    assert cs.provenance["data_dir"] == str(gymnast.resolve())
    assert "gymnast" in repr(cs) and f"k={cs.k}" in repr(cs)


def test_options_map_onto_discovery_options():
    o = dff.discovery_options("ant", 3, resize="keep_aspect", min_images=4,
                              prediction_filter=False, certainty_filter="on", solver="mu")
    assert (o.k, o.resize_mode, o.prediction_min_images) == (3, "keep_aspect", 4)
    assert (o.prediction_filter, o.certainty_filter, o.solver) == ("off", "on", "mu")
    o = dff.discovery_options("ant", "auto", k_range=(3, 5), model="m", layer="l")
    assert (o.k, o.k_min, o.k_max, o.model, o.layer) == (0, 3, 5, "m", "l")
    with pytest.raises(TypeError, match="unknown discovery option"):
        dff.discovery_options("ant", k_criterion_typo="x")
    with pytest.raises(ValueError):
        dff.discovery_options("ant", 3, k_range=(2, 4))
    with pytest.raises(ValueError):
        dff.discovery_options("ant", "many")


def test_show_is_rgb_and_displays_itself(cs):
    pic = cs.show(0)
    assert isinstance(pic, np.ndarray) and pic.dtype == np.uint8 and pic.ndim == 3
    h, w = cs.original_sizes[0]
    assert pic.shape[1] == w and pic.shape[0] > h  # the legend band is below the image
    # every concept's contour colour appears in RGB order (the library draws BGR)
    for j, bgr in enumerate(palette(cs.k)):
        if any(len(p) for p in cs.polygons[0][j]):
            rgb = np.array(bgr[::-1], np.uint8)
            assert (pic[:h] == rgb).all(axis=2).any(), j
    png = pic._repr_png_()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    back = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
    np.testing.assert_array_equal(back[:, :, ::-1], np.asarray(pic))
    one = cs.show(cs.image_ids[1], concept=0)
    assert one.shape == (*cs.original_sizes[1], 3)
    green = (np.asarray(one) == np.array([0, 255, 0], np.uint8)).all(axis=2)
    assert green.any() == any(len(p) for p in cs.polygons[1][0])


def test_grid_and_k_sweep(cs):
    grid = cs.grid(0)
    assert grid.ndim == 3 and grid.shape[2] == 3 and grid._repr_png_() is not None
    top2 = cs.grid(0, top=2)
    assert top2.shape[1] < grid.shape[1]
    with pytest.raises(IndexError):
        cs.grid(cs.k)
    fig = cs.plot_k_sweep()
    assert len(fig.axes) == len([c for c in cs.k_curves.values() if c]) >= 1
    assert any(line.get_xdata().size for ax in fig.axes for line in ax.get_lines())


def test_decisions_and_xarray(cs):
    df = cs.decisions()
    assert list(df.columns) == ["id", "stage", "kept", "reason", "score", "probability"]
    assert len(df) == len(cs.data.decisions) and all(isinstance(i, str) for i in df["id"])
    ds = cs.to_xarray()
    assert ds["heatmaps"].dims == ("image", "concept", "y", "x")
    assert list(ds["image"].values) == cs.image_ids
    np.testing.assert_array_equal(ds["heatmaps"].sel(image=cs.image_ids[2]).values,
                                  cs.heatmaps[2])
    np.testing.assert_array_equal(ds["certainties"].values, cs.certainties)
    # precision "auto": the source's default variant (vgg19_int8 on a CPU)
    assert ds.attrs["model"] == cs.data.provenance["model"] and ds.attrs["layer"] == "conv5_4"
    assert ds.attrs["model"] == precision_model("vgg19", cs.data.provenance["precision"])


def test_save_load_and_explain(cs, gymnast, tmp_path):
    path = cs.save(tmp_path / "g.h5")
    back = dff.load(path)
    assert back.image_ids == cs.image_ids
    np.testing.assert_array_equal(back.bases, cs.bases)
    np.testing.assert_array_equal(back.show(1), cs.show(1))  # images found via data_dir
    moved = dff.load(path, images=tmp_path)  # a folder without the photos
    with pytest.raises(FileNotFoundError, match="images=FOLDER"):
        moved.show(0)
    ex = cs.explain([gymnast / cs.image_ids[0], tmp_path / "g.h5"], progress=False)
    assert [x.id for x in ex] == [cs.image_ids[0], "g.h5"]
    assert ex[1].error is not None and "error" in repr(ex[1])
    # the fixed-basis solution of a training image is close to the fit's own
    np.testing.assert_allclose(ex[0].certainties, cs.certainties[0], rtol=0.02)
    assert ex[0].show().shape[2] == 3
    table = ex.certainties()
    assert list(table.index) == [cs.image_ids[0]] and table.shape == (1, cs.k)
    html = ex._repr_html_()
    assert html.count("data:image/png;base64,") == 1 and "g.h5" in html
    new = cs.show(gymnast / cs.image_ids[0])  # a path, not a training id: explained
    assert new.shape[2] == 3


def test_concept_set_html(cs):
    html = cs._repr_html_()
    assert html.count("data:image/png;base64,") == cs.k
    assert "gymnast" in html and f"concept {cs.k - 1}" in html


def test_progress_bars_and_silence(gymnast, capfd):
    dff.discover(gymnast, k=2, prediction_filter=False, certainty_filter=False,
                 progress=False)
    quiet = capfd.readouterr()
    assert quiet.err == "" and quiet.out == ""
    dff.discover(gymnast, k=2, prediction_filter=False, certainty_filter=False)
    loud = capfd.readouterr()
    assert "gymnast: features" in loud.err and "gymnast: fit" in loud.err


def test_feature_server_and_engine_modes(cs, gymnast, tmp_path_factory):
    from concept_engine.service import EngineConfig
    from concept_engine.service import start_server as start_engine
    from feature_server.service import ServerConfig
    from feature_server.service import start_server as start_features

    features = start_features(ServerConfig(host="127.0.0.1", port=0))
    engine = start_engine(EngineConfig(
        host="127.0.0.1", port=0, store_dir=str(tmp_path_factory.mktemp("store")),
        feature_servers=(f"127.0.0.1:{features.port}",)))
    try:
        fs = dff.discover(gymnast, k="auto", prediction_filter=False, progress=False,
                          feature_server=f"127.0.0.1:{features.port}")
        en = dff.discover(gymnast, k="auto", prediction_filter=False, progress=False,
                          engine=f"127.0.0.1:{engine.port}")
        for other in (fs, en):
            assert other.k == cs.k and other.image_ids == cs.image_ids
            np.testing.assert_allclose(other.bases, cs.bases, rtol=1e-4, atol=1e-6)
        assert en.show(0).shape == cs.show(0).shape
        ex = fs.explain(gymnast / cs.image_ids[0], progress=False)
        np.testing.assert_allclose(ex[0].certainties, cs.certainties[0], rtol=0.02)
        # in-memory images: pixels to the feature servers, lossless PNGs to the engine; a bad
        # array is that image's error on both
        arrays = [(i, cv2.imread(str(gymnast / i))) for i in cs.image_ids]
        arrays.append(("bad.png", np.zeros((8, 8), np.uint8)))
        for mode in ({"feature_server": f"127.0.0.1:{features.port}"},
                     {"engine": f"127.0.0.1:{engine.port}"}):
            got = dff.discover(arrays, k=cs.k, prediction_filter=False, progress=False,
                               **mode)
            assert got.image_ids == cs.image_ids, mode
            np.testing.assert_allclose(got.bases, cs.bases, rtol=1e-4, atol=1e-6)
            assert [d.id for d in got.data.decisions if d.stage == "error"] == ["bad.png"]
    finally:
        engine.stop(0)
        features.stop(0)
    with pytest.raises(ValueError, match="exclude"):
        dff.discover(gymnast, engine="a:1", feature_server="b:2")


def test_version_and_exports():
    assert isinstance(dff.__version__, str) and dff.__version__
    assert {"discover", "load", "ConceptSet", "Explanation", "Picture"} <= set(dff.__all__)
    code = ("import sys, dff; bad = {'pandas', 'xarray', 'tqdm', 'matplotlib'} & "
            "set(sys.modules); assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, env=os.environ.copy())

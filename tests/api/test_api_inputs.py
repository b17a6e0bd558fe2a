"""What the notebook API takes as images, and what it refuses by name: in-memory arrays and
PIL images (the same concepts as the files they were read from), bad arrays as per-image errors,
two inputs with one id, a folder of classes, a corrupt concept-set file, option values no data
could satisfy. Real models on the paper's six gymnast photos."""

from __future__ import annotations

import shutil

import cv2
import numpy as np
import pytest
from dff_protos.errors import DataLoss, InvalidInput

import dff

pytestmark = pytest.mark.slow

OPTS = {"k": 2, "prediction_filter": False, "progress": False, "bootstrap": 0}


@pytest.fixture(scope="module")
def gymnast(shared_data):
    return shared_data / "gymnast"


@pytest.fixture(scope="module")
def files(gymnast):
    return sorted(p for p in gymnast.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))


@pytest.fixture(scope="module")
def cs(gymnast):
    return dff.discover(gymnast, **OPTS)


def test_arrays_give_the_concepts_of_their_files(cs, files):
    arrays = [(p.name, cv2.imread(str(p))) for p in files]
    from_arrays = dff.discover(arrays, **OPTS)
    assert from_arrays.image_ids == cs.image_ids
    np.testing.assert_array_equal(from_arrays.bases, cs.bases)
    # pictures of array-made sets come from the arrays themselves
    assert from_arrays.show(0).shape == cs.show(0).shape
    np.testing.assert_array_equal(from_arrays.show(0), cs.show(0))
    # bare arrays get their position as id; explain takes them too
    bare = dff.discover([a for _, a in arrays], **OPTS)
    assert bare.image_ids == [str(i) for i in range(len(arrays))]
    ex = cs.explain([("x", arrays[0][1])], progress=False)[0]
    ref = cs.explain(files[0], progress=False)[0]
    assert ex.error is None and ex.id == "x"
    np.testing.assert_array_equal(ex.heatmaps, ref.heatmaps)
    assert ex.show(legend=False).shape[:2] == arrays[0][1].shape[:2]


def test_pil_images_are_rgb(cs, files):
    image = pytest.importorskip("PIL.Image")
    pil = [(p.name, image.open(p)) for p in files]
    np.testing.assert_array_equal(dff.discover(pil, **OPTS).bases, cs.bases)


def test_a_bad_array_is_that_images_error(files):
    good = [(p.name, cv2.imread(str(p))) for p in files]
    bad = [("float.png", good[0][1].astype(np.float32)), ("gray.png", good[1][1][:, :, 0])]
    out = dff.discover(good[2:] + bad, **OPTS)
    assert out.n_images == len(good) - 2
    errors = {d.id: d.reason for d in out.data.decisions if d.stage == "error"}
    assert set(errors) == {"float.png", "gray.png"}
    assert "uint8" in errors["float.png"] and "(height, width, 3)" in errors["gray.png"]
    with pytest.raises(InvalidInput, match=r"\[array\]"):
        dff.discover(good[0][1], **OPTS)  # one (H, W, 3) array is not a list of images
    with pytest.raises(TypeError, match="'x': expected bytes"):
        dff.discover([("x", 3.0)], **OPTS)


def test_two_inputs_with_one_id_are_refused(cs, files, tmp_path):
    """Two files of one name from two folders would otherwise share an id: the second's
    picture would be drawn with the first's regions."""
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(files[1], other / files[0].name)
    with pytest.raises(InvalidInput, match="have the same id") as err:
        cs.explain([files[0], other / files[0].name], progress=False)
    assert str(other / files[0].name) in str(err.value) and str(files[0]) in str(err.value)
    with pytest.raises(InvalidInput, match="same id 'a'"):
        dff.discover([("a", files[0].read_bytes()), ("a", files[1].read_bytes())], **OPTS)


def test_a_folder_of_classes_is_refused_not_merged(files, tmp_path):
    root = tmp_path / "classes"
    for name, part in (("ant", files[:3]), ("bee", files[3:])):
        (root / name).mkdir(parents=True)
        for p in part:
            shutil.copy(p, root / name / p.name)
    with pytest.raises(InvalidInput, match=r"folder of 2 class folder\(s\) \(ant, bee\)"):
        dff.discover(root, **OPTS)
    (root / "ant" / "nested").mkdir()
    shutil.copy(files[4], root / "ant" / "nested" / files[4].name)
    with pytest.raises(InvalidInput, match="sub-folders with images"):
        dff.discover(root / "ant", **OPTS)


def test_load_names_the_file_it_cannot_read(cs, tmp_path):
    text = tmp_path / "notes.h5"
    text.write_text("not hdf5")
    with pytest.raises(InvalidInput, match="notes.h5 is not an HDF5 file"):
        dff.load(text)
    good = cs.save(tmp_path / "good.h5")
    cut = tmp_path / "cut.h5"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(DataLoss, match="cut.h5: the concept set file is damaged"):
        dff.load(cut)
    assert dff.load(good).concept_names == cs.concept_names == []


@pytest.mark.parametrize("option, message", [
    ({"threshold": 5.0}, "threshold is a fraction"),
    ({"threshold": float("nan")}, "threshold is a fraction"),
    ({"size": 0}, "size must be in"),
    ({"wire_dtype": "int8"}, "wire_dtype 'int8'"),
    ({"seed": 1.5}, "seed must be an integer"),
    ({"layer": ""}, "layer must be named"),
    ({"layer": "conv9_9"}, "'conv9_9': vgg19.* has no such layer; choose one of .*conv5_4"),
])
def test_options_no_data_could_satisfy_fail_before_any_image(gymnast, option, message):
    with pytest.raises(InvalidInput, match=message):
        dff.discover(gymnast, **{**OPTS, **option})


def test_explain_threshold_is_checked(cs, files):
    with pytest.raises(InvalidInput, match="threshold is a fraction"):
        cs.explain(files[0], threshold=-1.0, progress=False)


def test_load_refuses_bases_no_fit_could_give_and_mixed_versions(cs, tmp_path):
    import h5py

    for name, edit in (("nan", lambda f: f["bases"].__setitem__((0, 0), np.nan)),
                       ("neg", lambda f: f["bases"].__setitem__((0, 0), -1.0)),
                       ("mixed", lambda f: f.attrs.__setitem__("schema_version", 1))):
        path = cs.save(tmp_path / f"{name}.h5")
        with h5py.File(path, "r+") as f:
            edit(f)
        with pytest.raises(DataLoss, match=f"{name}.h5"):
            dff.load(path)


def test_renamed_photos_give_the_same_concept_set(shared_data, tmp_path):
    """File names set the order a folder is read in; the k sweep and the reliability do not
    depend on it (the QA pass found k=2 vs k=3 for 40 ants under reversed names)."""
    from concept_engine.matching import match_bases

    photos = sorted((shared_data / "imagenet_data" / "ant").glob("*.jpg"))[:12]
    renamed = tmp_path / "ant"
    renamed.mkdir()
    for n, p in enumerate(photos):
        shutil.copy(p, renamed / f"{len(photos) - n:03d}.jpg")  # the reverse order
    opts = {"k": "auto", "prediction_filter": False, "progress": False, "bootstrap": 3}
    a = dff.discover(photos, **opts)
    b = dff.discover(renamed, **opts)
    assert a.k == b.k and a.k_curves["stability"] == b.k_curves["stability"]
    assert a.set_stability == b.set_stability
    np.testing.assert_allclose(a.stability, b.stability, atol=1e-4)
    assert np.min(match_bases(a.bases, b.bases)[1]) > 0.9999

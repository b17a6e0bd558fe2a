"""File names that are not UTF-8 (a Latin-1 camera folder on Linux): Python keeps their bytes
as lone surrogates, which HDF5, JSON and protobuf refuse and OpenCV's putText crashes on (a
segfault of `dff explain`). Ids escape those bytes; pictures draw what the font can."""

from __future__ import annotations

import json
import os
import shutil

import h5py
import pytest

from concept_engine.drawing import hershey_text
from exporter.cli import main
from feature_server.images import file_id, read_items

LATIN1 = os.fsdecode(b"caf\xe9.jpg")  # 'caf\udce9.jpg'


def test_ids_escape_undecodable_bytes(tmp_path):
    assert file_id(LATIN1) == "caf\\xe9.jpg" and file_id("café.jpg") == "café.jpg"
    (tmp_path / LATIN1).write_bytes(b"x")
    assert read_items(tmp_path) == [("caf\\xe9.jpg", tmp_path / LATIN1)]
    assert read_items([tmp_path / LATIN1])[0][0] == "caf\\xe9.jpg"
    assert hershey_text("caf\udce9 ß") == "caf? ?"


@pytest.mark.slow
def test_discover_and_explain_a_folder_with_such_a_name(shared_data, tmp_path):
    photos = sorted((shared_data / "gymnast").glob("*.jpg"))[:4]
    folder = tmp_path / "gym"
    folder.mkdir()
    for p in photos[:3]:
        shutil.copy(p, folder / p.name)
    shutil.copy(photos[3], folder / LATIN1)
    out = tmp_path / "out"
    assert main(["discover", str(folder), "--out", str(out), "--k", "2",
                 "--no-prediction-filter", "--no-progress"]) == 0
    with h5py.File(out / "gym" / "concepts.h5") as f:
        ids = f["images/ids"].asstr()[...].tolist()
    assert "caf\\xe9.jpg" in ids and len(ids) == 4
    explained = tmp_path / "explained"
    assert main(["explain", str(folder), "--concepts", str(out / "gym" / "concepts.h5"),
                 "--out", str(explained), "--no-progress"]) == 0
    record = json.loads((explained / "explanations.json").read_text())
    assert sorted(x["id"] for x in record["images"]) == sorted(ids)
    assert (explained / "combined" / "caf__xe9.jpg").is_file()

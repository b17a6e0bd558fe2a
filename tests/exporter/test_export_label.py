"""`dff label`: names stored in the concept set, used by the pictures."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "concept_engine"))
from test_store import GOLDEN, _v2_set  # noqa: E402

from concept_engine.store import load_concept_set, save_concept_set  # noqa: E402
from exporter.cli import main  # noqa: E402


def test_label_stores_names_and_lists_them(tmp_path, capsys):
    path = save_concept_set(tmp_path / "concepts.h5", _v2_set())
    assert main(["label", str(path), "0=thorax", "2=legs"]) == 0
    assert load_concept_set(path).concept_names == ["thorax", "", "legs"]
    assert "0\tthorax\n1\tconcept 1\n2\tlegs" in capsys.readouterr().out
    assert main(["label", str(path), "1=", "0=head"]) == 0
    assert load_concept_set(path).concept_names == ["head", "", "legs"]


@pytest.mark.parametrize("bad", ["thorax", "x=thorax", "9=far"])
def test_label_usage_errors(tmp_path, bad):
    path = tmp_path / "v1.h5"
    path.write_bytes(GOLDEN.read_bytes())
    assert main(["label", str(path), bad]) == 2
    assert load_concept_set(path).schema_version == 1  # untouched


def test_discover_then_label_redraw_and_explain_json(tmp_path, monkeypatch, capsys):
    import json

    from exporter_fakes import fake_module, make_class_folder

    from exporter import export

    src = fake_module().FakeSource()
    monkeypatch.setattr(export, "make_source", lambda *a, **k: src)
    folder = make_class_folder(tmp_path / "data", "ant", 10)
    out = tmp_path / "out"
    assert main(["discover", str(folder), "--out", str(out), "--k", "3", "--no-progress",
                 "--bootstrap", "4"]) == 0
    printed = capsys.readouterr().out
    assert "reliability: split-half" in printed and "concept stability" in printed
    h5 = out / "ant" / "concepts.h5"
    assert main(["label", str(h5), "0=red", "1=green", "--images", str(folder)]) == 0
    html = (out / "ant" / "index.html").read_text()
    assert "red" in html and "green" in html and "concept 2" in html
    assert list((out / "ant" / "dominant").glob("*.jpg"))
    new = tmp_path / "new"
    new.mkdir()
    for i, data in fake_module().make_items(2, prefix="new", start=50):
        (new / i).write_bytes(data)
    assert main(["explain", str(new), "--concepts", str(h5), "--out", str(tmp_path / "ex"),
                 "--no-progress"]) == 0
    record = json.loads((tmp_path / "ex" / "explanations.json").read_text())
    assert record["concept_names"] == ["red", "green", "concept 2"]
    for x in record["images"]:
        assert len(x["present"]) == len(x["relative_score"]) == 3
        assert isinstance(x["out_of_distribution"], bool) and x["reconstruction_error"] > 0
    assert sorted(p.name for p in (tmp_path / "ex" / "exemplars").iterdir()) == [
        "concept_00.jpg", "concept_01.jpg", "concept_02.jpg"]

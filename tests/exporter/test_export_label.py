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

"""mypy over dff_protos, feature_server, concept_engine and dff (config: pyproject.toml
[tool.mypy]; generated *_pb2* stubs excluded): zero errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_mypy_has_no_errors():
    pytest.importorskip("mypy")
    env = dict(os.environ, PYTHONPATH=f"{ROOT / 'protos'}{os.pathsep}{ROOT}")
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"),
         "protos/dff_protos", "feature_server", "concept_engine", "dff"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=540)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]

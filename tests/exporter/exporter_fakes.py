"""Shared helpers of the exporter tests: the concept engine's fake feature source (loaded by
path, the test folders are not packages) and a synthetic class folder."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

_FAKE = Path(__file__).resolve().parents[1] / "concept_engine" / "fake_source.py"


def fake_module():
    name = "dff_test_fake_source"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, _FAKE)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def make_class_folder(root: Path, name: str = "ant", n: int = 8,
                      size: tuple[int, int] = (96, 128)) -> Path:
    """root/name/ with n synthetic PNGs (blue background, red disc, green rectangle)."""
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    for i, data in fake_module().make_items(n, size=size):
        (folder / i).write_bytes(data)
    return folder

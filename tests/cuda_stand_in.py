"""Stand-in CUDA drivers for the tests of feature_server.cuda and feature_server.pinned: C++
sources compiled here with g++ (as the HALS kernel test does), loaded through DFF_LIBCUDA."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest


def compile_stand_in(source: str, tmp_path: Path, monkeypatch) -> ctypes.CDLL:
    """The stand-in driver compiled from ``source``, made the one feature_server.cuda loads."""
    compiler = shutil.which("g++")
    if compiler is None:
        pytest.skip("needs g++ (bash .ci/setup --test installs it)")
    src, lib = tmp_path / "cuda_stand_in.cpp", tmp_path / "libcuda_stand_in.so"
    src.write_text(source)
    subprocess.run([compiler, "-shared", "-fPIC", "-o", str(lib), str(src)], check=True)
    monkeypatch.setenv("DFF_LIBCUDA", str(lib))
    return ctypes.CDLL(str(lib))

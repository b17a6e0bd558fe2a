"""`dff discover` killed with SIGKILL mid-class, then rerun: complete, valid, same concepts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

pytestmark = pytest.mark.slow

N_PHOTOS = 24
ROOT = Path(__file__).resolve().parents[2]


def _models_or_skip() -> None:
    from feature_server.models.registry import load_registry

    try:
        registry = load_registry()
    except Exception:  # noqa: BLE001
        registry = {}
    if not {"vgg19", "efficientnet_lite0"} <= set(registry):
        pytest.skip("models not built (run `dff models build`)")


def _cmd(folder: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "exporter.cli", "discover", str(folder), "--out", str(out),
            "--k", "3", "--seed", "0"]


def _start(folder: Path, out: Path, log: Path) -> subprocess.Popen:
    with open(log, "w") as fh:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(_cmd(folder, out), cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=fh)


def _kill_when(proc: subprocess.Popen, ready, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"dff discover ended (rc={proc.returncode}) before the kill point")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("kill point not reached in time")
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(30) == -signal.SIGKILL


def _check_not_published(out: Path) -> None:
    final = out / "ant"
    assert not final.exists(), "a killed class must not appear under its final name"
    assert not list(out.glob("**/concepts.h5.tmp*"))


def test_sigkill_then_rerun_completes(shared_data, tmp_path):
    _models_or_skip()
    src = shared_data / "imagenet_data" / "ant"
    folder = tmp_path / "data" / "ant"
    folder.mkdir(parents=True)
    for p in sorted(p for p in src.iterdir() if p.suffix.lower() == ".jpg")[:N_PHOTOS]:
        os.symlink(p, folder / p.name)
    out = tmp_path / "out"
    log = tmp_path / "run.log"

    # 1. killed while extracting features (nothing written yet)
    proc = _start(folder, out, log)
    _kill_when(proc, lambda: "features:" in log.read_text())
    _check_not_published(out)

    # 2. killed while writing the class (concept set saved, pictures half done)
    partial = out / ".ant.partial"
    proc = _start(folder, out, log)
    _kill_when(proc, lambda: (partial / "concepts.h5").exists())
    _check_not_published(out)
    assert partial.exists()

    # 3. rerun: completes the class, cleans up
    res = subprocess.run(_cmd(folder, out), cwd=ROOT, capture_output=True, text=True,
                         timeout=600, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "[done] ant" in res.stdout
    final = out / "ant"
    assert not partial.exists()
    summary = json.loads((final / "summary.json").read_text())
    assert summary["status"] == "done" and summary["k"] == 3
    n = summary["n_kept"]
    assert len(list((final / "combined").glob("*.jpg"))) == n
    for j in range(3):
        assert len(list((final / "overlays" / f"concept_{j:02d}").glob("*.jpg"))) == n
    from concept_engine.store import load_concept_set

    cs = load_concept_set(final / "concepts.h5")
    assert cs.k == 3 and cs.n_images == n

    # 4. a fourth run skips the finished class; a clean run elsewhere gives the same concepts
    res = subprocess.run(_cmd(folder, out), cwd=ROOT, capture_output=True, text=True,
                         timeout=600, check=False)
    assert res.returncode == 0 and "skipped" in res.stdout
    clean = tmp_path / "clean"
    res = subprocess.run(_cmd(folder, clean), cwd=ROOT, capture_output=True, text=True,
                         timeout=600, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    with h5py.File(final / "concepts.h5") as a, h5py.File(clean / "ant" / "concepts.h5") as b:
        np.testing.assert_array_equal(np.asarray(a["bases"]), np.asarray(b["bases"]))

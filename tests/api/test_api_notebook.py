"""examples/demo.ipynb is stored without outputs, and runs headless (nbclient, a kernel of this
very Python, the working tree on its path) without error, producing figures."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK = ROOT / "examples" / "demo.ipynb"


def test_notebook_is_stored_without_outputs():
    nb = json.loads(NOTEBOOK.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert code, "no code cells"
    dirty = [i for i, c in enumerate(code) if c.get("outputs") or c.get("execution_count")]
    assert not dirty, f"code cells {dirty} carry outputs: clear them before committing " \
                      "(jupyter nbconvert --clear-output --inplace examples/demo.ipynb)"


@pytest.mark.slow
def test_notebook_runs_and_draws(tmp_path, shared_data, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    # A kernelspec in a temp dir that starts THIS interpreter with the working tree first on
    # the path: works from a fresh clone (no `jupyter kernelspec install` needed).
    spec_dir = tmp_path / "jupyter" / "kernels" / "dff-test"
    spec_dir.mkdir(parents=True)
    path = os.pathsep.join([str(ROOT / "protos"), str(ROOT),
                            os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "dff test", "language": "python",
        "env": {"PYTHONPATH": path, "DFF_TEST_DATA": str(shared_data),
                "MPLBACKEND": "module://matplotlib_inline.backend_inline"}}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("JUPYTER_DATA_DIR", str(tmp_path / "jupyter"))

    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, kernel_name="dff-test", timeout=600, startup_timeout=300,
                                     resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    client.execute()  # raises CellExecutionError on the first failing cell

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    pngs = [o for o in outputs if "image/png" in o.get("data", {})]
    html = [o["data"]["text/html"] for o in outputs if "text/html" in o.get("data", {})]
    # the k sweeps, show, grid, the heatmap facets and the k comparison at least
    assert len(pngs) >= 6, [list(o.get("data", {})) for o in outputs]
    # the concept sets and the explanations render pictures in their HTML
    assert sum("data:image/png;base64," in h for h in html) >= 3
    text = "".join(o.get("text", "") for o in outputs)
    assert "same bases: True" in text

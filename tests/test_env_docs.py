"""README's table of environment variables names every one the code reads, and no other."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ["feature_server", "concept_engine", "exporter", "dff", "protos/dff_protos"]
#: names the code builds from a prefix (dff_protos.security: f"{prefix}TLS_CA", ...)
PREFIXED = {"DFF_CLIENT_": ("TLS_CA", "TLS_CERT", "TLS_KEY"),
            "DFF_FEATURE_": ("TLS_CA", "TLS_CERT", "TLS_KEY")}
#: read by the code, not ours to document as settings of this project
OTHERS = {"NUMBA_CACHE_DIR", "JOB_COMPLETION_INDEX", "JOB_COMPLETIONS"}


def _read_by_the_code() -> set[str]:
    names: set[str] = set()
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            names |= set(re.findall(r"\bDFF_[A-Z0-9_]+", path.read_text()))
    for prefix, suffixes in PREFIXED.items():
        assert prefix in names, prefix  # still built this way
        names.discard(prefix)
        names |= {prefix + s for s in suffixes}
    return names


def _documented() -> set[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Environment variables\n", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|")[1] for line in section.splitlines() if line.startswith("| `")]
    return {name for row in rows for name in re.findall(r"`([A-Z][A-Z0-9_]+)`", row)}


def test_every_variable_the_code_reads_is_in_the_table():
    missing = _read_by_the_code() - _documented()
    assert not missing, f"not in README's table of environment variables: {sorted(missing)}"


def test_the_table_names_only_what_the_code_reads():
    extra = _documented() - _read_by_the_code() - OTHERS
    assert not extra, f"README's table names variables the code does not read: {sorted(extra)}"

"""OUT/index.html: one page over every finished class of an export.

Any run (or any shard of a sharded run) rebuilds it from what is in OUT - the finished class
folders (``OUT/<class>/summary.json`` + ``concepts.h5``) - so whichever shard finishes last
leaves a page that lists every class. The page depends only on those files (no timestamps), so
N shards leave the same page as one unsharded run. It is written atomically (a temporary file
renamed over the old one) under a file lock (``OUT/.index.html.lock``), so two shards rebuilding
at once never leave a half-written or stale page. Class files cannot take these names: a class
folder named ``index.html`` is refused (:func:`exporter.export.check_class_names`), and class
locks are ``OUT/.<class>.lock``, so ``.index.html.lock`` is only ever the site index's.
"""

from __future__ import annotations

import contextlib
import html
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

log = logging.getLogger(__name__)

INDEX_FILE = "index.html"
_LOCK = f".{INDEX_FILE}.lock"  # not ".index.lock": that is the lock of a class named index


@dataclass(frozen=True)
class ClassEntry:
    """One finished class as the page shows it."""

    name: str
    k: int
    n_images: int
    n_kept: int
    n_errors: int
    stability: float | None
    thumbnail: str  # relative path, "" when none


def _stability(summary: dict[str, Any]) -> float | None:
    """The chosen k's stability when summary.json records one (top-level ``stability``, a
    number or a dict with ``value``/``mean``)."""
    value = summary.get("stability")
    if isinstance(value, dict):
        value = value.get("value", value.get("mean"))
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None


def finished_classes(out: Path) -> list[ClassEntry]:
    """Every finished class folder in ``out`` (sorted by name); unfinished, hidden and broken
    ones are left out."""
    from exporter.export import CONCEPTS_FILE, DONE_MARKER, THUMBNAIL_FILE, read_summary

    entries: list[ClassEntry] = []
    if not out.is_dir():
        return entries
    for d in sorted(out.iterdir()):
        if d.name.startswith(".") or not d.is_dir():
            continue
        if not ((d / DONE_MARKER).is_file() and (d / CONCEPTS_FILE).is_file()):
            continue
        summary, why = read_summary(d)
        if summary is None:
            log.warning("skipping %s in the index: %s cannot be used (%s)", d, DONE_MARKER, why)
            continue
        thumb = f"{d.name}/{THUMBNAIL_FILE}" if (d / THUMBNAIL_FILE).is_file() else ""
        entries.append(ClassEntry(
            name=d.name, k=int(summary.get("k", 0) or 0),
            n_images=int(summary.get("n_images", 0) or 0),
            n_kept=int(summary.get("n_kept", 0) or 0),
            n_errors=int(summary.get("n_errors", 0) or 0),
            stability=_stability(summary), thumbnail=thumb))
    return entries


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:1.5em;
color:#222;max-width:1400px}
table{border-collapse:collapse} td,th{border:1px solid #ddd;padding:4px 10px;text-align:left;
vertical-align:middle} th{background:#f4f4f4} td.n{text-align:right}
img{max-height:120px;border:1px solid #ccc} .muted{color:#777}
"""


def render(entries: list[ClassEntry]) -> str:
    """The page's HTML (deterministic for the same entries)."""
    esc = html.escape
    rows = []
    for e in entries:
        href = quote(f"{e.name}/index.html")
        thumb = (f'<a href="{href}"><img src="{quote(e.thumbnail)}" alt="{esc(e.name)}" '
                 'loading="lazy"></a>' if e.thumbnail else '<span class="muted">-</span>')
        stab = "" if e.stability is None else f"{e.stability:.3f}"
        rows.append(f'<tr><td>{thumb}</td><td><a href="{href}">{esc(e.name)}</a></td>'
                    f'<td class="n">{e.k}</td><td class="n">{e.n_kept}</td>'
                    f'<td class="n">{e.n_images}</td><td class="n">{e.n_errors}</td>'
                    f'<td class="n">{stab}</td></tr>')
    return "\n".join([
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>DFF concepts: {len(entries)} classes</title><style>{_CSS}</style></head>",
        "<body>", f"<h1>Concepts of {len(entries)} class(es)</h1>",
        '<p class="muted">Every finished class in this folder; rebuilt by each '
        "<code>dff discover</code> run (or shard). k: number of concepts; kept: images used "
        "for the concepts, of all images found; errors: images that could not be read or "
        "decoded; stability: split-half stability of the chosen k, when recorded.</p>",
        "<table><tr><th></th><th>class</th><th>k</th><th>kept</th><th>images</th>"
        "<th>errors</th><th>stability</th></tr>", *rows, "</table>", "</body></html>", ""])


def write_site_index(out: Path) -> Path | None:
    """(Re)build OUT/index.html from the finished classes in OUT, atomically, under a lock.
    Returns the path, or None when OUT does not exist."""
    from filelock import FileLock

    out = Path(out)
    if not out.is_dir():
        return None
    path = out / INDEX_FILE
    with FileLock(str(out / _LOCK), thread_local=False):
        text = render(finished_classes(out))
        fd, tmp = tempfile.mkstemp(dir=out, prefix=".index-", suffix=".html.tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(text)
                fh.flush()
                os.fsync(fh.fileno())
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    return path


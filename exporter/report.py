"""Pictures and the static HTML report of one concept set.

Everything here turns arrays that the concept engine computed (heatmaps at feature resolution,
certainties, k curves, filter decisions) into files: per-concept contour overlays, a combined
overlay per image, per-concept grids (all images, top images by certainty), the k-sweep plot and
an index.html that links all of it with relative paths (it works from file://).
"""

from __future__ import annotations

import html
import json
import logging
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

log = logging.getLogger(__name__)

TILE = 176  # grid thumbnail size (px)
CAPTION = 22  # caption band under each thumbnail (px)


def concept_colors(k: int) -> list[tuple[int, int, int]]:
    """BGR colour of each of k concepts: the engine's palette (concept 0 is the seed's green),
    so the exporter's pictures and the engine's Explain overlays agree."""
    from concept_engine.drawing import palette

    return palette(k)


def color_hex(bgr: tuple[int, int, int]) -> str:
    b, g, r = bgr
    return f"#{r:02x}{g:02x}{b:02x}"


@dataclass
class ImageResult:
    """One image of a concept set: the decoded original and what the engine found in it.

    polygons[j]: contours (n, 2) int32 x, y in original pixels of concept j; certainties (k,).
    """

    id: str
    image: np.ndarray  # (H, W, 3) uint8 BGR, the decoded original
    polygons: list[list[np.ndarray]]
    certainties: np.ndarray


@dataclass
class ReportData:
    """What index.html shows besides the pictures."""

    name: str
    k: int
    k_reason: str = ""
    curves: dict[str, dict[int, float]] = field(default_factory=dict)
    decisions: list[dict] = field(default_factory=list)  # id, kept, stage, reason, score
    summary: dict = field(default_factory=dict)
    notices: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------- image helpers

def safe_name(image_id: str) -> str:
    """A flat file name for an image id (ids may hold sub-folders)."""
    stem = image_id.replace("\\", "/").replace("/", "__")
    keep = "".join(c if c.isalnum() or c in "._-" else "_" for c in stem)
    return keep or "image"


def decode_image(data: bytes) -> np.ndarray:
    """Encoded bytes -> (H, W, 3) uint8 BGR, decoded exactly as the feature server does (EXIF
    orientation, grayscale/CMYK/16-bit/alpha handled), so contours land where they belong."""
    from feature_server.images import ALL_FORMATS, DecodeLimits
    from feature_server.images import decode_image as decode_float

    img = decode_float(data, DecodeLimits(formats=ALL_FORMATS))
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def write_image(path: Path, image: np.ndarray, quality: int = 90) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    params = [cv2.IMWRITE_JPEG_QUALITY, quality] if path.suffix.lower() in (".jpg", ".jpeg") \
        else []
    ok, buf = cv2.imencode(path.suffix, image, params)
    if not ok:
        raise OSError(f"could not encode {path}")
    path.write_bytes(buf.tobytes())


# ---------------------------------------------------------------------------- drawing

def concept_overlay(image: np.ndarray, polygons: Sequence[np.ndarray]) -> np.ndarray:
    """One concept's regions contoured like the seed: green, width 2."""
    from concept_engine.drawing import SEED_COLOR, draw_contours

    return draw_contours(image, [list(polygons)], [SEED_COLOR], thickness=2)


def combined_overlay(image: np.ndarray, polygons: Sequence[Sequence[np.ndarray]],
                     certainties: Sequence[float]) -> np.ndarray:
    """Every concept's contours in its own colour, with a legend band (concept, certainty)."""
    from concept_engine.drawing import overlay

    return overlay(image, polygons, [float(c) for c in certainties], legend=True)


# ---------------------------------------------------------------------------- grids

def _thumb(image: np.ndarray, caption: str, size: int = TILE) -> np.ndarray:
    h, w = image.shape[:2]
    s = size / max(h, w)
    small = cv2.resize(image, (max(1, int(round(w * s))), max(1, int(round(h * s)))),
                       interpolation=cv2.INTER_AREA)
    tile = np.full((size + CAPTION, size, 3), 255, dtype=np.uint8)
    y0, x0 = (size - small.shape[0]) // 2, (size - small.shape[1]) // 2
    tile[y0:y0 + small.shape[0], x0:x0 + small.shape[1]] = small
    cv2.putText(tile, caption[:28], (3, size + CAPTION - 7), cv2.FONT_HERSHEY_SIMPLEX, 0.38,
                (0, 0, 0), 1, cv2.LINE_AA)
    return tile


def make_grid(tiles: Sequence[tuple[np.ndarray, str]], columns: int = 8,
              title: str = "") -> np.ndarray:
    """Thumbnails (image, caption) in rows of `columns`, with an optional title band."""
    if not tiles:
        tiles = [(np.full((TILE, TILE, 3), 235, dtype=np.uint8), "(no images)")]
    thumbs = [_thumb(img, cap) for img, cap in tiles]
    cols = max(1, min(columns, len(thumbs)))
    rows = (len(thumbs) + cols - 1) // cols
    th, tw = thumbs[0].shape[:2]
    pad = 4
    grid = np.full((rows * (th + pad) + pad, cols * (tw + pad) + pad, 3), 255, dtype=np.uint8)
    for i, t in enumerate(thumbs):
        r, c = divmod(i, cols)
        y, x = pad + r * (th + pad), pad + c * (tw + pad)
        grid[y:y + th, x:x + tw] = t
    if title:
        band = np.full((30, grid.shape[1], 3), 255, dtype=np.uint8)
        cv2.putText(band, title, (6, 21), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (0, 0, 0), 1,
                    cv2.LINE_AA)
        grid = np.vstack([band, grid])
    return grid


# ---------------------------------------------------------------------------- k curves

_CURVE_TITLES = {
    "stability": "stability (split-half, higher = more reproducible)",
    "certainty": "mean certainty (the seed's criterion)",
    "elbow": "reconstruction error (elbow)",
}


def plot_k_curves(curves: dict[str, dict[int, float]], chosen_k: int, path: Path,
                  reason: str = "") -> None:
    """The k sweep (see :func:`k_curves_figure`) written to ``path``."""
    fig = k_curves_figure(curves, chosen_k, reason)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


def k_curves_figure(curves: dict[str, dict[int, float]], chosen_k: int, reason: str = ""):
    """The k sweep as a matplotlib Figure (no pyplot state): one panel per criterion, the
    chosen k marked."""
    from matplotlib.figure import Figure

    names = [n for n, c in curves.items() if c] or ["(no k sweep)"]
    fig = Figure(figsize=(4.2 * len(names), 3.4), dpi=100)
    for i, name in enumerate(names):
        ax = fig.add_subplot(1, len(names), i + 1)
        curve = curves.get(name, {})
        ks = sorted(int(k) for k in curve)
        vals = [float(curve[k] if k in curve else curve[str(k)]) for k in ks]
        if ks:
            ax.plot(ks, vals, marker="o", color="#1f77b4")
            if chosen_k in ks:
                ax.plot([chosen_k], [vals[ks.index(chosen_k)]], marker="o", markersize=11,
                        markerfacecolor="none", markeredgecolor="#d62728", markeredgewidth=2)
            ax.axvline(chosen_k, color="#d62728", linestyle="--", linewidth=1)
            ax.set_xticks(ks)
        else:
            ax.text(0.5, 0.5, f"k fixed at {chosen_k}", ha="center", va="center",
                    transform=ax.transAxes)
        ax.set_xlabel("k (number of concepts)")
        ax.set_title(_CURVE_TITLES.get(name, name), fontsize=9)
        ax.grid(alpha=0.3)
    if reason:
        fig.suptitle(f"chosen k = {chosen_k}: {reason}"[:120], fontsize=9)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------- the whole class

@dataclass
class Rendered:
    """Relative paths (to the class folder) of everything render_concept_images wrote."""

    overlays: list[dict[str, str]] = field(default_factory=list)  # [concept] id -> path
    combined: dict[str, str] = field(default_factory=dict)  # id -> path
    grid_all: list[str] = field(default_factory=list)
    grid_top: list[str] = field(default_factory=list)
    top_ids: list[list[str]] = field(default_factory=list)
    k_plot: str = ""


def render_images(results: Iterable[ImageResult], k: int, out_dir: Path, *, top_n: int = 8,
                  total: int = 0,
                  progress: Callable[[int, int], None] | None = None,
                  stems: Mapping[str, str] | None = None) -> Rendered:
    """Overlays per concept and image, a combined overlay per image, and the two grids per
    concept, under out_dir/{overlays,combined,grids}/. Returns the relative paths.
    ``stems``: the file name (no extension) of each image id (exporter.export.output_stems,
    collision-free); default: the id made safe."""
    rendered = Rendered(overlays=[{} for _ in range(k)])
    # the grids need every overlay again: keep small copies only
    grid_tiles: list[list[tuple[np.ndarray, str, float]]] = [[] for _ in range(k)]
    for n, res in enumerate(results):
        h, w = res.image.shape[:2]
        conts = res.polygons
        stem = stems[res.id] if stems is not None else os.path.splitext(safe_name(res.id))[0]
        for j in range(k):
            ov = concept_overlay(res.image, conts[j])
            rel = f"overlays/concept_{j:02d}/{stem}.jpg"
            write_image(out_dir / rel, ov)
            rendered.overlays[j][res.id] = rel
            s = TILE / max(h, w)
            small = cv2.resize(ov, (max(1, int(w * s)), max(1, int(h * s))),
                               interpolation=cv2.INTER_AREA)
            grid_tiles[j].append((small, res.id, float(res.certainties[j])))
        rel = f"combined/{stem}.jpg"
        write_image(out_dir / rel, combined_overlay(res.image, conts, res.certainties))
        rendered.combined[res.id] = rel
        if progress:
            progress(n + 1, total)
    for j in range(k):
        tiles = grid_tiles[j]
        all_grid = make_grid([(t, f"{c:.3g} {i}") for t, i, c in tiles],
                             title=f"concept {j}: all {len(tiles)} images")
        rel_all = f"grids/concept_{j:02d}_all.jpg"
        write_image(out_dir / rel_all, all_grid)
        top = sorted(tiles, key=lambda t: -t[2])[:top_n]
        top_grid = make_grid([(t, f"{c:.3g} {i}") for t, i, c in top], columns=min(8, top_n),
                             title=f"concept {j}: top {len(top)} by certainty")
        rel_top = f"grids/concept_{j:02d}_top.jpg"
        write_image(out_dir / rel_top, top_grid)
        rendered.grid_all.append(rel_all)
        rendered.grid_top.append(rel_top)
        rendered.top_ids.append([i for _, i, _ in top])
    return rendered


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:1.5em;
color:#222;max-width:1400px}
h1{margin-bottom:.2em} h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;font-size:.9em} td,th{border:1px solid #ddd;padding:3px 8px;
text-align:left} th{background:#f4f4f4}
.swatch{display:inline-block;width:.9em;height:.9em;border-radius:2px;vertical-align:middle;
margin-right:.3em}
.gallery{display:flex;flex-wrap:wrap;gap:6px} .gallery a img{height:150px;border:1px solid #ccc}
img.full{max-width:100%;border:1px solid #ccc} .muted{color:#777} .dropped{color:#a33}
details summary{cursor:pointer;margin:.4em 0}
"""


def _esc(x: object) -> str:
    return html.escape(str(x), quote=True)


def _href(rel: str) -> str:
    """A relative URL for a relative file path (quote what a browser would misread)."""
    from urllib.parse import quote

    return quote(rel.replace(os.sep, "/"))


def write_index(out_dir: Path, data: ReportData, rendered: Rendered, *,
                concepts_file: str = "concepts.h5") -> Path:
    """out_dir/index.html: summary, k plot, per-concept grids and overlays, decisions."""
    s = data.summary
    parts: list[str] = [
        "<!DOCTYPE html>", "<html lang=\"en\"><head><meta charset=\"utf-8\">",
        f"<title>DFF concepts: {_esc(data.name)}</title><style>{_CSS}</style></head><body>",
        f"<h1>Concepts of <q>{_esc(data.name)}</q></h1>",
        f"<p><b>k = {data.k}</b> <span class=\"muted\">({_esc(data.k_reason)})</span></p>",
    ]
    if concepts_file:
        parts.append(f"<p>Concept set: <a href=\"{_href(concepts_file)}\">{_esc(concepts_file)}"
                     "</a> (HDF5: bases, heatmaps, certainties, k sweep, decisions, "
                     "provenance)</p>")
    if s:
        parts.append("<h2>Summary</h2><table>")
        for key, val in s.items():
            if isinstance(val, dict | list):
                val = json.dumps(val, sort_keys=True)
            parts.append(f"<tr><th>{_esc(key)}</th><td>{_esc(val)}</td></tr>")
        parts.append("</table>")
    if data.notices:
        parts.append("<h2>Notices</h2><ul>" +
                     "".join(f"<li>{_esc(n)}</li>" for n in data.notices) + "</ul>")
    if rendered.k_plot:
        parts.append("<h2>Choosing k</h2>"
                     f"<img class=\"full\" src=\"{_href(rendered.k_plot)}\" alt=\"k sweep\">")
    hexes = [color_hex(c) for c in concept_colors(data.k)]
    parts.append("<h2>Concepts</h2><p>")
    parts.append(" ".join(f"<span class=\"swatch\" style=\"background:{hexes[j]}\">"
                          f"</span>concept {j}" for j in range(data.k)))
    parts.append("</p>")
    for j in range(data.k):
        parts.append(f"<h3 id=\"concept-{j}\"><span class=\"swatch\" style=\"background:"
                     f"{hexes[j]}\"></span>Concept {j}</h3>")
        if j < len(rendered.grid_top):
            parts.append(f"<p>Top images by certainty</p><img class=\"full\" "
                         f"src=\"{_href(rendered.grid_top[j])}\" alt=\"concept {j} top\">")
            parts.append(f"<details><summary>All images (grid)</summary><img class=\"full\" "
                         f"loading=\"lazy\" src=\"{_href(rendered.grid_all[j])}\" "
                         f"alt=\"concept {j} all\"></details>")
        if j < len(rendered.overlays) and rendered.overlays[j]:
            links = "".join(f"<a href=\"{_href(p)}\" title=\"{_esc(i)}\">{_esc(i)}</a><br>"
                            for i, p in rendered.overlays[j].items())
            parts.append(f"<details><summary>Overlay of every image "
                         f"({len(rendered.overlays[j])})</summary>{links}</details>")
    if rendered.combined:
        parts.append("<h2>All concepts per image</h2><div class=\"gallery\">")
        for i, p in rendered.combined.items():
            parts.append(f"<a href=\"{_href(p)}\"><img src=\"{_href(p)}\" alt=\"{_esc(i)}\" "
                         f"title=\"{_esc(i)}\"></a>")
        parts.append("</div>")
    if data.decisions:
        parts.append("<h2>Images kept and dropped</h2><table><tr><th>image</th><th>kept</th>"
                     "<th>stage</th><th>reason</th><th>score</th></tr>")
        for d in data.decisions:
            cls = "" if d.get("kept") else " class=\"dropped\""
            score = d.get("score")
            score_s = "" if score is None or score != score else f"{float(score):.4g}"
            parts.append(f"<tr{cls}><td>{_esc(d.get('id', ''))}</td>"
                         f"<td>{'yes' if d.get('kept') else 'no'}</td>"
                         f"<td>{_esc(d.get('stage', ''))}</td><td>{_esc(d.get('reason', ''))}"
                         f"</td><td>{score_s}</td></tr>")
        parts.append("</table>")
    parts.append("</body></html>")
    path = out_dir / "index.html"
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


def write_report(out_dir: Path, results: Iterable[ImageResult], data: ReportData, *,
                 top_n: int = 8, total: int = 0, concepts_file: str = "concepts.h5",
                 progress: Callable[[int, int], None] | None = None,
                 stems: Mapping[str, str] | None = None) -> Rendered:
    """All pictures, the k plot and index.html of one concept set, under out_dir.
    results may be a generator (images are decoded one at a time)."""
    rendered = render_images(results, data.k, out_dir, top_n=top_n, total=total,
                             progress=progress, stems=stems)
    if data.curves:
        plot_k_curves(data.curves, data.k, out_dir / "k_sweep.png", data.k_reason)
        rendered.k_plot = "k_sweep.png"
    write_index(out_dir, data, rendered, concepts_file=concepts_file)
    return rendered

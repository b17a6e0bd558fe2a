"""Pictures and the static HTML report of one concept set.

Everything here turns arrays that the concept engine computed (heatmaps at feature resolution,
certainties, k curves, filter decisions) into files: per-concept contour overlays, a combined
overlay per image, per-concept grids (all images, top images by certainty), the k-sweep plot and
an index.html that links all of it with relative paths (it works from file://).
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import json
import logging
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np

log = logging.getLogger(__name__)

TILE = 176  # grid thumbnail size (px)
#: Thumbnails per page of a concept's "all images" grid (50 rows of 8: ~9000 px tall). A large
#: class gets several pages, written as they fill, so memory stays bounded and no page exceeds
#: what JPEG can encode (65500 px: one grid of a 5000-image class would).
ALL_GRID_PAGE = 400
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
    # (H, W, 3) uint8 BGR, the decoded original; or its encoded bytes, which the render thread
    # that draws the image decodes (so that decoding runs on every render thread, not serially
    # where the results are produced)
    image: np.ndarray | bytes
    polygons: list[list[np.ndarray]]
    certainties: np.ndarray
    heatmaps: np.ndarray | None = None  # (k, h, w) raw maps: dominant view and crops
    present: np.ndarray | None = None  # (k,) bool (explain: judged against training)
    relative_score: np.ndarray | None = None  # (k,) training percentile (explain)
    reconstruction_error: float = float("nan")
    out_of_distribution: bool = False


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
    names: list[str] = field(default_factory=list)  # (k,) "" = unnamed (dff label)
    stability: list[float] = field(default_factory=list)  # (k,) bootstrap stability
    stability_interval: list[tuple[float, float]] = field(default_factory=list)
    set_stability: float = float("nan")
    warning: str = ""  # the low-reliability warning, shown at the top
    scales: list[float] = field(default_factory=list)  # (k,) dominant-view reference strength
    hierarchy: dict[int, dict] = field(default_factory=dict)  # k -> parents, cosines, top_image
    training_ids: list[str] = field(default_factory=list)  # index -> id (hierarchy thumbnails)
    exemplars: list[str] = field(default_factory=list)  # (k,) training exemplar pictures
    explain: bool = False  # a report of new images explained with a stored set

    def label(self, j: int) -> str:
        return self.names[j] if j < len(self.names) and self.names[j] else f"concept {j}"

    @classmethod
    def from_concept_set(cls, cs: Any, **kw: Any) -> ReportData:
        """Reliability, names, scales and hierarchy of a concept set (schema 1 or 2)."""
        from concept_engine.reliability import reliability_warning

        stab = [] if cs.stability is None else [float(v) for v in cs.stability]
        interval = ([] if cs.stability_interval is None
                    else [(float(a), float(b)) for a, b in cs.stability_interval])
        mean = float(np.mean(stab)) if stab else float("nan")
        scales = [float(max((float(np.max(m[j])) for m in cs.heatmaps), default=0.0))
                  for j in range(cs.k)]
        kw.setdefault("name", cs.name)
        kw.setdefault("k", cs.k)
        kw.setdefault("k_reason", cs.k_reason)
        return cls(names=list(cs.concept_names), stability=stab, stability_interval=interval,
                   set_stability=float(cs.set_stability),
                   warning=reliability_warning(float(cs.set_stability), mean), scales=scales,
                   hierarchy={int(k): {key: np.asarray(v).tolist() for key, v in node.items()
                                       if key != "bases"}
                              for k, node in cs.hierarchy.items()},
                   training_ids=list(cs.image_ids), **kw)


# ---------------------------------------------------------------------------- image helpers

def safe_name(image_id: str) -> str:
    """A flat file name for an image id (ids may hold sub-folders)."""
    stem = image_id.replace("\\", "/").replace("/", "__")
    keep = "".join(c if c.isalnum() or c in "._-" else "_" for c in stem)
    return keep or "image"


def decode_image(data: bytes) -> np.ndarray:
    """Encoded bytes -> (H, W, 3) uint8 BGR, decoded exactly as the feature server does (EXIF
    orientation, grayscale/CMYK/16-bit/alpha handled), so contours land where they belong."""
    from feature_server.images import ALL_FORMATS, DecodeLimits, decode_pixels
    from feature_server.images import decode_image as decode_float

    limits = DecodeLimits(formats=ALL_FORMATS)
    pixels = decode_pixels(data, limits)  # 8-bit colour: the decoder's own pixels, as they are
    if pixels is not None:
        return pixels
    img = decode_float(data, limits)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


#: Folders write_image has made (a mkdir per picture cost a stat and a mkdir call each).
_MADE_DIRS: set[str] = set()


def write_image(path: Path, image: np.ndarray, quality: int = 90) -> None:
    params = [cv2.IMWRITE_JPEG_QUALITY, quality] if path.suffix.lower() in (".jpg", ".jpeg") \
        else []
    ok, buf = cv2.imencode(path.suffix, image, params)
    if not ok:
        raise OSError(f"could not encode {path}")
    folder = os.fspath(path.parent)
    if folder not in _MADE_DIRS:
        path.parent.mkdir(parents=True, exist_ok=True)
        _MADE_DIRS.add(folder)
    try:
        path.write_bytes(buf)
    except FileNotFoundError:  # the folder went away since (a new run into a removed OUT)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(buf)


# ---------------------------------------------------------------------------- drawing

def concept_overlay(image: np.ndarray, polygons: Sequence[np.ndarray],
                    color: tuple[int, int, int] | None = None) -> np.ndarray:
    """One concept's regions contoured, width 2, in the concept's colour (default: the seed's
    green, which is also concept 0's palette colour)."""
    from concept_engine.drawing import SEED_COLOR, draw_contours

    return draw_contours(image, [list(polygons)], [color or SEED_COLOR], thickness=2)


def combined_overlay(image: np.ndarray, polygons: Sequence[Sequence[np.ndarray]],
                     certainties: Sequence[float], names: Sequence[str] | None = None,
                     present: Sequence[bool] | None = None) -> np.ndarray:
    """Every concept's contours in its own colour, with a legend band (name, certainty; absent
    concepts marked)."""
    from concept_engine.drawing import overlay

    return overlay(image, polygons, [float(c) for c in certainties], legend=True, names=names,
                   present=present)


# ---------------------------------------------------------------------------- grids

def _text(text: str) -> str:
    from concept_engine.drawing import hershey_text

    return hershey_text(text)


def _thumb(image: np.ndarray, caption: str, size: int = TILE) -> np.ndarray:
    h, w = image.shape[:2]
    s = size / max(h, w)
    small = cv2.resize(image, (max(1, int(round(w * s))), max(1, int(round(h * s)))),
                       interpolation=cv2.INTER_AREA)
    tile = np.full((size + CAPTION, size, 3), 255, dtype=np.uint8)
    y0, x0 = (size - small.shape[0]) // 2, (size - small.shape[1]) // 2
    tile[y0:y0 + small.shape[0], x0:x0 + small.shape[1]] = small
    cv2.putText(tile, _text(caption[:28]), (3, size + CAPTION - 7), cv2.FONT_HERSHEY_SIMPLEX, 0.38,
                (0, 0, 0), 1, cv2.LINE_AA)
    return tile


def make_grid(tiles: Sequence[tuple[np.ndarray, str]], columns: int = 8,
              title: str = "", color: tuple[int, int, int] | None = None) -> np.ndarray:
    """Thumbnails (image, caption) in rows of `columns`, with an optional title band (with a
    swatch and a border in ``color``: the concept's own colour)."""
    return _compose_grid([_thumb(img, cap) for img, cap in tiles], columns, title, color)


def _compose_grid(thumbs: Sequence[np.ndarray], columns: int = 8, title: str = "",
                  color: tuple[int, int, int] | None = None) -> np.ndarray:
    """:func:`make_grid` from finished thumbnails (:func:`_thumb`'s tiles)."""
    if not thumbs:
        thumbs = [_thumb(np.full((TILE, TILE, 3), 235, dtype=np.uint8), "(no images)")]
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
        x = 6
        if color is not None:
            cv2.rectangle(band, (6, 6), (24, 24), color, -1)
            x = 30
        cv2.putText(band, _text(title), (x, 21), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (0, 0, 0), 1,
                    cv2.LINE_AA)
        grid = np.vstack([band, grid])
    if color is not None:
        grid = cv2.copyMakeBorder(grid, 3, 3, 3, 3, cv2.BORDER_CONSTANT, value=color)
    return grid


# ---------------------------------------------------------------------------- k curves

_CURVE_TITLES = {
    "stability": "stability (split-half, higher = more reproducible)",
    "certainty": "mean certainty (the seed's criterion)",
    "elbow": "reconstruction error (elbow)",
    "instability": "staNMF instability (lower = restarts agree)",
    "bcv": "bi-cross-validation error (lower = predicts held-out blocks)",
}


def plot_k_curves(curves: dict[str, dict[int, float]], chosen_k: int, path: Path,
                  reason: str = "") -> None:
    """The k sweep (:func:`draw_k_curves`) written to ``path`` (PNG)."""
    write_image(path, draw_k_curves(curves, chosen_k, reason))


def _nice_ticks(lo: float, hi: float, n: int = 4) -> list[float]:
    if not hi > lo:
        return [lo]
    raw = (hi - lo) / n
    mag = 10.0 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def draw_k_curves(curves: dict[str, dict[int, float]], chosen_k: int, reason: str = ""
                  ) -> np.ndarray:
    """The k sweep as a BGR picture drawn with OpenCV (the exporter's k_sweep.png: no
    matplotlib import, ~1 ms): one panel per criterion, the chosen k marked in red (dashed line
    and ring). The notebook's figure is :func:`k_curves_figure`."""
    names = [n for n, c in curves.items() if c] or ["(no k sweep)"]
    pw, ph = 420, 330  # panel size (px)
    left, right, top, bottom = 58, 16, 44, 46
    head = 28 if reason else 0
    img = np.full((ph + head, pw * len(names), 3), 255, np.uint8)
    font, blue, red, grey = cv2.FONT_HERSHEY_SIMPLEX, (180, 119, 31), (40, 39, 214), (90, 90, 90)
    if reason:
        cv2.putText(img, _text(f"chosen k = {chosen_k}: {reason}"[:110]), (8, 19), font, 0.45,
                    (0, 0, 0), 1, cv2.LINE_AA)
    for p, name in enumerate(names):
        x0, y0 = p * pw, head
        ax_l, ax_r, ax_t, ax_b = x0 + left, x0 + pw - right, y0 + top, y0 + ph - bottom
        title = _CURVE_TITLES.get(name, name)
        cv2.putText(img, _text(title[:52]), (x0 + 8, y0 + 20), font, 0.42, (0, 0, 0), 1,
                    cv2.LINE_AA)
        cv2.rectangle(img, (ax_l, ax_t), (ax_r, ax_b), grey, 1)
        curve = curves.get(name, {})
        ks = sorted(int(k) for k in curve)
        vals = [float(curve[k] if k in curve else curve[str(k)]) for k in ks]  # type: ignore[index]
        if not ks:
            cv2.putText(img, f"k fixed at {chosen_k}", (ax_l + 90, (ax_t + ax_b) // 2), font,
                        0.5, (0, 0, 0), 1, cv2.LINE_AA)
            continue
        lo, hi = min(vals), max(vals)
        pad = (hi - lo) * 0.08 or abs(hi) * 0.05 or 1.0
        lo, hi = lo - pad, hi + pad
        kmin, kmax = ks[0] - 0.5, ks[-1] + 0.5

        def px(k: float, v: float, kmin: float = kmin, kmax: float = kmax, lo: float = lo,
               hi: float = hi, ax_l: int = ax_l, ax_r: int = ax_r, ax_t: int = ax_t,
               ax_b: int = ax_b) -> tuple[int, int]:
            return (int(round(ax_l + (k - kmin) / (kmax - kmin) * (ax_r - ax_l))),
                    int(round(ax_b - (v - lo) / (hi - lo) * (ax_b - ax_t))))

        for t in _nice_ticks(lo, hi):
            _, yt = px(kmin, t)
            cv2.line(img, (ax_l, yt), (ax_r, yt), (232, 232, 232), 1)
            cv2.putText(img, f"{t:.6g}", (x0 + 4, yt + 4), font, 0.35, grey, 1, cv2.LINE_AA)
        for k in ks:
            xk, _ = px(k, lo)
            cv2.line(img, (xk, ax_b), (xk, ax_b + 4), grey, 1)
            cv2.putText(img, str(k), (xk - 4, ax_b + 18), font, 0.42, (0, 0, 0), 1, cv2.LINE_AA)
        cv2.putText(img, "k (number of concepts)", (ax_l + 90, ax_b + 38), font, 0.42,
                    (0, 0, 0), 1, cv2.LINE_AA)
        if ks[0] <= chosen_k <= ks[-1]:
            xc, _ = px(chosen_k, lo)
            for y in range(ax_t, ax_b, 10):  # dashed
                cv2.line(img, (xc, y), (xc, min(y + 5, ax_b)), red, 1)
        pts = [px(k, v) for k, v in zip(ks, vals, strict=True)]
        cv2.polylines(img, [np.array(pts, np.int32)], False, blue, 2, cv2.LINE_AA)
        for q in pts:
            cv2.circle(img, q, 4, blue, -1, cv2.LINE_AA)
        if chosen_k in ks:
            cv2.circle(img, pts[ks.index(chosen_k)], 9, red, 2, cv2.LINE_AA)
    return img


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
    """Relative paths (to the class folder) of everything render_images wrote."""

    overlays: list[dict[str, str]] = field(default_factory=list)  # [concept] id -> path
    combined: dict[str, str] = field(default_factory=dict)  # id -> path
    dominant: dict[str, str] = field(default_factory=dict)  # id -> path
    grid_all: list[str] = field(default_factory=list)  # per concept: page 1 of "all images"
    grid_all_pages: list[list[str]] = field(default_factory=list)  # per concept: every page
    grid_top: list[str] = field(default_factory=list)
    crops: list[str] = field(default_factory=list)  # per concept: crops of its strongest regions
    top_ids: list[list[str]] = field(default_factory=list)
    thumbs: dict[int, str] = field(default_factory=dict)  # training image index -> thumbnail
    k_plot: str = ""


CROP = 128  # side of a crop tile (px)
#: Threads that draw and encode the pictures of the images (``DFF_RENDER_THREADS``; default one
#: per core). Output files do not depend on it.
RENDER_THREADS = int(os.environ.get("DFF_RENDER_THREADS", "0")) or (os.cpu_count() or 1)


@dataclass
class _Drawn:
    """What drawing one image produced: paths written and the small tiles the grids need."""

    id: str
    overlays: list[str] = field(default_factory=list)  # per concept
    tiles: list[tuple[np.ndarray, str, float] | None] = field(default_factory=list)
    crops: list[tuple[np.ndarray, str, float] | None] = field(default_factory=list)
    combined: str = ""
    dominant: str = ""
    thumb: str = ""


def strongest_crop(image: np.ndarray, heatmap: np.ndarray, frac: float = 0.45) -> np.ndarray:
    """The square of side ``frac`` * min(H, W) centred on the maximum of ``heatmap`` (h, w) -
    upsampled to the image - clamped inside the image."""
    height, width = image.shape[:2]
    hm_h, hm_w = heatmap.shape
    y, x = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
    cy, cx = (y + 0.5) * height / hm_h, (x + 0.5) * width / hm_w
    side = max(8, int(frac * min(height, width)))
    y0 = int(np.clip(cy - side / 2, 0, height - side))
    x0 = int(np.clip(cx - side / 2, 0, width - side))
    return image[y0:y0 + side, x0:x0 + side]


def _small(image: np.ndarray, size: int = TILE) -> np.ndarray:
    h, w = image.shape[:2]
    s = size / max(h, w)
    return cv2.resize(image, (max(1, int(w * s)), max(1, int(h * s))),
                      interpolation=cv2.INTER_AREA)


def render_images(results: Iterable[ImageResult], k: int, out_dir: Path, *, top_n: int = 8,
                  total: int = 0, data: ReportData | None = None,
                  progress: Callable[[int, int], None] | None = None,
                  stems: Mapping[str, str] | None = None) -> Rendered:
    """Per concept and image an overlay (the concept's own colour), per image a combined overlay
    (all concepts, legend with names) and the dominant-concept view (when heatmaps are given),
    per concept the grids (all images, top images) and the crops around its strongest regions,
    under out_dir/{overlays,combined,dominant,grids}/. Returns the relative paths.
    ``stems``: the file name (no extension) of each image id (exporter.export.output_stems,
    collision-free); default: the id made safe."""
    from concept_engine.drawing import dominant_view

    data = data or ReportData(name="", k=k)
    colors = concept_colors(k)
    names = [data.label(j) for j in range(k)]
    scales = data.scales if len(data.scales) == k else None
    wanted = {int(i) for node in data.hierarchy.values() for i in node.get("top_image", [])}
    rendered = Rendered(overlays=[{} for _ in range(k)],
                        grid_all_pages=[[] for _ in range(k)])
    # the grids need the overlays again: small copies of one page of them (the "all images"
    # grid is written a page at a time) and of the top_n by certainty
    grid_tiles: list[list[tuple[np.ndarray, str, float]]] = [[] for _ in range(k)]
    top_tiles: list[list[tuple[np.ndarray, str, float]]] = [[] for _ in range(k)]
    crop_tiles: list[list[tuple[np.ndarray, str, float]]] = [[] for _ in range(k)]
    shown = [0] * k  # tiles of concept j already written to full pages

    # grids are composed and written on the render threads too (their thumbnails, captions
    # included, come finished from draw); the file names are chosen here, in image order
    grid_jobs: list[concurrent.futures.Future[None]] = []
    pool: concurrent.futures.ThreadPoolExecutor | None = None

    def write_grid(rel: str, thumbs: list[np.ndarray], columns: int, title: str,
                   color: tuple[int, int, int]) -> None:
        def job() -> None:
            write_image(out_dir / rel, _compose_grid(thumbs, columns, title, color))

        if pool is None:
            job()
        else:
            grid_jobs.append(pool.submit(job))

    def write_page(j: int, last: bool) -> None:
        tiles = grid_tiles[j]
        pages = rendered.grid_all_pages[j]
        first, count = shown[j] + 1, shown[j] + len(tiles)
        if last and not pages:
            title = f"{names[j]}: all {len(tiles)} images"
        else:
            title = f"{names[j]}: images {first}-{count} (page {len(pages) + 1})"
        rel = (f"grids/concept_{j:02d}_all.jpg" if not pages
               else f"grids/concept_{j:02d}_all_{len(pages) + 1:03d}.jpg")
        write_grid(rel, [t for t, _, _ in tiles], 8, title, colors[j])
        pages.append(rel)
        shown[j] = count
        grid_tiles[j] = []

    def draw(n: int, res: ImageResult) -> _Drawn:
        """Everything of one image: its pictures written, the small tiles returned (runs on the
        render threads; OpenCV drawing, resizing and encoding release the GIL)."""
        conts = res.polygons
        image = res.image if isinstance(res.image, np.ndarray) else decode_image(res.image)
        stem = stems[res.id] if stems is not None else os.path.splitext(safe_name(res.id))[0]
        present = res.present
        out = _Drawn(res.id)
        for j in range(k):
            ov = concept_overlay(image, conts[j], colors[j])
            rel = f"overlays/concept_{j:02d}/{stem}.jpg"
            write_image(out_dir / rel, ov)
            out.overlays.append(rel)
            score = float(res.certainties[j])
            shown = present is None or bool(present[j])
            out.tiles.append((_thumb(_small(ov), f"{score:.3g} {res.id}"), res.id, score)
                             if shown else None)
            out.crops.append((_thumb(_small(strongest_crop(image, np.asarray(res.heatmaps[j])),
                                            CROP), res.id), res.id, score)
                             if res.heatmaps is not None and shown else None)
        rel = f"combined/{stem}.jpg"
        write_image(out_dir / rel, _flag_ood(combined_overlay(
            image, conts, res.certainties, names=names, present=present), res))
        out.combined = rel
        if res.heatmaps is not None:
            ref = scales or [float(np.max(res.heatmaps[j])) for j in range(k)]
            dom = dominant_view(image, res.heatmaps, ref, colors, present)
            from concept_engine.drawing import draw_legend

            rel = f"dominant/{stem}.jpg"
            write_image(out_dir / rel, _flag_ood(draw_legend(dom, names, colors), res))
            out.dominant = rel
        if n in wanted:
            rel = f"thumbs/{n:04d}.jpg"
            write_image(out_dir / rel, _small(image, 96))
            out.thumb = rel
        return out

    def collect(n: int, d: _Drawn) -> None:
        """In image order (the grids and the top lists do not depend on thread timing)."""
        for j in range(k):
            rendered.overlays[j][d.id] = d.overlays[j]
            tile = d.tiles[j]
            if tile is not None:
                grid_tiles[j].append(tile)
                top_tiles[j] = sorted([*top_tiles[j], tile], key=lambda t: -t[2])[:top_n]
                if len(grid_tiles[j]) >= ALL_GRID_PAGE:
                    write_page(j, last=False)
            if d.crops[j] is not None:
                crop_tiles[j] = sorted([*crop_tiles[j], d.crops[j]],
                                       key=lambda t: -t[2])[:top_n]
        rendered.combined[d.id] = d.combined
        if d.dominant:
            rendered.dominant[d.id] = d.dominant
        if d.thumb:
            rendered.thumbs[n] = d.thumb
        if progress:
            progress(n + 1, total)

    workers = RENDER_THREADS
    with contextlib.ExitStack() as stack:
        if workers > 1:
            pool = stack.enter_context(concurrent.futures.ThreadPoolExecutor(
                workers, thread_name_prefix="dff-render"))
        if pool is None:
            for n, res in enumerate(results):
                collect(n, draw(n, res))
        else:
            # at most 2 images per thread in flight: decoded images are large
            pending: collections.deque[tuple[int, concurrent.futures.Future[_Drawn]]] = (
                collections.deque())
            for n, res in enumerate(results):
                pending.append((n, pool.submit(draw, n, res)))
                if len(pending) >= 2 * workers:
                    i, fut = pending.popleft()
                    collect(i, fut.result())
            while pending:
                i, fut = pending.popleft()
                collect(i, fut.result())
        for j in range(k):
            if grid_tiles[j] or not rendered.grid_all_pages[j]:
                write_page(j, last=True)
            rel_all = rendered.grid_all_pages[j][0]
            top = top_tiles[j]
            rel_top = f"grids/concept_{j:02d}_top.jpg"
            write_grid(rel_top, [t for t, _, _ in top], min(8, top_n),
                       f"{names[j]}: top {len(top)} by certainty", colors[j])
            rendered.grid_all.append(rel_all)
            rendered.grid_top.append(rel_top)
            rendered.top_ids.append([i for _, i, _ in top])
            if crop_tiles[j]:
                rel = f"grids/concept_{j:02d}_crops.jpg"
                write_grid(rel, [t for t, _, _ in crop_tiles[j]], min(8, top_n),
                           f"{names[j]}: strongest regions", colors[j])
                rendered.crops.append(rel)
            else:
                rendered.crops.append("")
        for job in grid_jobs:  # every grid written (and any error raised) before returning
            job.result()
    return rendered


def _flag_ood(picture: np.ndarray, res: ImageResult) -> np.ndarray:
    """A red band 'OUT OF DISTRIBUTION' above the picture of an image the concepts do not
    describe (explain), so the picture cannot be mistaken for a confident explanation."""
    if not res.out_of_distribution:
        return picture
    width = picture.shape[1]
    text_h = max(12, width // 22)
    scale = cv2.getFontScaleFromHeight(cv2.FONT_HERSHEY_SIMPLEX, text_h, 2)
    band = np.full((int(text_h * 1.9), width, 3), (40, 40, 200), np.uint8)
    cv2.putText(band, "OUT OF DISTRIBUTION", (6, int(text_h * 1.45)), cv2.FONT_HERSHEY_SIMPLEX,
                scale, (255, 255, 255), max(1, text_h // 8), cv2.LINE_AA)
    return np.concatenate([band, picture], axis=0)


def _hierarchy_tree(data: ReportData, rendered: Rendered) -> list[dict]:
    """Nested nodes {k, j, cosine, thumb, label, children} from the k -> k+1 parents."""
    levels = sorted(data.hierarchy)
    if not levels:
        return []
    nodes: dict[tuple[int, int], dict] = {}
    for k in levels:
        node = data.hierarchy[k]
        for j in range(k):
            top = int(node["top_image"][j])
            label = data.label(j) if k == data.k else f"k={k} #{j}"
            nodes[(k, j)] = {"k": k, "j": j, "cosine": float(node["cosines"][j]),
                             "thumb": rendered.thumbs.get(top, ""),
                             "image": (data.training_ids[top] if top < len(data.training_ids)
                                       else ""), "label": label, "children": [],
                             "chosen": k == data.k}
    roots = []
    for k in levels:
        for j in range(k):
            parent = int(data.hierarchy[k]["parents"][j])
            prev = levels[levels.index(k) - 1] if levels.index(k) else None
            if prev is None or parent < 0:
                roots.append(nodes[(k, j)])
            else:
                nodes[(prev, parent)]["children"].append(nodes[(k, j)])
    return roots


def _href(rel: str) -> str:
    """A relative URL for a relative file path (quote what a browser would misread)."""
    from urllib.parse import quote

    return quote(rel.replace(os.sep, "/"))


def _template():
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.PackageLoader("exporter", "templates"),
        autoescape=jinja2.select_autoescape(["html", "j2"], default=True),
        trim_blocks=True, lstrip_blocks=True, undefined=jinja2.StrictUndefined)
    env.filters["href"] = _href
    env.filters["num"] = lambda v, fmt=".3g": ("" if v is None or v != v
                                               else format(float(v), fmt))
    env.filters["tojson_plain"] = lambda v: (json.dumps(v, sort_keys=True)
                                             if isinstance(v, dict | list) else v)
    return env.get_template("index.html.j2")


def write_index(out_dir: Path, data: ReportData, rendered: Rendered, *,
                concepts_file: str = "concepts.h5",
                explained: Sequence[ImageResult] = ()) -> Path:
    """out_dir/index.html from the package's jinja2 template (exporter/templates/)."""
    from concept_engine.reliability import WARN_BELOW

    colors = [color_hex(c) for c in concept_colors(data.k)]
    concepts = []
    for j in range(data.k):
        stab = data.stability[j] if j < len(data.stability) else None
        lo, hi = (data.stability_interval[j] if j < len(data.stability_interval)
                  else (None, None))
        concepts.append({
            "j": j, "label": data.label(j), "color": colors[j], "stability": stab,
            "low": lo, "high": hi, "unstable": stab is not None and stab == stab
            and stab < WARN_BELOW,
            "grid_top": rendered.grid_top[j] if j < len(rendered.grid_top) else "",
            "grid_all": rendered.grid_all[j] if j < len(rendered.grid_all) else "",
            "grid_pages": (rendered.grid_all_pages[j][1:]
                           if j < len(rendered.grid_all_pages) else []),
            "crops": rendered.crops[j] if j < len(rendered.crops) else "",
            "overlays": rendered.overlays[j] if j < len(rendered.overlays) else {},
            "exemplar": data.exemplars[j] if j < len(data.exemplars) else ""})
    rows = []
    for res in explained:
        rows.append({
            "id": res.id, "combined": rendered.combined.get(res.id, ""),
            "dominant": rendered.dominant.get(res.id, ""), "ood": res.out_of_distribution,
            "error": res.reconstruction_error,
            "concepts": [{"label": data.label(j), "color": colors[j],
                          "exemplar": data.exemplars[j] if j < len(data.exemplars) else "",
                          "present": bool(res.present[j]) if res.present is not None else True,
                          "certainty": float(res.certainties[j]),
                          "relative": (float(res.relative_score[j])
                                       if res.relative_score is not None else None)}
                         for j in range(data.k)]})
    html_text = _template().render(
        data=data, concepts=concepts, rendered=rendered, concepts_file=concepts_file,
        tree=_hierarchy_tree(data, rendered), explained=rows, warn_below=WARN_BELOW,
        summary={k: (json.dumps(v, sort_keys=True) if isinstance(v, dict | list) else v)
                 for k, v in data.summary.items()})
    path = out_dir / "index.html"
    path.write_text(html_text, encoding="utf-8")
    return path


def write_report(out_dir: Path, results: Iterable[ImageResult], data: ReportData, *,
                 top_n: int = 8, total: int = 0, concepts_file: str = "concepts.h5",
                 progress: Callable[[int, int], None] | None = None,
                 concept_set: Any = None, stems: Mapping[str, str] | None = None) -> Rendered:
    """All pictures, the k plot and index.html of one concept set, under out_dir.
    results may be a generator (images are decoded one at a time). The concept set
    (``concept_set``, else ``out_dir/concepts_file`` when it exists) supplies what the pictures
    need beyond ``data``: names, reliability, heatmaps for the dominant view, the hierarchy."""
    if concept_set is None and concepts_file and (out_dir / concepts_file).is_file():
        from concept_engine.store import load_concept_set

        try:
            concept_set = load_concept_set(out_dir / concepts_file)
        except Exception as exc:  # noqa: BLE001 - the report is still useful without it
            log.warning("report without the concept set's extras: %s", exc)
    if concept_set is not None:
        extra = ReportData.from_concept_set(concept_set, name=data.name, k=data.k,
                                            k_reason=data.k_reason)
        for key in ("names", "stability", "stability_interval", "set_stability", "warning",
                    "scales", "hierarchy", "training_ids"):
            if not getattr(data, key) or key == "set_stability":
                setattr(data, key, getattr(extra, key))
        if not data.explain:
            maps = dict(zip(concept_set.image_ids, concept_set.heatmaps, strict=True))
            results = (r if r.heatmaps is not None else replace(r, heatmaps=maps.get(r.id))
                       for r in results)
    explained: list[ImageResult] = []
    if data.explain:
        results = _remember(results, explained)
    rendered = render_images(results, data.k, out_dir, top_n=top_n, total=total, data=data,
                             progress=progress, stems=stems)
    if data.curves:
        plot_k_curves(data.curves, data.k, out_dir / "k_sweep.png", data.k_reason)
        rendered.k_plot = "k_sweep.png"
    write_index(out_dir, data, rendered, concepts_file=concepts_file, explained=explained)
    return rendered


def _remember(results: Iterable[ImageResult], into: list[ImageResult]
              ) -> Iterable[ImageResult]:
    for r in results:
        into.append(replace(r, image=np.zeros((1, 1, 3), np.uint8)))  # keep no pixels
        yield r

"""The notebook-first Python API: a thin layer over the library.

Discovery is :func:`concept_engine.discovery.discover` (in-process or over feature servers) or a
concept engine service (:class:`exporter.remote.EngineDiscoverer`); files are
:mod:`concept_engine.store`; pictures are :mod:`concept_engine.drawing` and
:mod:`exporter.report`. This module only maps arguments, keeps the image files at hand for
pictures, converts BGR to RGB and renders HTML for Jupyter.
"""

from __future__ import annotations

import dataclasses
import html
import logging
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dff.pictures import Picture, from_bgr, img_tag, shrink

log = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]
ImagesArg = (PathLike | Sequence[PathLike] | Sequence[tuple[str, Any]] | Sequence[np.ndarray]
             | np.ndarray)

#: Argument names of :func:`discover` that are not DiscoveryOptions fields, and the field each
#: one sets (the CLI's names).
_ALIASES = {"resize": "resize_mode", "min_images": "prediction_min_images"}
_DATA_DIR_KEY = "data_dir"

_sources: dict[tuple[str, ...], Any] = {}  # in-process Extractor / FeatureClients, reused


# ---------------------------------------------------------------------------------- helpers
def _filter_mode(value: Any, name: str) -> str:
    if value is True:
        return "auto"
    if value is False or value is None:
        return "off"
    text = str(value).lower()
    if text not in ("auto", "on", "off"):
        raise ValueError(f"{name} must be True/False or 'auto'/'on'/'off', got {value!r}")
    return text


def discovery_options(name: str, k: int | str | None = "auto", **options: Any) -> Any:
    """A :class:`concept_engine.discovery.DiscoveryOptions` from :func:`discover`'s keyword
    arguments: every DiscoveryOptions field by its own name, plus the CLI's spellings
    ``k_range=(lo, hi)``, ``resize=``, ``min_images=``, and filters given as booleans
    (``prediction_filter=False`` = off, ``True`` = auto). Unknown names raise TypeError."""
    from concept_engine.discovery import DiscoveryOptions

    fields = {f.name for f in dataclasses.fields(DiscoveryOptions)}
    kw: dict[str, Any] = {"name": name}
    if k is None or (isinstance(k, str) and k.lower() == "auto"):
        kw["k"] = 0
    elif isinstance(k, int | np.integer) and not isinstance(k, bool) and k >= 1:
        kw["k"] = int(k)
    else:
        raise ValueError(f"k must be 'auto' or a positive int, got {k!r}")
    k_range = options.pop("k_range", None)
    if k_range is not None:
        if kw["k"]:
            raise ValueError("give k='auto' with k_range, or a fixed k without it")
        kw["k_min"], kw["k_max"] = (int(v) for v in k_range)
    for alias, field_name in _ALIASES.items():
        if alias in options:
            options[field_name] = options.pop(alias)
    for key in ("prediction_filter", "certainty_filter"):
        if key in options:
            options[key] = _filter_mode(options[key], key)
    unknown = sorted(set(options) - fields)
    if unknown:
        raise TypeError(f"unknown discovery option(s) {unknown}; known: "
                        f"{sorted(fields | set(_ALIASES) | {'k_range'})}")
    kw.update(options)
    opts = DiscoveryOptions(**kw)
    opts.validate()
    return opts


def _as_pixels(image_id: str, data: Any) -> Any:
    """An in-memory image as the sources take it: bytes stay bytes; NumPy arrays are decoded
    pixels (uint8 (H, W, 3) BGR, as ``cv2.imread`` gives: checked by the source, so a bad one is
    that image's error); PIL images (RGB by their own definition) become such arrays."""
    if isinstance(data, bytes | bytearray | memoryview):
        return bytes(data)
    if isinstance(data, np.ndarray):
        return data
    if hasattr(data, "convert") and hasattr(data, "mode"):  # a PIL.Image
        return np.ascontiguousarray(np.asarray(data.convert("RGB"))[:, :, ::-1])
    raise TypeError(f"image {image_id!r}: expected bytes, a NumPy array (uint8 H x W x 3 BGR) "
                    f"or a PIL image, got {type(data).__name__}")


def _read_images(images: ImagesArg, *, one_class: bool = False
                 ) -> tuple[list[tuple[str, Any]], dict[str, Path]]:
    """(id, data) items and id -> path for images given as a folder, file(s), ``(id, data)``
    pairs or arrays (ids "0", "1", ...); data is bytes or decoded pixels. ``one_class``: a folder
    must be ONE class folder (the input layout rule of ``dff discover``: images directly in it,
    no sub-folders with images; a folder of class folders is refused, never merged). Two items
    with the same id are refused, naming both."""
    from dff_protos.errors import InvalidInput

    from feature_server.images import read_items

    if isinstance(images, str | os.PathLike):
        if one_class and Path(images).is_dir():
            pairs = _class_folder_items(Path(images))
        else:
            pairs = read_items(images)
        return [(i, p.read_bytes()) for i, p in pairs], dict(pairs)
    if isinstance(images, np.ndarray) and images.ndim != 4:
        raise InvalidInput(f"an array of shape {images.shape} is not a list of images: pass "
                           "[array] for one image, or a (N, H, W, 3) batch")
    items: list[tuple[str, Any]] = []
    paths: dict[str, Path] = {}
    where: dict[str, str] = {}
    for n, entry in enumerate(images):
        if isinstance(entry, str | os.PathLike):
            found = read_items([entry])
            new = [(i, p.read_bytes()) for i, p in found]
            paths.update(found)
            places = {i: str(p) for i, p in found}
        elif isinstance(entry, tuple) and len(entry) == 2:
            new, places = [(str(entry[0]), _as_pixels(str(entry[0]), entry[1]))], {}
        else:
            new, places = [(str(n), _as_pixels(str(n), entry))], {}
        for image_id, data in new:
            here = places.get(image_id, f"item {n}")
            if image_id in where:
                raise InvalidInput(f"{here} and {where[image_id]} have the same id "
                                   f"{image_id!r}: rename one, or pass (id, data) pairs")
            where[image_id] = here
            items.append((image_id, data))
    return items, paths


def _class_folder_items(folder: Path) -> list[tuple[str, Path]]:
    """A class folder's images (the exporter's layout rule); InvalidInput naming the folder and
    the fix for a folder of classes or a class folder with sub-folders of images."""
    from dff_protos.errors import InvalidInput

    from exporter.export import find_classes, list_images

    classes = find_classes(folder)
    if len(classes) != 1 or Path(classes[0][1]).resolve() != folder.resolve():
        names = ", ".join(name for name, _ in classes[:5]) + (" ..." if len(classes) > 5 else "")
        raise InvalidInput(
            f"{folder} is a folder of {len(classes)} class folder(s) ({names}): a concept set is "
            f"one class - call dff.discover on one of them (e.g. {classes[0][1]}), or run "
            "`dff discover` on the folder for one concept set per class")
    return list_images(folder)


def _feature_source(feature_server: str | Sequence[str] | None, timeout: float) -> Any:
    """The in-process Extractor (built once per process) or a client of feature servers."""
    if feature_server:
        from feature_server.client import parse_addresses

        addresses = parse_addresses(feature_server)
        key = tuple(addresses)
    else:
        from feature_server.models.registry import models_dir

        addresses = []
        folder = models_dir()  # a model imported since the last call means a new Extractor
        key = ("in-process", str(folder), *sorted(
            f"{p.name}:{p.stat().st_mtime_ns}" for p in folder.glob("*.json")))
    source = _sources.get(key)
    if source is None:
        from exporter.export import make_source

        source = make_source(addresses, timeout)
        _sources[key] = source
    return source


class _Bars:
    """Progress events -> one tqdm.auto bar per stage (a widget in Jupyter, text elsewhere)."""

    def __init__(self, enabled: bool, prefix: str = "") -> None:
        self.enabled = enabled
        self.prefix = prefix
        self.bar: Any = None
        self.stage = ""

    def __call__(self, stage: str, done: int, total: int, message: str = "") -> None:
        if not self.enabled or stage == "notice":
            return
        if stage != self.stage or self.bar is None:
            self.close()
            try:
                from tqdm.auto import tqdm
            except ImportError:  # the notebook extra is not installed
                log.warning("progress bars need tqdm (pip install 'dff-concepts[notebook]')")
                self.enabled = False
                return
            self.stage = stage
            self.bar = tqdm(total=total or None, desc=f"{self.prefix}{stage}", leave=False,
                            unit="step" if stage in ("k_sweep", "fit", "certainty_filter")
                            else "img")
        if total and self.bar.total != total:
            self.bar.total = total
        if done > self.bar.n:
            self.bar.update(done - self.bar.n)
        self.bar.set_postfix_str(message[:40], refresh=True)

    def event(self, event: Any) -> None:
        """discover()'s callback: Progress objects (Decisions are ignored here)."""
        if hasattr(event, "done") and hasattr(event, "total"):
            self(event.stage, event.done, event.total, event.message)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _decode(data: Any) -> np.ndarray:
    """An item's data (bytes, or pixels the source accepted) -> uint8 BGR pixels."""
    if isinstance(data, np.ndarray):
        return data
    from exporter.report import decode_image

    return decode_image(data)


def _has_data(data: Any) -> bool:
    return data is not None and len(data) > 0


# ---------------------------------------------------------------------------------- discover
def discover(images: ImagesArg, k: int | str = "auto", *, name: str | None = None,
             feature_server: str | Sequence[str] | None = None, engine: str | None = None,
             progress: bool = True, timeout: float = 3600.0, **options: Any) -> ConceptSet:
    """Discover concepts in a class folder of images, or in files, ``(id, data)`` pairs or
    in-memory images (data: encoded bytes, a uint8 (H, W, 3) BGR NumPy array as ``cv2.imread``
    gives - for RGB pass ``rgb[:, :, ::-1]`` -, or a PIL image; bare arrays get ids "0", "1"...).
    A folder follows ``dff discover``'s layout rule: a folder of class folders, or a class
    folder with sub-folders of images, is refused (one concept set is one class). A bad
    image (unreadable, wrong dtype or shape) is that image's error, recorded in the decisions.

    ``k``: 'auto' (estimate over ``k_range``, default 2-6) or a number. ``name`` defaults to the
    folder's name; it is also the class the prediction filter looks for. Every option of
    ``dff discover`` is a keyword: ``k_range=(2, 6)``, ``k_criterion``, ``solver``, ``init``,
    ``max_iter``, ``tol``, ``seed``, ``model``, ``layer``, ``resize``, ``size``,
    ``target_class``, ``prediction_filter`` (True/False/'auto'/'on'/'off'),
    ``min_probability``, ``min_images``, ``certainty_filter``, ``certainty_quantile``,
    ``certainty_min_images``, ``threshold``, ``min_area``, ``classifier`` (see
    :class:`concept_engine.discovery.DiscoveryOptions`).

    Runs in this process unless ``feature_server`` (address or list: features come from those
    servers) or ``engine`` (a concept engine address: the whole discovery runs there) is
    given. ``progress=False`` silences the progress bars.
    """
    if engine and feature_server:
        raise ValueError("engine and feature_server exclude each other (the engine has its own "
                         "feature servers)")
    if name is None:
        name = Path(images).name if isinstance(images, str | os.PathLike) else ""
    opts = discovery_options(name, k, **options)
    items, paths = _read_images(images, one_class=True)
    bars = _Bars(progress, f"{name}: " if name else "")
    try:
        if engine:
            from exporter.remote import EngineDiscoverer

            client = EngineDiscoverer(engine, timeout=timeout)
            try:
                data = client.discover(name, items, opts, progress=bars)
            finally:
                client.close()
        else:
            from concept_engine.discovery import discover as run

            data = run(items, _feature_source(feature_server, timeout), opts,
                       progress=bars.event)
    finally:
        bars.close()
    if isinstance(images, str | os.PathLike) and Path(images).is_dir():
        data.provenance[_DATA_DIR_KEY] = str(Path(images).resolve())
    return ConceptSet(data, paths=paths, items={i: d for i, d in items if i not in paths},
                      feature_server=feature_server, timeout=timeout)


def load(path: PathLike, images: PathLike | None = None) -> ConceptSet:
    """A concept set file written by ``cs.save`` or ``dff discover`` (``concepts.h5``).

    Pictures of the training images need the image files: ``images`` (a folder), else the
    folder discovery ran on (recorded in the file), when it still exists."""
    from concept_engine.store import load_concept_set

    data = load_concept_set(path)
    folder = images if images is not None else data.provenance.get(_DATA_DIR_KEY)
    paths: dict[str, Path] = {}
    if folder and Path(folder).is_dir():
        from feature_server.images import read_items

        paths = dict(read_items(folder))
    return ConceptSet(data, paths=paths)


# ---------------------------------------------------------------------------------- wrappers
class ConceptSet:
    """A discovered concept set with pictures and notebook display.

    ``data`` is the library's :class:`concept_engine.store.ConceptSet` (bases, heatmaps,
    certainties, polygons, decisions, k curves, provenance); its attributes are readable here
    too (``cs.k``, ``cs.image_ids``, ``cs.bases``, ``cs.provenance`` ...)."""

    def __init__(self, data: Any, *, paths: dict[str, Path] | None = None,
                 items: dict[str, bytes] | None = None,
                 feature_server: str | Sequence[str] | None = None,
                 timeout: float = 3600.0) -> None:
        self.data = data
        self._paths = dict(paths or {})
        self._items = dict(items or {})
        self.feature_server = feature_server
        self.timeout = timeout

    def __getattr__(self, attr: str) -> Any:
        if attr == "data":  # not set yet (unpickling): no recursion
            raise AttributeError(attr)
        return getattr(self.data, attr)

    # -------------------------------------------------------------- files and tables
    def save(self, path: PathLike) -> Path:
        """Write the concept set as HDF5 (the ``concepts.h5`` schema); returns the path."""
        from concept_engine.store import safe_id, save_concept_set

        if not self.data.id:
            self.data.id = safe_id(self.data.name or Path(path).stem)
        return save_concept_set(path, self.data)

    def decisions(self) -> Any:
        """Every filter verdict (one row per image and stage) as a pandas DataFrame:
        id, stage, kept, reason, score, probability."""
        import pandas as pd

        cols = ["id", "stage", "kept", "reason", "score", "probability"]
        rows = [{c: getattr(d, c) for c in cols} for d in self.data.decisions]
        return pd.DataFrame(rows, columns=cols)

    def to_xarray(self) -> Any:
        """An xarray Dataset: ``heatmaps`` (image, concept, y, x) raw W at feature resolution
        (NaN outside an image's own map when sizes differ), ``certainties`` (image, concept),
        ``bases`` (concept, channel), ``original_size``/``input_size`` (image, side); image ids
        and concept numbers as coordinates; scalar provenance as attributes."""
        import xarray as xr

        d = self.data
        n, k = d.n_images, d.k
        hmax = max((m.shape[1] for m in d.heatmaps), default=0)
        wmax = max((m.shape[2] for m in d.heatmaps), default=0)
        maps = np.full((n, k, hmax, wmax), np.nan, np.float32)
        for i, m in enumerate(d.heatmaps):
            maps[i, :, :m.shape[1], :m.shape[2]] = m
        attrs = {key: v for key, v in d.provenance.items()
                 if isinstance(v, str | int | float | bool) and not isinstance(v, bool)}
        attrs.update(name=d.name, k_reason=d.k_reason, threshold=float(d.threshold),
                     min_area=float(d.min_area))
        return xr.Dataset(
            {"heatmaps": (("image", "concept", "y", "x"), maps),
             "certainties": (("image", "concept"), np.asarray(d.certainties, np.float32)),
             "bases": (("concept", "channel"), np.asarray(d.bases, np.float32)),
             "original_size": (("image", "side"), np.asarray(d.original_sizes, np.int32)),
             "input_size": (("image", "side"), np.asarray(d.input_sizes, np.int32))},
            coords={"image": list(d.image_ids), "concept": np.arange(k),
                    "y": np.arange(hmax), "x": np.arange(wmax),
                    "side": ["height", "width"]},
            attrs=attrs)

    # -------------------------------------------------------------- pictures
    def _index(self, image: int | str) -> int:
        if isinstance(image, int | np.integer):
            if not 0 <= int(image) < self.data.n_images:
                raise IndexError(f"image index {image} outside 0..{self.data.n_images - 1}")
            return int(image)
        try:
            return self.data.image_ids.index(image)
        except ValueError:
            raise KeyError(f"{image!r} is not one of the {self.data.n_images} training images "
                           "(pass a file path to explain a new image)") from None

    def _image_bytes(self, image_id: str) -> Any:
        if image_id in self._items:
            return self._items[image_id]
        path = self._paths.get(image_id)
        if path is None or not Path(path).is_file():
            raise FileNotFoundError(
                f"the image file of {image_id!r} is not known here: load the set with "
                "dff.load(path, images=FOLDER)")
        return Path(path).read_bytes()

    def show(self, image: int | str | PathLike, concept: int | None = None,
             legend: bool = True) -> Picture:
        """An image with its concept regions contoured, RGB: every concept in its colour with a
        legend (``concept=None``), or one concept in green. ``image`` is a training image (index
        or id) or the path of a new image (explained with the bases fixed)."""
        if isinstance(image, int | np.integer) or (isinstance(image, str)
                                                   and image in self.data.image_ids):
            i = self._index(image)
            bgr = _decode(self._image_bytes(self.data.image_ids[i]))
            return _overlay(bgr, self.data.polygons[i], self.data.certainties[i], concept,
                            legend)
        return self.explain(image, progress=False)[0].show(concept, legend)

    def grid(self, concept: int, top: int | None = None, columns: int = 6) -> Picture:
        """The training images with ``concept``'s regions contoured, most certain first
        (``top`` of them, default all), as one RGB picture."""
        from exporter.report import concept_overlay, make_grid

        if not 0 <= concept < self.data.k:
            raise IndexError(f"concept {concept} outside 0..{self.data.k - 1}")
        cert = np.asarray(self.data.certainties)[:, concept]
        order = np.argsort(-cert, kind="stable")[:top]
        tiles = []
        for i in order:
            image_id = self.data.image_ids[i]
            bgr = _decode(self._image_bytes(image_id))
            tiles.append((shrink(concept_overlay(bgr, self.data.polygons[i][concept]), 352),
                          f"{cert[i]:.3g} {image_id}"))
        what = f"top {len(order)}" if top else f"all {len(order)} images"
        return from_bgr(make_grid(tiles, columns=columns,
                                  title=f"concept {concept}: {what} by certainty"))

    def plot_k_sweep(self) -> Any:
        """The k sweep (every criterion measured, the chosen k marked) as a matplotlib Figure."""
        from exporter.report import k_curves_figure

        return k_curves_figure(self.data.k_curves, self.data.k, self.data.k_reason)

    # -------------------------------------------------------------- explain
    def explain(self, images: ImagesArg, *, threshold: float | None = None,
                min_area: float | None = None, progress: bool = True) -> Explanations:
        """Heatmaps, certainties and regions of new images with this set's bases held fixed
        (same model, layer and resize policy). Images as for :func:`discover` (a folder's
        sub-folders are read too: ids are paths relative to it)."""
        from concept_engine.discovery import explain

        items, paths = _read_images(images)
        source = _feature_source(self.feature_server, self.timeout)
        data = dict(items)
        out = []
        bars = _Bars(progress)
        try:
            for x in explain(self.data, items, source, threshold, min_area):
                out.append(Explanation(x, data.get(x.id, b""), self.data.k))
                bars("explain", len(out), len(items), x.id)
        finally:
            bars.close()
        order = {i: n for n, (i, _) in enumerate(items)}
        return Explanations(sorted(out, key=lambda e: order.get(e.id, len(order))))

    # -------------------------------------------------------------- display
    def __repr__(self) -> str:
        d = self.data
        prov = d.provenance
        return (f"<dff.ConceptSet {d.name!r}: k={d.k} concepts, {d.n_images} images, "
                f"{prov.get('model', '?')}/{prov.get('layer', '?')}>")

    def _repr_html_(self) -> str:
        d = self.data
        prov = d.provenance
        rows = [("k", f"{d.k} ({d.k_reason})"), ("images used", d.n_images),
                ("model / layer", f"{prov.get('model', '?')} / {prov.get('layer', '?')}"),
                ("solver", f"{prov.get('solver', '?')}, {prov.get('n_iter', '?')} iterations"),
                ("seed", prov.get("seed", "?"))]
        dropped = [x for x in d.decisions if not x.kept]
        if dropped:
            rows.append(("dropped", f"{len(dropped)} (see cs.decisions())"))
        parts = [f"<div><h3>Concept set <q>{html.escape(d.name)}</q></h3>", _table(rows)]
        if d.notices:
            parts.append("<ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in d.notices)
                         + "</ul>")
        try:
            for j in range(d.k):
                parts.append(f"<div><b>concept {j}</b><br>"
                             f"{img_tag(shrink(self.grid(j, top=3, columns=3), 420))}</div>")
        except FileNotFoundError as exc:
            parts.append(f"<p><i>no pictures: {html.escape(str(exc))}</i></p>")
        parts.append("</div>")
        return "".join(parts)


class Explanation:
    """One new image explained with a concept set: ``heatmaps`` (k, h, w) at feature
    resolution, ``certainties`` (k,), ``polygons[j]`` regions of concept j in image pixels;
    ``error`` is set (and the rest empty) when the image could not be explained."""

    def __init__(self, result: Any, data: Any, k: int) -> None:
        self.result = result
        self._data = data
        self.k = k

    def __getattr__(self, attr: str) -> Any:
        if attr == "result":
            raise AttributeError(attr)
        return getattr(self.result, attr)

    def show(self, concept: int | None = None, legend: bool = True) -> Picture:
        """The image with the regions contoured, RGB (see :meth:`ConceptSet.show`)."""
        if self.result.error is not None:
            raise ValueError(f"{self.result.id}: {self.result.error}")
        if not _has_data(self._data):
            raise FileNotFoundError(f"no image data kept for {self.result.id!r}")
        return _overlay(_decode(self._data), self.result.polygons, self.result.certainties,
                        concept, legend)

    def __repr__(self) -> str:
        if self.result.error is not None:
            return f"<dff.Explanation {self.result.id!r}: error {self.result.error}>"
        cert = ", ".join(f"{c:.3g}" for c in self.result.certainties)
        return f"<dff.Explanation {self.result.id!r}: certainties [{cert}]>"

    def _repr_html_(self) -> str:
        title = f"<b>{html.escape(self.result.id)}</b>"
        if self.result.error is not None:
            return f"<div>{title}: <i>{html.escape(str(self.result.error))}</i></div>"
        rows = [(f"concept {j}", f"{c:.3g}") for j, c in enumerate(self.result.certainties)]
        pic = img_tag(shrink(self.show(), 480)) if _has_data(self._data) else ""
        return (f"<div style='display:inline-block;vertical-align:top;margin:4px'>{title}<br>"
                f"{pic}{_table(rows, ('concept', 'certainty'))}</div>")


class Explanations(list):
    """The explanations of several images (a list) that displays them side by side."""

    def _repr_html_(self) -> str:
        return "<div>" + "".join(x._repr_html_() for x in self) + "</div>"

    def certainties(self) -> Any:
        """Certainty of every concept in every explained image: a pandas DataFrame
        (rows: image ids; columns: concepts)."""
        import pandas as pd

        ok = [x for x in self if x.result.error is None]
        return pd.DataFrame([np.asarray(x.certainties, float) for x in ok],
                            index=[x.id for x in ok])


def _overlay(bgr: np.ndarray, polygons: Sequence[Sequence[np.ndarray]],
             certainties: Iterable[float], concept: int | None, legend: bool) -> Picture:
    from concept_engine.drawing import overlay
    from exporter.report import concept_overlay

    if concept is None:
        return from_bgr(overlay(bgr, polygons, [float(c) for c in certainties], legend=legend))
    if not 0 <= concept < len(polygons):
        raise IndexError(f"concept {concept} outside 0..{len(polygons) - 1}")
    return from_bgr(concept_overlay(bgr, polygons[concept]))


def _table(rows: Iterable[tuple[Any, Any]], header: tuple[str, str] | None = None) -> str:
    head = ("<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>"
            if header else "")
    body = "".join(f"<tr><th style='text-align:left'>{html.escape(str(a))}</th>"
                   f"<td style='text-align:left'>{html.escape(_fmt(b))}</td></tr>"
                   for a, b in rows)
    return f"<table>{head}{body}</table>"


def _fmt(value: Any) -> str:
    if isinstance(value, float) and not math.isnan(value):
        return f"{value:.4g}"
    return str(value)


__all__ = ["ConceptSet", "Explanation", "Explanations", "discover", "discovery_options", "load"]

"""The batch export: one concept set (HDF5 + pictures + index.html) per class folder.

    DATA/<class>/*.jpg  ->  OUT/<class>/{concepts.h5, index.html, k_sweep.png, grids/,
                                         overlays/concept_NN/, combined/, summary.json}

Resumable and atomic: a class is built in ``OUT/.<class>.partial/`` and renamed to
``OUT/<class>/`` only when complete, with ``summary.json`` written last inside it (the done
marker). A killed run leaves at most a ``.partial`` folder, which the next run deletes and
redoes; finished classes are skipped unless ``force``. A portable file lock
(``OUT/.<class>.lock``, filelock) keeps two runs from writing the same class at once. Discovery
itself runs in-process (``concept_engine.discovery.discover`` over a FeatureSource: the embedded
ONNX Runtime extractor or feature servers) or on a concept engine service (``EngineDiscoverer``).

Input layout (one documented rule, :func:`find_classes`): DATA_DIR holding image files is ONE
class; DATA_DIR holding only sub-folders is a folder of classes (each sub-folder with image files
is a class). A class folder must hold image files and no sub-folders with images: a folder with
both is refused with an error naming it (never silently merged). Hidden entries (``.name``) are
ignored, and so is the output folder when it lies inside DATA_DIR (with a notice).

Per-file problems (unreadable, larger than ``max_file_bytes`` - checked from the size before
reading -, undecodable) are per-image errors recorded as decisions; the rest of the class and
every other class go on. Output file names come from :func:`output_stems` (collision-free).

Several classes are pipelined (``pipeline=True``; by default where it pays, see
:func:`pipeline_pays`): while class i is fitted, rendered and written, class i+1's features
are extracted (at most two classes in flight; extractions one at a time, in class order). Each
class's result does not depend on it.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import stat
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, cast

import numpy as np
from dff_protos.errors import DFFError, InvalidInput, NotFound, TooFewImages

if TYPE_CHECKING:
    from concept_engine.discovery import DiscoveryOptions
    from concept_engine.finegrain import Decision

log = logging.getLogger(__name__)

DONE_MARKER = "summary.json"
CONCEPTS_FILE = "concepts.h5"
THUMBNAIL_FILE = "thumbnail.jpg"
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"})
DEFAULT_MAX_FILE_BYTES = 64 * 1024 * 1024  # the feature server's own default limit

Progress = Callable[..., None]  # progress(stage, done, total, message="")


# ---------------------------------------------------------------------------- settings

@dataclass(frozen=True)
class ExportSettings:
    """Everything a batch export needs, built once at the entry point.

    ``discovery`` is the typed ``DiscoveryOptions`` of every class (its ``name`` is replaced
    by the class name per class). ``max_file_bytes``: larger files are per-image errors,
    refused from their size before being read. ``pipeline``: overlap class i's fit/render/write
    with class i+1's feature extraction; None (the default) = where that pays (see
    :func:`pipeline_pays`).
    """

    out: Path
    discovery: DiscoveryOptions = field(default_factory=lambda: _default_options())
    feature_servers: tuple[str, ...] = ()
    client_decode: bool = False  # with feature_servers: send decoded pixels (FeatureClient)
    client_prepare: bool = False  # ... or the network inputs made here (PreparedImage)
    engine: str = ""
    force: bool = False
    top_n: int = 8
    timeout: float = 3600.0
    show_progress: bool = True
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES
    pipeline: bool | None = None


def _default_options() -> DiscoveryOptions:
    from concept_engine.discovery import DiscoveryOptions

    return DiscoveryOptions()


@dataclass
class ClassReport:
    """How one class went (also what summary.json holds for finished classes)."""

    name: str
    status: str  # "done" | "skipped" | "failed"
    out_dir: str = ""
    n_images: int = 0
    n_kept: int = 0
    dropped: dict[str, int] = field(default_factory=dict)  # "stage: reason" -> count
    k: int = 0
    k_reason: str = ""
    k_criterion: str = ""
    stage_seconds: dict[str, float] = field(default_factory=dict)
    notices: list[str] = field(default_factory=list)
    error: str = ""
    seconds: float = 0.0
    concept_set_id: str = ""
    n_errors: int = 0  # images that could not be used (unreadable, too large, undecodable)
    stability: float | None = None  # split-half stability of the set at the chosen k
    concept_stability: list[float | None] = field(default_factory=list)  # bootstrap, per concept
    #: every image that could not be used, {"id", "reason"}, in the order of the decisions
    errors: list[dict[str, str]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------- inputs

def _is_image_file(p: Path) -> bool:
    """An image file name (not hidden) that is not a folder: regular files, links (even
    dangling ones) and special files are listed, so that a bad one becomes a per-image error
    instead of vanishing."""
    return (not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES
            and not p.is_dir())


def file_id(name: str) -> str:
    """A class name or image id from a file name (undecodable bytes escaped): see
    :func:`feature_server.images.file_id`."""
    from feature_server.images import file_id as escaped

    return escaped(name)


def _inside(path: Path, folder: Path) -> bool:
    """path is folder or lies below it (both resolved)."""
    try:
        path.resolve().relative_to(folder.resolve())
    except ValueError:
        return False
    return True


def _entries(folder: Path, out: Path | None) -> tuple[list[Path], list[Path]]:
    """(image files, sub-folders) directly in folder: hidden entries and the output folder
    (when it lies inside) are left out."""
    files, dirs = [], []
    for p in sorted(folder.iterdir()):
        if p.name.startswith("."):
            continue
        if p.is_dir():
            if out is not None and _inside(p, out):
                log.warning("not reading %s: it is the output folder (or inside it)", p)
                continue
            dirs.append(p)
        elif _is_image_file(p):
            files.append(p)
    return files, dirs


def _holds_images(folder: Path, out: Path | None) -> bool:
    files, dirs = _entries(folder, out)
    return bool(files) or any(_holds_images(d, out) for d in dirs)


def _check_class_folder(folder: Path, files: list[Path], dirs: list[Path],
                        out: Path | None) -> None:
    nested = [d for d in dirs if _holds_images(d, out)]
    if files and nested:
        raise InvalidInput(
            f"{folder} holds image files AND sub-folders with images "
            f"({', '.join(d.name for d in nested[:3])}{' ...' if len(nested) > 3 else ''}); "
            "a class folder may not have sub-folders with images: move the images of the "
            "sub-folders into it, or move its own images into a sub-folder (then each "
            "sub-folder is a class)")


def find_classes(data_dir: Path, out: Path | None = None) -> list[tuple[str, Path]]:
    """(class name, folder) pairs, sorted (the input layout rule: see the module docstring).
    ``out`` (the output folder) is never read as input. Raises NotFound / InvalidInput with a
    message that names the folder and the fix."""
    data_dir = Path(data_dir)
    if not data_dir.exists():
        raise NotFound(f"no such folder: {data_dir}")
    if not data_dir.is_dir():
        raise InvalidInput(f"DATA_DIR {data_dir} is a file; give the folder that holds the "
                           "images (or a folder of class folders)")
    if out is not None and _inside(data_dir, out):
        raise InvalidInput(f"DATA_DIR {data_dir} lies inside the output folder {out}; choose "
                           "another --out")
    files, dirs = _entries(data_dir, out)
    if files:
        _check_class_folder(data_dir, files, dirs, out)
        return [(file_id(data_dir.resolve().name), data_dir)]
    classes = []
    for d in dirs:
        files, sub = _entries(d, out)
        if files:
            _check_class_folder(d, files, sub, out)
            classes.append((file_id(d.name), d))
        elif any(_holds_images(x, out) for x in sub):
            log.warning("%s holds no images itself, only sub-folders: skipped (folders of "
                        "classes are not searched below DATA_DIR's sub-folders; give %s as "
                        "DATA_DIR to export them)", d, d)
    if not classes:
        raise InvalidInput(f"{data_dir} holds no images and no sub-folders with images "
                           f"(looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    return classes


#: names of the site-level files in OUT that a class folder OUT/<class>/ must not take
#: (compared case-insensitively: case-insensitive file systems)
SITE_FILES = frozenset({"index.html"})


def check_class_names(classes: Sequence[tuple[str, Path]]) -> None:
    """InvalidInput naming the folder when a class would be written over a site-level file of
    OUT (a class folder named ``index.html`` would take the place of the site index; its lock
    ``.index.html.lock`` would be the site index's lock)."""
    for name, folder in classes:
        if name.casefold() in SITE_FILES:
            raise InvalidInput(f"class folder {folder} is named {name!r}, the name of the site "
                               f"index OUT/{name}; rename the folder (e.g. {name}_class)")


def list_images(folder: Path) -> list[tuple[str, Path]]:
    """(id, path) of a class folder's image files (not of its sub-folders), sorted; id = the
    file name. Hidden files (``.name``) are left out."""
    return [(file_id(p.name), p) for p in sorted(Path(folder).iterdir()) if _is_image_file(p)]


def output_stems(ids: Iterable[str]) -> dict[str, str]:
    """A file-name stem (no extension) per image id, collision-free and deterministic: the id
    with its extension dropped and characters outside ``[A-Za-z0-9._-]`` replaced by ``_``
    (``/`` by ``__``); ids whose stems would collide (case-insensitively: ``a.jpg`` and
    ``a.png``, ``photo 1.jpg`` and ``photo_1.jpg``) get ``-`` and 10 hex digits of the id's
    SHA-256 appended. Depends only on the SET of ids (not their order)."""
    ids = sorted(set(ids))

    def plain(image_id: str) -> str:
        stem = os.path.splitext(image_id.replace("\\", "/"))[0].replace("/", "__")
        return "".join(c if c.isalnum() or c in "._-" else "_" for c in stem) or "image"

    def hashed(image_id: str, n: int) -> str:
        return f"{plain(image_id)}-{hashlib.sha256(image_id.encode()).hexdigest()[:n]}"

    base = {i: plain(i) for i in ids}
    counts = Counter(v.lower() for v in base.values())
    out = {i: (v if counts[v.lower()] == 1 else hashed(i, 10)) for i, v in base.items()}
    if len({v.lower() for v in out.values()}) != len(out):  # astronomically rare: full hash
        counts = Counter(v.lower() for v in out.values())
        out = {i: (v if counts[v.lower()] == 1 else hashed(i, 64)) for i, v in out.items()}
    return out


def _file_error(image_id: str, reason: str) -> Decision:
    from concept_engine.finegrain import ERROR, Decision

    return Decision(image_id, False, ERROR, reason)


def read_files(items: Sequence[tuple[str, Path]], max_bytes: int = DEFAULT_MAX_FILE_BYTES
               ) -> tuple[list[tuple[str, bytes]], list[Decision]]:
    """(readable (id, bytes), per-file error decisions). A file larger than ``max_bytes`` is
    refused from its size, before reading; unreadable files (permissions, dangling links, not a
    regular file) are errors too. Nothing here raises for one file."""
    data: list[tuple[str, bytes]] = []
    errors: list[Decision] = []
    for image_id, path in items:
        try:
            st = os.stat(path)
            if not stat.S_ISREG(st.st_mode):
                raise IsADirectoryError(0, "not a regular file")
            if st.st_size > max_bytes:
                errors.append(_file_error(image_id, f"file of {st.st_size} bytes is above the "
                                          f"limit of {max_bytes} bytes (--max-file-size)"))
                continue
            with open(path, "rb") as fh:
                blob = fh.read(max_bytes + 1)
            if len(blob) > max_bytes:  # grew since stat
                errors.append(_file_error(image_id, f"file is above the limit of {max_bytes} "
                                          "bytes (--max-file-size)"))
                continue
        except OSError as exc:
            why = exc.strerror or type(exc).__name__
            errors.append(_file_error(image_id, f"cannot read the file: {why}"))
            log.warning("cannot read %s: %s", path, why)
            continue
        data.append((image_id, blob))
    return data, errors


def read_bytes(items: Sequence[tuple[str, Path]]) -> list[tuple[str, bytes]]:
    """The bytes of every item (raises OSError); see :func:`read_files` for the tolerant one."""
    return [(i, Path(p).read_bytes()) for i, p in items]


# ---------------------------------------------------------------------------- discovery

class Discoverer(Protocol):
    """Runs discovery for one class: images in, a concept_engine.store.ConceptSet out."""

    def discover(self, name: str, items: list[tuple[str, bytes]], options: DiscoveryOptions,
                 progress: Progress | None = None) -> Any: ...

    def close(self) -> None: ...


def discovery_options(name: str, options: DiscoveryOptions) -> DiscoveryOptions:
    """The options of one class: ``options`` with its name (validated: InvalidInput)."""
    opts = dataclasses.replace(options, name=name)
    opts.validate()
    return opts


def engine_progress(progress: Progress | None) -> Callable[[Any], None] | None:
    """Adapt discover()'s event callback (Progress or Decision objects) to
    progress(stage, done, total, message); notices (already logged by the engine) and
    decisions are reported in the class summary instead of a bar."""
    if progress is None:
        return None

    def on_event(event: Any) -> None:
        stage = getattr(event, "stage", None)
        if not hasattr(event, "done") or stage is None or stage == "notice":
            return
        progress(stage, event.done, event.total, event.message)

    return on_event


def make_source(feature_servers: Sequence[str] = (), timeout: float = 3600.0,
                client_decode: bool | None = None, client_prepare: bool | None = None) -> Any:
    """The FeatureSource: feature servers when addresses are given, else in-process."""
    if feature_servers:
        from feature_server.client import FeatureClient

        return FeatureClient(list(feature_servers), timeout=timeout,
                             decode_locally=client_decode or None,
                             prepare_locally=client_prepare or None)
    from feature_server.extractor import Extractor
    from feature_server.models.registry import load_registry, models_dir

    try:
        missing = not load_registry()
    except DFFError:
        missing = True
    if missing:
        log.warning("models not found in %s: building them now (one-off, a few minutes)",
                    models_dir())
    return Extractor.from_cache(build=True)


def explain_items(cs: Any, items: list[tuple[str, bytes]], *,
                  feature_servers: Sequence[str] = (), timeout: float = 3600.0,
                  client_decode: bool = False, client_prepare: bool = False,
                  threshold: float | None = None,
                  min_area: float | None = None,
                  progress: Callable[[int, int], None] | None = None) -> list[Any]:
    """Explanations (concept_engine.discovery.Explanation) of items with cs's bases fixed,
    in the order of items."""
    from concept_engine.discovery import explain

    source = make_source(feature_servers, timeout, client_decode, client_prepare)
    try:
        out = {}
        for x in explain(cs, items, source, threshold, min_area):
            out[x.id] = x
            if progress:
                progress(len(out), len(items))
    finally:
        close = getattr(source, "close", None)
        if callable(close):
            close()
    return [out[i] for i, _ in items if i in out]


class _GatedSource:
    """A FeatureSource whose extractions run one at a time (the pipeline's gate): a class's
    extraction waits for the previous class's, while that class's fit and rendering go on."""

    def __init__(self, source: Any) -> None:
        self.source = source
        self.gate = threading.Lock()
        self.local = threading.local()  # .waited: seconds this thread waited for the gate

    def extract(self, items: Any, options: Any) -> Iterator[Any]:
        t0 = time.perf_counter()
        with self.gate:
            self.local.waited = getattr(self.local, "waited", 0.0) + time.perf_counter() - t0
            yield from self.source.extract(items, options)

    def describe(self) -> dict:
        return self.source.describe()

    def class_names(self, classifier: str | None = None) -> list[str]:
        return self.source.class_names(classifier)


class LocalDiscoverer:
    """discover() in this process over a FeatureSource (embedded extractor or feature servers).
    Safe to call from two threads at once: extractions are serialised, fits run in parallel."""

    def __init__(self, source: Any) -> None:
        # the pictures' compiled kernel joins the warm-up that discover() starts (the numeric
        # core does not import drawing itself)
        import concept_engine.drawing  # noqa: F401, PLC0415

        self.source = source
        self._gated = _GatedSource(source)

    @classmethod
    def embedded(cls) -> LocalDiscoverer:
        return cls(make_source())

    @classmethod
    def remote_features(cls, addresses: Sequence[str], timeout: float,
                        client_decode: bool = False, client_prepare: bool = False
                        ) -> LocalDiscoverer:
        return cls(make_source(addresses, timeout, client_decode, client_prepare))

    def discover(self, name: str, items: list[tuple[str, bytes]], options: DiscoveryOptions,
                 progress: Progress | None = None) -> Any:
        from concept_engine.discovery import discover

        self._gated.local.waited = 0.0
        adapted = engine_progress(progress)
        errors: list[Any] = []

        def on_event(event: Any) -> None:
            if hasattr(event, "kept") and getattr(event, "stage", None) == "error":
                errors.append(event)  # an image that could not be used
            if adapted is not None:
                adapted(event)

        try:
            cs = discover(items, self._gated, discovery_options(name, options),
                          progress=on_event)
        except DFFError as exc:  # the images that failed name the files of a failed class
            exc.decisions = errors  # type: ignore[attr-defined]
            raise
        waited = self._gated.local.waited
        if waited > 0.0005 and "features" in cs.stage_seconds:
            # the features stage includes the wait for the previous class's extraction
            cs.stage_seconds["features"] = max(0.0, cs.stage_seconds["features"] - waited)
            cs.stage_seconds["features_wait"] = waited
        return cs

    def close(self) -> None:
        close = getattr(self.source, "close", None)
        if callable(close):
            close()


# ---------------------------------------------------------------------------- one class

def _has_markers(class_dir: Path) -> bool:
    return (class_dir / DONE_MARKER).is_file() and (class_dir / CONCEPTS_FILE).is_file()


def read_summary(class_dir: Path) -> tuple[dict[str, Any] | None, str]:
    """(class_dir's summary.json as a dict, "") or (None, why it cannot be used)."""
    try:
        summary = json.loads((class_dir / DONE_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # ValueError: JSONDecodeError, UnicodeDecodeError
        return None, f"{type(exc).__name__}: {exc}"
    if not isinstance(summary, dict):
        return None, f"a JSON {type(summary).__name__}, not an object"
    why = _summary_problem(summary)
    return (None, why) if why else (summary, "")


#: what a finished class's summary.json must hold, and of which type (the rest is optional)
_SUMMARY_KEYS: dict[str, type | tuple[type, ...]] = {
    "name": str, "k": int, "n_images": int, "n_kept": int, "n_errors": int, "dropped": dict}


def _summary_problem(summary: dict[str, Any]) -> str:
    """Why a parsed summary.json is not a finished class's ("" when it is): a missing or
    mistyped field (a hand edit, another program) would otherwise crash the resume or the
    site index."""
    for key, kind in _SUMMARY_KEYS.items():
        value = summary.get(key)
        if value is None:
            return f"no {key!r}"
        if not isinstance(value, kind) or isinstance(value, bool):
            return f"{key!r} is {value!r}, not {getattr(kind, '__name__', kind)}"
    if summary["k"] < 1 or summary["n_kept"] < summary["k"]:
        return f"k={summary['k']} with {summary['n_kept']} images kept"
    fields = {f.name for f in dataclasses.fields(ClassReport)}
    try:
        ClassReport(**{k: v for k, v in summary.items() if k in fields})
    except TypeError as exc:
        return str(exc)
    return ""


def is_done(class_dir: Path) -> bool:
    """A finished class: summary.json (readable: a damaged one means unfinished, the class is
    redone) and concepts.h5."""
    return _has_markers(class_dir) and read_summary(class_dir)[0] is not None


def _rmtree(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def _decision_dicts(decisions: Sequence[Any]) -> list[dict[str, Any]]:
    out = []
    for d in decisions:
        row = (dataclasses.asdict(d) if dataclasses.is_dataclass(d) and not isinstance(d, type)
               else dict(d))
        for key in ("score", "probability"):
            v = row.get(key)
            if isinstance(v, float) and v != v:
                row[key] = None
        out.append(row)
    return out


def error_list(decisions: Sequence[Any]) -> list[dict[str, str]]:
    """[{"id", "reason"}] of the images that could not be used (error decisions), in order."""
    return [{"id": str(d.get("id", "")), "reason": str(d.get("reason", ""))}
            for d in _decision_dicts(decisions)
            if d.get("stage") == "error" and not d.get("kept", True)]


def dropped_counts(decisions: Sequence[Any]) -> dict[str, int]:
    """Why images were dropped -> how many: filters are grouped by stage (the example reason
    shows the threshold), errors by their message."""
    counts: Counter[str] = Counter()
    example: dict[str, str] = {}
    for d in _decision_dicts(decisions):
        if d.get("kept", True):
            continue
        stage, reason = str(d.get("stage", "")), str(d.get("reason", ""))
        if stage == "error":
            key = f"error: {reason}"
        else:
            key = stage
            example.setdefault(stage, reason)
        counts[key] += 1
    return {(f"{k} (e.g. {example[k]})" if k in example else k): n
            for k, n in sorted(counts.items())}


def _image_results(cs: Any, data: dict[str, bytes]) -> Iterator[Any]:
    """The kept images' results, each with its encoded bytes: the render threads decode them."""
    from exporter.report import ImageResult

    for i, image_id in enumerate(cs.image_ids):
        yield ImageResult(id=image_id, image=data[image_id], polygons=cs.polygons[i],
                          certainties=np.asarray(cs.certainties[i]))


def write_thumbnail(class_dir: Path, cs: Any, rendered: Any, size: int = 240) -> None:
    """class_dir/thumbnail.jpg: the combined overlay of the image with the highest mean
    concept certainty (ties: the first), at most ``size`` pixels on its long side."""
    import cv2

    combined = getattr(rendered, "combined", None) or {}
    if not combined or not len(cs.image_ids):
        return
    means = np.asarray(cs.certainties, np.float64).reshape(len(cs.image_ids), -1).mean(axis=1)
    order = [cs.image_ids[i] for i in np.argsort(-means, kind="stable")]
    best = next((i for i in order if i in combined), None)
    if best is None:
        return
    img = cv2.imread(str(class_dir / combined[best]), cv2.IMREAD_COLOR)
    if img is None:
        return
    h, w = img.shape[:2]
    s = min(1.0, size / max(h, w))
    small = cv2.resize(img, (max(1, round(w * s)), max(1, round(h * s))),
                       interpolation=cv2.INTER_AREA)
    ok, buf = cv2.imencode(".jpg", small, [cv2.IMWRITE_JPEG_QUALITY, 85])
    if ok:
        (class_dir / THUMBNAIL_FILE).write_bytes(buf.tobytes())


def write_class_outputs(class_dir: Path, cs: Any, data: dict[str, bytes], report: ClassReport,
                        *, top_n: int = 8, progress: Progress | None = None) -> None:
    """concepts.h5, pictures, thumbnail and index.html of one concept set into class_dir (not
    summary). ``data``: the encoded bytes of (at least) the kept images, by id."""
    from concept_engine.store import safe_id, save_concept_set
    from exporter.report import ReportData, write_report

    t0 = time.perf_counter()
    if not cs.id:  # in-process discovery leaves the id to the caller
        cs.id = safe_id(cs.name or class_dir.name)
        report.concept_set_id = cs.id
    stored = getattr(cs, "hdf5", b"")  # the engine's own file (exporter.remote.EngineConceptSet)
    if stored:
        (class_dir / CONCEPTS_FILE).write_bytes(stored)
    else:
        save_concept_set(class_dir / CONCEPTS_FILE, cs)
    report.stage_seconds["save"] = round(time.perf_counter() - t0, 3)
    t0 = time.perf_counter()
    report_data = ReportData(name=cs.name, k=cs.k, k_reason=cs.k_reason,
                             curves={c: {int(k): float(v) for k, v in curve.items()}
                                     for c, curve in cs.k_curves.items()},
                             decisions=_decision_dicts(cs.decisions),
                             summary=_summary_table(report, cs), notices=list(cs.notices))
    rendered = write_report(
        class_dir, _image_results(cs, data), report_data, top_n=top_n, total=cs.n_images,
        progress=(lambda d, t: progress("render", d, t)) if progress else None,
        stems=output_stems(cs.image_ids))
    write_thumbnail(class_dir, cs, rendered)
    report.stage_seconds["render"] = round(time.perf_counter() - t0, 3)


def _stabilities(cs: Any) -> tuple[float | None, list[float | None]]:
    """(split-half stability of the set, bootstrap stability per concept) for summary.json and
    the site index; (None, []) when not measured (a version-1 file, bootstrap off)."""
    import math

    split = getattr(cs, "set_stability", float("nan"))
    stability = getattr(cs, "stability", None)
    per = [] if stability is None else [float(v) for v in stability]
    return (None if split is None or math.isnan(float(split)) else round(float(split), 4),
            [] if all(math.isnan(v) for v in per) else
            [None if math.isnan(v) else round(v, 4) for v in per])


def _summary_table(report: ClassReport, cs: Any) -> dict[str, Any]:
    prov = cs.provenance or {}
    table: dict[str, Any] = {
        "images": report.n_images, "kept": report.n_kept,
        "dropped": report.dropped or "none",
        "k": cs.k, "k chosen by": report.k_criterion or "fixed",
        "k reason": cs.k_reason,
    }
    for key in ("model", "layer", "resize_mode", "solver", "init", "seed", "n_iter",
                "reconstruction_error", "converged", "execution_provider", "engine",
                "software_version", "weights_sha256"):
        if key in prov:
            table[key] = prov[key]
    table["seconds per stage"] = {k: round(float(v), 2) for k, v in cs.stage_seconds.items()}
    return table


@contextlib.contextmanager
def _class_lock(out: Path, name: str, wait: bool = True) -> Iterator[bool]:
    """A portable advisory lock (filelock) on OUT/.<class>.lock. Another run holding it (a
    retried Kubernetes Job pod while the old one still runs, an overlapping shard or
    ``--force``) is waited for, with a message (locks are taken in class order, so runs cannot
    wait for each other in a circle); ``wait=False``: False at once when it is held."""
    from filelock import FileLock, Timeout

    out.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(out / f".{name}.lock"), thread_local=False)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        if not wait:
            yield False
            return
        log.warning("another dff discover is writing %s (lock %s): waiting for it",
                    out / name, lock.lock_file)
        lock.acquire()
    try:
        yield True
    finally:
        lock.release()


def export_class(name: str, folder: Path, settings: ExportSettings, discoverer: Discoverer,
                 progress: Progress | None = None) -> ClassReport:
    """Discover and write one class atomically (see the module docstring)."""
    out = Path(settings.out)
    final = out / name
    report = ClassReport(name=name, status="done", out_dir=str(final))
    if is_done(final) and not settings.force:
        return _skip_finished(out, name)
    with _class_lock(out, name):
        return _export_class_locked(name, folder, settings, discoverer, progress, report)


def _previous(final: Path) -> ClassReport:
    previous, _ = read_summary(final)
    assert previous is not None  # is_done(final)
    previous["status"] = "skipped"
    previous["out_dir"] = str(final)  # where it is now (OUT may have moved since)
    known = {f.name for f in dataclasses.fields(ClassReport)}
    return ClassReport(**{k: v for k, v in previous.items() if k in known})


def _skip_finished(out: Path, name: str) -> ClassReport:
    """A finished class, skipped; the ``.partial`` folder of a killed ``--force`` rerun of it
    is removed (under the class's lock, unless another run holds it)."""
    partial = out / f".{name}.partial"
    if partial.exists():
        with _class_lock(out, name, wait=False) as locked:
            if locked:
                log.warning("removing %s, left by a killed run", partial)
                _rmtree(partial)
    return _previous(out / name)


def _export_class_locked(name: str, folder: Path, settings: ExportSettings,
                         discoverer: Discoverer, progress: Progress | None,
                         report: ClassReport) -> ClassReport:
    out = Path(settings.out)
    final = out / name
    if is_done(final) and not settings.force:  # finished by a run that held the lock before us
        return _previous(final)
    missing = [n for n in (DONE_MARKER, CONCEPTS_FILE) if not (final / n).is_file()]
    if len(missing) < 2 and not is_done(final):  # our own output, damaged: redone
        why = (f"{' and '.join(missing)} missing" if missing else
               f"{DONE_MARKER} cannot be used ({read_summary(final)[1]})")
        log.warning("%s: %s, so the class is not finished: redoing it", final, why)
    elif final.exists() and not is_done(final) and not settings.force:
        report.status = "failed"
        report.error = (f"{final} exists but is not a dff export (no {DONE_MARKER} or "
                        f"{CONCEPTS_FILE}); move it away or use --force to replace it")
        return report
    start = time.perf_counter()
    partial = out / f".{name}.partial"
    _rmtree(partial)  # a previous run was killed here: redo the class from scratch
    out.mkdir(parents=True, exist_ok=True)
    read_errors: list[Any] = []
    try:
        items = list_images(folder)
        report.n_images = len(items)
        t0 = time.perf_counter()
        data, read_errors = read_files(items, settings.max_file_bytes)
        read_s = time.perf_counter() - t0
        cs = discoverer.discover(name, data, settings.discovery, progress)
        if read_errors:  # the files that never reached discovery are decisions too
            cs.decisions = list(read_errors) + list(cs.decisions)
            cs.provenance["input_images"] = [i for i, _ in items]  # and inputs
        report.stage_seconds = {"read": round(read_s, 3)}
        report.stage_seconds.update({k: round(float(v), 3) for k, v in cs.stage_seconds.items()})
        report.n_kept = cs.n_images
        report.dropped = dropped_counts(cs.decisions)
        report.errors = error_list(cs.decisions)
        report.n_errors = len(report.errors)
        report.k, report.k_reason, report.k_criterion = cs.k, cs.k_reason, cs.k_criterion
        report.stability, report.concept_stability = _stabilities(cs)
        report.notices = list(cs.notices)
        report.concept_set_id = cs.id
        partial.mkdir(parents=True)
        write_class_outputs(partial, cs, dict(data), report, top_n=settings.top_n,
                            progress=progress)
        report.seconds = round(time.perf_counter() - start, 3)
        # out_dir relative to OUT in the file: OUT may be mounted elsewhere (a shard's pod) or
        # moved, and N shards must write what one run writes
        _write_json(partial / DONE_MARKER, {**report.to_json(), "out_dir": name})
        _publish(partial, final)
    except DFFError as exc:
        _rmtree(partial)
        report.status = "failed"
        report.error = str(exc) if isinstance(exc, TooFewImages) else \
            f"{type(exc).__name__}: {exc}"
        if read_errors:
            why = sorted({d.reason for d in read_errors})[:2]
            report.error += f" ({len(read_errors)} file(s) unreadable: {'; '.join(why)})"
        report.errors = error_list([*read_errors, *getattr(exc, "decisions", [])])
        report.n_errors = len(report.errors)
    report.seconds = round(time.perf_counter() - start, 3)
    return report


def _json_safe(obj: Any) -> Any:
    """``obj`` with NaN and infinities as null: JSON has no such numbers (Python would write
    ``NaN``, which JSON readers refuse)."""
    if isinstance(obj, float):
        return obj if obj == obj and abs(obj) != float("inf") else None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    return obj


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(_json_safe(obj), fh, indent=2, sort_keys=True, default=str, allow_nan=False)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _publish(partial: Path, final: Path) -> None:
    """Move a finished class folder into place; an older version (force) is replaced."""
    _fsync_dir(partial)
    old = final.with_name(f".{final.name}.old")
    _rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(partial, final)
    _fsync_dir(final.parent)
    _rmtree(old)


# ---------------------------------------------------------------------------- the batch

def pipeline_pays(discoverer: Any) -> bool:
    """Whether overlapping classes shortens the export: yes when the features are computed
    elsewhere (feature servers, an engine) or on a GPU; no for the embedded extractor on the
    CPU, which already keeps every core busy. On the 2-core benchmark machine
    (benchmarks/bench_export.py, int8, 3 classes) the overlapped export was 11% slower while
    ONNX Runtime's idle threads spun, and 2-4% faster once they no longer do (40 and 120
    photos per class): about what one run varies, for two classes held in memory at once."""
    providers = getattr(getattr(discoverer, "source", None), "providers", None)
    if providers:
        return str(providers[0]) != "CPUExecutionProvider"
    return True


def make_discoverer(settings: ExportSettings) -> Discoverer:
    if settings.engine:
        from exporter.remote import EngineDiscoverer

        return EngineDiscoverer(settings.engine, timeout=settings.timeout)
    if settings.feature_servers:
        return LocalDiscoverer.remote_features(settings.feature_servers, settings.timeout,
                                               settings.client_decode,
                                               settings.client_prepare)
    return LocalDiscoverer.embedded()


def shard_classes(classes: Sequence[tuple[str, Path]], index: int, count: int
                  ) -> list[tuple[str, Path]]:
    """Shard ``index`` of ``count`` (0-based): the classes sorted by name, taken round-robin
    (class j goes to shard j mod count). Every class is in exactly one shard; the share
    depends only on the class names."""
    if count < 1 or not 0 <= index < count:
        raise InvalidInput(f"shard {index}/{count}: need 0 <= I < N")
    ordered = sorted(classes, key=lambda c: c[0])
    return [c for j, c in enumerate(ordered) if j % count == index]


def export(classes: Sequence[tuple[str, Path]], settings: ExportSettings,
           discoverer: Discoverer | None = None,
           progress_for: Callable[[str], Progress | None] | None = None,
           on_class: Callable[[ClassReport], None] | None = None,
           site_index: bool = True) -> list[ClassReport]:
    """Export every class; returns one report per class (done, skipped or failed), in the
    order of ``classes``; ``on_class`` is called in that order too. With ``settings.pipeline``
    and several classes to do, class i's fit/render/write overlaps class i+1's extraction.
    Finally OUT/index.html (every finished class in OUT) is rebuilt when ``site_index``."""
    check_class_names(classes)
    pending = [n for n, _ in classes if settings.force or not is_done(Path(settings.out) / n)]
    own = discoverer is None and bool(pending)
    if own:  # models are loaded (or servers connected) only when there is work to do
        discoverer = make_discoverer(settings)

    def one(name: str, folder: Path) -> ClassReport:
        progress = progress_for(name) if progress_for else None
        try:
            # None only when nothing is pending: every class is then skipped unused
            return export_class(name, folder, settings, cast(Discoverer, discoverer), progress)
        finally:
            close = getattr(progress, "close", None)
            if callable(close):
                close()

    try:
        pipeline = settings.pipeline
        if pipeline is None:
            pipeline = discoverer is not None and pipeline_pays(discoverer)
        if pipeline and len(pending) > 1:
            reports = _pipelined(classes, one, on_class)
        else:
            reports = []
            for name, folder in classes:
                reports.append(one(name, folder))
                if on_class:
                    on_class(reports[-1])
    finally:
        if own and discoverer is not None:
            discoverer.close()
    if site_index:  # every run builds it, also a shard with no class of its own
        from exporter.site_index import write_site_index

        Path(settings.out).mkdir(parents=True, exist_ok=True)
        write_site_index(Path(settings.out))
    return reports


def _pipelined(classes: Sequence[tuple[str, Path]], one: Callable[[str, Path], ClassReport],
               on_class: Callable[[ClassReport], None] | None,
               in_flight: int = 2) -> list[ClassReport]:
    """Run ``one`` for every class with at most ``in_flight`` classes at once (daemon threads,
    so an interrupted run does not wait for them), reporting in class order."""
    slots = threading.Semaphore(in_flight)
    futures: list[concurrent.futures.Future[ClassReport]] = []
    reports: list[ClassReport] = []

    def run(fut: concurrent.futures.Future[ClassReport], name: str, folder: Path) -> None:
        try:
            fut.set_result(one(name, folder))
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            fut.set_exception(exc)
        finally:
            slots.release()

    def flush(block: bool) -> None:
        while len(reports) < len(futures) and (block or futures[len(reports)].done()):
            reports.append(futures[len(reports)].result())  # re-raises a worker's exception
            if on_class:
                on_class(reports[-1])

    for name, folder in classes:
        slots.acquire()
        flush(block=False)
        fut: concurrent.futures.Future[ClassReport] = concurrent.futures.Future()
        futures.append(fut)
        threading.Thread(target=run, args=(fut, name, folder), daemon=True,
                         name=f"dff-class-{name}").start()
    flush(block=True)
    return reports

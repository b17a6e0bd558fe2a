"""The batch export: one concept set (HDF5 + pictures + index.html) per class folder.

    DATA/<class>/*.jpg  ->  OUT/<class>/{concepts.h5, index.html, k_sweep.png, grids/,
                                         overlays/concept_NN/, combined/, summary.json}

Resumable and atomic: a class is built in ``OUT/.<class>.partial/`` and renamed to
``OUT/<class>/`` only when complete, with ``summary.json`` written last inside it (the done
marker). A killed run leaves at most a ``.partial`` folder, which the next run deletes and
redoes; finished classes are skipped unless ``force``. An advisory lock (``OUT/.<class>.lock``)
keeps two runs from writing the same class at once. Discovery itself runs in-process
(``concept_engine.discovery.discover`` over a FeatureSource: the embedded ONNX Runtime extractor
or feature servers) or on a concept engine service (``EngineDiscoverer``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from dff_protos.errors import DFFError, InvalidInput, NotFound, TooFewImages

log = logging.getLogger(__name__)

DONE_MARKER = "summary.json"
CONCEPTS_FILE = "concepts.h5"
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"})

Progress = Callable[..., None]  # progress(stage, done, total, message="")


# ---------------------------------------------------------------------------- settings

@dataclass(frozen=True)
class ExportSettings:
    """Everything a batch export needs, built once at the entry point.

    ``discovery`` holds keyword arguments of ``concept_engine.discovery.DiscoveryOptions``
    (k, k_min, k_max, k_criterion, solver, seed, filter modes and thresholds, ...); the class
    name is filled in per class.
    """

    out: Path
    discovery: dict[str, Any] = field(default_factory=dict)
    feature_servers: tuple[str, ...] = ()
    engine: str = ""
    force: bool = False
    top_n: int = 8
    timeout: float = 3600.0
    show_progress: bool = True


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

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------- inputs

def _has_images(folder: Path) -> bool:
    return any(p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES for p in folder.iterdir())


def find_classes(data_dir: Path) -> list[tuple[str, Path]]:
    """(class name, folder) pairs: data_dir itself when it holds images, else each sub-folder
    that holds images (sorted). Raises NotFound / InvalidInput with a helpful message."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise NotFound(f"no such folder: {data_dir}")
    if _has_images(data_dir):
        return [(data_dir.resolve().name, data_dir)]
    classes = sorted((p.name, p) for p in data_dir.iterdir()
                     if p.is_dir() and not p.name.startswith(".") and _has_images(p))
    if not classes:
        raise InvalidInput(f"{data_dir} holds no images and no sub-folders with images "
                           f"(looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    return classes


def list_images(folder: Path) -> list[tuple[str, Path]]:
    """(id, path) of a class folder's image files, sorted; id = path relative to the folder."""
    from feature_server.images import read_items

    return read_items(folder)


def read_bytes(items: Sequence[tuple[str, Path]]) -> list[tuple[str, bytes]]:
    return [(i, Path(p).read_bytes()) for i, p in items]


# ---------------------------------------------------------------------------- discovery

class Discoverer(Protocol):
    """Runs discovery for one class: images in, a concept_engine.store.ConceptSet out."""

    def discover(self, name: str, items: list[tuple[str, bytes]], options: dict[str, Any],
                 progress: Progress | None = None) -> Any: ...

    def close(self) -> None: ...


def discovery_options(name: str, options: dict[str, Any]) -> Any:
    """A DiscoveryOptions for one class from the settings' keyword arguments."""
    from concept_engine.discovery import DiscoveryOptions

    known = {f.name for f in dataclasses.fields(DiscoveryOptions)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise InvalidInput(f"unknown discovery options {unknown}")
    kwargs = dict(options)
    kwargs["name"] = name
    return DiscoveryOptions(**kwargs)


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


def make_source(feature_servers: Sequence[str] = (), timeout: float = 3600.0) -> Any:
    """The FeatureSource: feature servers when addresses are given, else in-process."""
    if feature_servers:
        from feature_server.client import FeatureClient

        return FeatureClient(list(feature_servers), timeout=timeout)
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
                  threshold: float | None = None, min_area: float | None = None,
                  progress: Callable[[int, int], None] | None = None) -> list[Any]:
    """Explanations (concept_engine.discovery.Explanation) of items with cs's bases fixed,
    in the order of items."""
    from concept_engine.discovery import explain

    source = make_source(feature_servers, timeout)
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


class LocalDiscoverer:
    """discover() in this process over a FeatureSource (embedded extractor or feature servers)."""

    def __init__(self, source: Any) -> None:
        self.source = source

    @classmethod
    def embedded(cls) -> LocalDiscoverer:
        return cls(make_source())

    @classmethod
    def remote_features(cls, addresses: Sequence[str], timeout: float) -> LocalDiscoverer:
        return cls(make_source(addresses, timeout))

    def discover(self, name: str, items: list[tuple[str, bytes]], options: dict[str, Any],
                 progress: Progress | None = None) -> Any:
        from concept_engine.discovery import discover

        return discover(items, self.source, discovery_options(name, options),
                        progress=engine_progress(progress))

    def close(self) -> None:
        close = getattr(self.source, "close", None)
        if callable(close):
            close()


# ---------------------------------------------------------------------------- one class

def is_done(class_dir: Path) -> bool:
    return (class_dir / DONE_MARKER).is_file() and (class_dir / CONCEPTS_FILE).is_file()


def _rmtree(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def _decision_dicts(decisions: Sequence[Any]) -> list[dict[str, Any]]:
    out = []
    for d in decisions:
        row = dataclasses.asdict(d) if dataclasses.is_dataclass(d) else dict(d)
        for key in ("score", "probability"):
            v = row.get(key)
            if isinstance(v, float) and v != v:
                row[key] = None
        out.append(row)
    return out


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


def _image_results(cs: Any, paths: dict[str, Path]) -> Iterator[Any]:
    from exporter.report import ImageResult, decode_image

    for i, image_id in enumerate(cs.image_ids):
        image = decode_image(paths[image_id].read_bytes())
        yield ImageResult(id=image_id, image=image, polygons=cs.polygons[i],
                          certainties=np.asarray(cs.certainties[i]))


def write_class_outputs(class_dir: Path, cs: Any, paths: dict[str, Path], report: ClassReport,
                        *, top_n: int = 8, progress: Progress | None = None) -> None:
    """concepts.h5, pictures and index.html of one concept set into class_dir (not summary)."""
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
    data = ReportData(name=cs.name, k=cs.k, k_reason=cs.k_reason,
                      curves={c: {int(k): float(v) for k, v in curve.items()}
                              for c, curve in cs.k_curves.items()},
                      decisions=_decision_dicts(cs.decisions),
                      summary=_summary_table(report, cs), notices=list(cs.notices))
    write_report(class_dir, _image_results(cs, paths), data, top_n=top_n,
                 total=cs.n_images,
                 progress=(lambda d, t: progress("render", d, t)) if progress else None)
    report.stage_seconds["render"] = round(time.perf_counter() - t0, 3)


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
def _class_lock(out: Path, name: str) -> Iterator[bool]:
    """An advisory lock on OUT/.<class>.lock: False when another run holds it (e.g. a retried
    Kubernetes Job pod while the old one still runs)."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f".{name}.lock", "a+") as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def export_class(name: str, folder: Path, settings: ExportSettings, discoverer: Discoverer,
                 progress: Progress | None = None) -> ClassReport:
    """Discover and write one class atomically (see the module docstring)."""
    out = Path(settings.out)
    final = out / name
    report = ClassReport(name=name, status="done", out_dir=str(final))
    if is_done(final) and not settings.force:
        return _previous(final)
    with _class_lock(out, name) as locked:
        if not locked:
            report.status = "failed"
            report.error = f"another dff discover is writing {final} (lock {out}/.{name}.lock)"
            return report
        return _export_class_locked(name, folder, settings, discoverer, progress, report)


def _previous(final: Path) -> ClassReport:
    previous = json.loads((final / DONE_MARKER).read_text())
    previous["status"] = "skipped"
    known = {f.name for f in dataclasses.fields(ClassReport)}
    return ClassReport(**{k: v for k, v in previous.items() if k in known})


def _export_class_locked(name: str, folder: Path, settings: ExportSettings,
                         discoverer: Discoverer, progress: Progress | None,
                         report: ClassReport) -> ClassReport:
    out = Path(settings.out)
    final = out / name
    if is_done(final) and not settings.force:  # finished by a run that held the lock before us
        return _previous(final)
    if final.exists() and not is_done(final) and not settings.force:
        report.status = "failed"
        report.error = (f"{final} exists but is not a finished dff export (no {DONE_MARKER}); "
                        "move it away or use --force to replace it")
        return report
    start = time.perf_counter()
    partial = out / f".{name}.partial"
    _rmtree(partial)  # a previous run was killed here: redo the class from scratch
    out.mkdir(parents=True, exist_ok=True)
    try:
        items = list_images(folder)
        report.n_images = len(items)
        t0 = time.perf_counter()
        data = read_bytes(items)
        read_s = time.perf_counter() - t0
        cs = discoverer.discover(name, data, settings.discovery, progress)
        report.stage_seconds = {"read": round(read_s, 3)}
        report.stage_seconds.update({k: round(float(v), 3) for k, v in cs.stage_seconds.items()})
        report.n_kept = cs.n_images
        report.dropped = dropped_counts(cs.decisions)
        report.k, report.k_reason, report.k_criterion = cs.k, cs.k_reason, cs.k_criterion
        report.notices = list(cs.notices)
        report.concept_set_id = cs.id
        partial.mkdir(parents=True)
        write_class_outputs(partial, cs, dict(items), report, top_n=settings.top_n,
                            progress=progress)
        report.seconds = round(time.perf_counter() - start, 3)
        _write_json(partial / DONE_MARKER, report.to_json())
        _publish(partial, final)
    except TooFewImages as exc:
        _rmtree(partial)
        report.status, report.error = "failed", str(exc)
    except DFFError as exc:
        _rmtree(partial)
        report.status, report.error = "failed", f"{type(exc).__name__}: {exc}"
    report.seconds = round(time.perf_counter() - start, 3)
    return report


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=2, sort_keys=True, default=str)
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

def make_discoverer(settings: ExportSettings) -> Discoverer:
    if settings.engine:
        from exporter.remote import EngineDiscoverer

        return EngineDiscoverer(settings.engine, timeout=settings.timeout)
    if settings.feature_servers:
        return LocalDiscoverer.remote_features(settings.feature_servers, settings.timeout)
    return LocalDiscoverer.embedded()


def export(classes: Sequence[tuple[str, Path]], settings: ExportSettings,
           discoverer: Discoverer | None = None,
           progress_for: Callable[[str], Progress | None] | None = None,
           on_class: Callable[[ClassReport], None] | None = None) -> list[ClassReport]:
    """Export every class; returns one report per class (done, skipped or failed)."""
    pending = [n for n, _ in classes if settings.force or not is_done(Path(settings.out) / n)]
    reports: list[ClassReport] = []
    own = discoverer is None and bool(pending)
    if own:  # models are loaded (or servers connected) only when there is work to do
        discoverer = make_discoverer(settings)
    try:
        for name, folder in classes:
            progress = progress_for(name) if progress_for else None
            report = export_class(name, folder, settings,
                                  discoverer,  # type: ignore[arg-type] - None only when all done
                                  progress)
            close = getattr(progress, "close", None)
            if callable(close):
                close()
            reports.append(report)
            if on_class:
                on_class(report)
    finally:
        if own and discoverer is not None:
            discoverer.close()
    return reports

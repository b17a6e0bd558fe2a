"""Concept sets on disk: one HDF5 file per concept set, and a folder of them (``ConceptSetStore``).

Schema (version 1). Every group and the file root carry an integer attribute
``schema_version``; all names below are defined once in :class:`Names`. Big arrays are chunked
(one image per chunk) and gzip-compressed (level 4, shuffle); small ones are stored plainly.
Strings are variable-length UTF-8. A file is written to a temporary name in the same folder and
moved into place with ``os.replace``, so a reader never sees a half-written file and a failed
write leaves nothing under the final name::

    /                          attrs: schema_version=1, format="dff-concept-set", id, name,
                                      created (ISO 8601 UTC), k, n_images, model, layer,
                                      k_reason, provenance_json, notices_json,
                                      stage_seconds_json
    /bases                     (k, C) float32            concept bases H (rows = concepts)
    /images/                   attrs: schema_version
        ids                    (N,) str                  kept (training) images, in fit order
        original_sizes         (N, 2) int32              (height, width) as decoded
        input_sizes            (N, 2) int32              (height, width) fed to the network
        heatmap_sizes          (N, 2) int32              (h, w) of each image's feature maps
        heatmaps               (N, k, hmax, wmax) float32  raw W at feature resolution, image i
                                                         valid in [:, :h_i, :w_i], zero-padded
                                                         (sizes differ only with keep_aspect)
        certainties            (N, k) float32            concept certainty per image
    /regions/                  attrs: schema_version, threshold, min_area
        points                 (P, 2) int32              x, y in ORIGINAL image pixels
        offsets                (M + 1,) int64            polygon m = points[offsets[m]:offsets[m+1]]
        owner                  (M, 2) int32              (image index, concept index) of polygon m
    /decisions/                attrs: schema_version   one row per (image, stage) verdict, for
                                                         ALL input images (errors included)
        ids, stage, reason     (D,) str
        kept                   (D,) bool
        score, probability     (D,) float64              NaN when not applicable
    /k_sweep/                  attrs: schema_version, criterion, chosen_k, reason
        <criterion>/k          (n,) int32                one subgroup per criterion measured
        <criterion>/value      (n,) float64

``provenance_json`` holds model name, weights sha256, layer, preprocessing and size policy,
k and how it was chosen, solver, init, iterations, final error, seed, software version,
created time and the full input image list.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from dff_protos.errors import DataLoss, DFFError, InvalidInput, NotFound

from concept_engine.finegrain import Decision

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)
FORMAT = "dff-concept-set"
SUFFIX = ".h5"
# matched with fullmatch: '$' alone would let a trailing newline through ("ant\n")
_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class Names:
    """Every HDF5 name of the schema, in one place."""

    SCHEMA_VERSION = "schema_version"
    FORMAT = "format"
    ID = "id"
    NAME = "name"
    CREATED = "created"
    K = "k"
    N_IMAGES = "n_images"
    MODEL = "model"
    LAYER = "layer"
    K_REASON = "k_reason"
    PROVENANCE = "provenance_json"
    NOTICES = "notices_json"
    STAGE_SECONDS = "stage_seconds_json"
    BASES = "bases"
    IMAGES = "images"
    IDS = "ids"
    ORIGINAL_SIZES = "original_sizes"
    INPUT_SIZES = "input_sizes"
    HEATMAP_SIZES = "heatmap_sizes"
    HEATMAPS = "heatmaps"
    CERTAINTIES = "certainties"
    REGIONS = "regions"
    POINTS = "points"
    OFFSETS = "offsets"
    OWNER = "owner"
    THRESHOLD = "threshold"
    MIN_AREA = "min_area"
    DECISIONS = "decisions"
    STAGE = "stage"
    REASON = "reason"
    KEPT = "kept"
    SCORE = "score"
    PROBABILITY = "probability"
    K_SWEEP = "k_sweep"
    CRITERION = "criterion"
    CHOSEN_K = "chosen_k"
    VALUE = "value"
    # version 2
    CONCEPTS = "concepts"
    STABILITY = "stability"
    STABILITY_INTERVAL = "stability_interval"
    CONCEPT_NAMES = "names"
    PRESENCE_THRESHOLD = "presence_threshold"
    SET_STABILITY = "set_stability"
    MEAN_STABILITY = "mean_stability"
    OOD_THRESHOLD = "ood_error_threshold"
    RECONSTRUCTION_ERRORS = "reconstruction_errors"
    HIERARCHY = "hierarchy"
    PARENTS = "parents"
    COSINES = "parent_cosine"
    TOP_IMAGE = "top_image"
    NODE = "node"
    # dimension scales (root datasets; netCDF-4 / xarray read them as named dimensions)
    DIM_IMAGE = "image"
    DIM_CONCEPT = "concept"
    DIM_CHANNEL = "channel"
    DIM_Y = "y"
    DIM_X = "x"
    DIM_HW = "hw"
    DIM_XY = "xy"
    DIM_BOUND = "bound"
    DIM_POINT = "point"
    DIM_POLYGON = "polygon"
    DIM_OFFSET = "polygon_offset"
    DIM_OWNER = "owner_index"
    DIM_DECISION = "decision"


@dataclass
class ConceptSet:
    """A discovered concept set (what ``discover`` returns and the store saves).

    bases (k, C) float32; per kept image i (N of them): heatmaps[i] (k, h_i, w_i) float32 raw W
    at feature resolution, certainties (N, k), original_sizes / input_sizes (N, 2) as (height,
    width), polygons[i][j] list of (n, 2) int32 x, y contours of concept j in image i.
    ``decisions`` covers every input image (one entry per stage that judged it).
    ``k_curves`` criterion -> {k: value}. ``provenance`` is JSON-serialisable."""

    name: str
    bases: np.ndarray
    image_ids: list[str]
    heatmaps: list[np.ndarray]
    certainties: np.ndarray
    original_sizes: np.ndarray
    input_sizes: np.ndarray
    polygons: list[list[list[np.ndarray]]]
    decisions: list[Decision] = field(default_factory=list)
    k_curves: dict[str, dict[int, float]] = field(default_factory=dict)
    k_criterion: str = ""
    k_reason: str = ""
    threshold: float = 0.75
    min_area: float = 0.01
    provenance: dict[str, Any] = field(default_factory=dict)
    notices: list[str] = field(default_factory=list)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    id: str = ""
    created: str = ""
    # schema version 2 (None / NaN / empty when read from a version-1 file)
    stability: np.ndarray | None = None  # (k,) bootstrap stability per concept
    stability_interval: np.ndarray | None = None  # (k, 2) its 5%-95% interval
    set_stability: float = float("nan")  # split-half stability at the chosen k
    concept_names: list[str] = field(default_factory=list)  # (k,) "" = unnamed
    presence_threshold: np.ndarray | None = None  # (k,) certainty a concept needs to be present
    reconstruction_errors: np.ndarray | None = None  # (N,) relative error per training image
    ood_threshold: float = float("inf")  # relative error beyond which an image is OOD
    hierarchy: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)
    schema_version: int = 2

    def concept_label(self, j: int) -> str:
        """The name given by `dff label`, else 'concept j'."""
        if j < len(self.concept_names) and self.concept_names[j]:
            return self.concept_names[j]
        return f"concept {j}"

    @property
    def k(self) -> int:
        return int(self.bases.shape[0])

    @property
    def n_images(self) -> int:
        return len(self.image_ids)


@dataclass(frozen=True)
class ConceptSetSummary:
    """What listing needs, read from root attributes only (no arrays)."""

    id: str
    name: str
    k: int
    n_images: int
    model: str
    layer: str
    created: str
    k_reason: str
    set_stability: float = float("nan")  # schema 2; NaN for version-1 files


def utc_now() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


def _str_dtype():
    return h5py.string_dtype("utf-8")


def _write_strings(group: h5py.Group, name: str, values: list[str]) -> None:
    group.create_dataset(name, data=np.array(values, dtype=object), dtype=_str_dtype())


def _read_strings(group: h5py.Group, name: str) -> list[str]:
    if len(group[name]) == 0:
        return []
    return [str(v) for v in group[name].asstr()[()]]


def _big(group: h5py.Group, name: str, data: np.ndarray, chunks: tuple[int, ...]) -> None:
    if data.size == 0:
        group.create_dataset(name, data=data)
        return
    chunks = tuple(max(1, min(c, s)) for c, s in zip(chunks, data.shape, strict=True))
    group.create_dataset(name, data=data, chunks=chunks, compression="gzip",
                         compression_opts=4, shuffle=True)


def _group(parent: h5py.Group, name: str) -> h5py.Group:
    g = parent.create_group(name)
    g.attrs[Names.SCHEMA_VERSION] = SCHEMA_VERSION
    return g


def _write(f: h5py.File, cs: ConceptSet) -> None:
    k = cs.k
    n = cs.n_images
    f.attrs[Names.SCHEMA_VERSION] = SCHEMA_VERSION
    f.attrs[Names.FORMAT] = FORMAT
    f.attrs[Names.ID] = cs.id
    f.attrs[Names.NAME] = cs.name
    f.attrs[Names.CREATED] = cs.created or utc_now()
    f.attrs[Names.K] = k
    f.attrs[Names.N_IMAGES] = n
    f.attrs[Names.MODEL] = str(cs.provenance.get("model", ""))
    f.attrs[Names.LAYER] = str(cs.provenance.get("layer", ""))
    f.attrs[Names.K_REASON] = cs.k_reason
    f.attrs[Names.PROVENANCE] = json.dumps(cs.provenance, sort_keys=True, default=str)
    f.attrs[Names.NOTICES] = json.dumps(list(cs.notices))
    f.attrs[Names.STAGE_SECONDS] = json.dumps(cs.stage_seconds, sort_keys=True)
    f.create_dataset(Names.BASES, data=np.asarray(cs.bases, dtype=np.float32))

    images = _group(f, Names.IMAGES)
    _write_strings(images, Names.IDS, list(cs.image_ids))
    images.create_dataset(Names.ORIGINAL_SIZES,
                          data=np.asarray(cs.original_sizes, np.int32).reshape(n, 2))
    images.create_dataset(Names.INPUT_SIZES,
                          data=np.asarray(cs.input_sizes, np.int32).reshape(n, 2))
    sizes = np.array([m.shape[1:] for m in cs.heatmaps], dtype=np.int32).reshape(n, 2)
    images.create_dataset(Names.HEATMAP_SIZES, data=sizes)
    hmax = int(sizes[:, 0].max()) if n else 0
    wmax = int(sizes[:, 1].max()) if n else 0
    padded = np.zeros((n, k, hmax, wmax), dtype=np.float32)
    for i, m in enumerate(cs.heatmaps):
        padded[i, :, :m.shape[1], :m.shape[2]] = m
    _big(images, Names.HEATMAPS, padded, (1, k, hmax, wmax))
    _big(images, Names.CERTAINTIES, np.asarray(cs.certainties, np.float32).reshape(n, k),
         (4096, k))

    regions = _group(f, Names.REGIONS)
    regions.attrs[Names.THRESHOLD] = float(cs.threshold)
    regions.attrs[Names.MIN_AREA] = float(cs.min_area)
    points, offsets, owner = [], [0], []
    for i, per_image in enumerate(cs.polygons):
        for j, polys in enumerate(per_image):
            for p in polys:
                p = np.asarray(p, dtype=np.int32).reshape(-1, 2)
                points.append(p)
                offsets.append(offsets[-1] + len(p))
                owner.append((i, j))
    flat = np.concatenate(points) if points else np.zeros((0, 2), np.int32)
    _big(regions, Names.POINTS, flat.astype(np.int32), (65536, 2))
    regions.create_dataset(Names.OFFSETS, data=np.asarray(offsets, dtype=np.int64))
    regions.create_dataset(Names.OWNER, data=np.asarray(owner, np.int32).reshape(-1, 2))

    dec = _group(f, Names.DECISIONS)
    _write_strings(dec, Names.IDS, [d.id for d in cs.decisions])
    _write_strings(dec, Names.STAGE, [d.stage for d in cs.decisions])
    _write_strings(dec, Names.REASON, [d.reason for d in cs.decisions])
    dec.create_dataset(Names.KEPT, data=np.array([d.kept for d in cs.decisions], dtype=bool))
    dec.create_dataset(Names.SCORE, data=np.array([d.score for d in cs.decisions], np.float64))
    dec.create_dataset(Names.PROBABILITY,
                       data=np.array([d.probability for d in cs.decisions], np.float64))

    sweep = _group(f, Names.K_SWEEP)
    sweep.attrs[Names.CRITERION] = cs.k_criterion
    sweep.attrs[Names.CHOSEN_K] = k
    sweep.attrs[Names.REASON] = cs.k_reason
    for criterion, curve in sorted(cs.k_curves.items()):
        g = _group(sweep, criterion)
        ks = sorted(curve)
        g.create_dataset(Names.K, data=np.asarray(ks, dtype=np.int32))
        g.create_dataset(Names.VALUE, data=np.asarray([curve[x] for x in ks], dtype=np.float64))


def _dim(f: h5py.File, name: str, n: int) -> h5py.Dataset:
    ds = f.create_dataset(name, data=np.arange(n, dtype=np.int32))
    ds.make_scale(name)
    return ds


def _attach(ds: h5py.Dataset, *scales: h5py.Dataset) -> None:
    for axis, scale in enumerate(scales):
        ds.dims[axis].attach_scale(scale)


def _write_v2(f: h5py.File, cs: ConceptSet) -> None:
    """The version-2 additions: reliability, names, training statistics, hierarchy, and
    dimension scales on every array (xarray/h5netcdf see named dimensions)."""
    k, n = cs.k, cs.n_images
    nan = np.float32(np.nan)
    stab = (np.full(k, nan) if cs.stability is None
            else np.asarray(cs.stability, np.float32).reshape(k))
    interval = (np.full((k, 2), nan) if cs.stability_interval is None
                else np.asarray(cs.stability_interval, np.float32).reshape(k, 2))
    f.attrs[Names.SET_STABILITY] = float(cs.set_stability)
    f.attrs[Names.MEAN_STABILITY] = float(np.mean(stab)) if k else float("nan")
    f.attrs[Names.OOD_THRESHOLD] = float(cs.ood_threshold)
    concepts = _group(f, Names.CONCEPTS)
    concepts.create_dataset(Names.STABILITY, data=stab)
    concepts.create_dataset(Names.STABILITY_INTERVAL, data=interval)
    names = list(cs.concept_names) + [""] * (k - len(cs.concept_names))
    _write_strings(concepts, Names.CONCEPT_NAMES, names[:k])
    presence = (np.zeros(k, np.float32) if cs.presence_threshold is None
                else np.asarray(cs.presence_threshold, np.float32).reshape(k))
    concepts.create_dataset(Names.PRESENCE_THRESHOLD, data=presence)
    errors = (np.full(n, nan) if cs.reconstruction_errors is None
              else np.asarray(cs.reconstruction_errors, np.float32).reshape(n))
    f[Names.IMAGES].create_dataset(Names.RECONSTRUCTION_ERRORS, data=errors)
    tree = _group(f, Names.HIERARCHY)
    for kk, node in sorted(cs.hierarchy.items()):
        g = _group(tree, f"k{int(kk)}")
        scale = g.create_dataset(Names.NODE, data=np.arange(int(kk), dtype=np.int32))
        scale.make_scale(Names.NODE)
        g.create_dataset(Names.BASES, data=np.asarray(node["bases"], np.float32))
        g.create_dataset(Names.PARENTS, data=np.asarray(node["parents"], np.int32))
        g.create_dataset(Names.COSINES, data=np.asarray(node["cosines"], np.float32))
        g.create_dataset(Names.TOP_IMAGE, data=np.asarray(node["top_image"], np.int32))
        for name in (Names.BASES, Names.PARENTS, Names.COSINES, Names.TOP_IMAGE):
            g[name].dims[0].attach_scale(scale)

    # dimension scales
    images, regions, dec = f[Names.IMAGES], f[Names.REGIONS], f[Names.DECISIONS]
    heat = images[Names.HEATMAPS]
    d_image, d_concept = _dim(f, Names.DIM_IMAGE, n), _dim(f, Names.DIM_CONCEPT, k)
    d_channel = _dim(f, Names.DIM_CHANNEL, int(np.asarray(cs.bases).shape[1]))
    d_y, d_x = _dim(f, Names.DIM_Y, heat.shape[2]), _dim(f, Names.DIM_X, heat.shape[3])
    d_hw, d_xy = _dim(f, Names.DIM_HW, 2), _dim(f, Names.DIM_XY, 2)
    d_bound = _dim(f, Names.DIM_BOUND, 2)
    _attach(f[Names.BASES], d_concept, d_channel)
    for tree_k in tree.values():
        tree_k[Names.BASES].dims[1].attach_scale(d_channel)
    _attach(concepts[Names.STABILITY], d_concept)
    _attach(concepts[Names.STABILITY_INTERVAL], d_concept, d_bound)
    _attach(concepts[Names.CONCEPT_NAMES], d_concept)
    _attach(concepts[Names.PRESENCE_THRESHOLD], d_concept)
    _attach(images[Names.IDS], d_image)
    for name in (Names.ORIGINAL_SIZES, Names.INPUT_SIZES, Names.HEATMAP_SIZES):
        _attach(images[name], d_image, d_hw)
    _attach(heat, d_image, d_concept, d_y, d_x)
    _attach(images[Names.CERTAINTIES], d_image, d_concept)
    _attach(images[Names.RECONSTRUCTION_ERRORS], d_image)
    d_point = _dim(f, Names.DIM_POINT, regions[Names.POINTS].shape[0])
    d_polygon = _dim(f, Names.DIM_POLYGON, regions[Names.OWNER].shape[0])
    d_offset = _dim(f, Names.DIM_OFFSET, regions[Names.OFFSETS].shape[0])
    d_owner = _dim(f, Names.DIM_OWNER, 2)
    _attach(regions[Names.POINTS], d_point, d_xy)
    _attach(regions[Names.OFFSETS], d_offset)
    _attach(regions[Names.OWNER], d_polygon, d_owner)
    d_dec = _dim(f, Names.DIM_DECISION, dec[Names.KEPT].shape[0])
    for name in (Names.IDS, Names.STAGE, Names.REASON, Names.KEPT, Names.SCORE,
                 Names.PROBABILITY):
        _attach(dec[name], d_dec)
    for g in f[Names.K_SWEEP].values():
        g[Names.K].make_scale(Names.K)
        g[Names.VALUE].dims[0].attach_scale(g[Names.K])


def save_concept_set(path: str | os.PathLike[str], cs: ConceptSet) -> Path:
    """Write ``cs`` to ``path`` atomically (temp file in the same folder + os.replace).
    If anything fails, no file exists under ``path`` afterwards (an older one stays intact)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if len(cs.heatmaps) != cs.n_images or len(cs.polygons) != cs.n_images:
        raise InvalidInput(f"concept set has {cs.n_images} images but {len(cs.heatmaps)} "
                           f"heatmaps and {len(cs.polygons)} polygon lists")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        with h5py.File(tmp, "w") as f:
            _write(f, cs)
            _write_v2(f, cs)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; a concept set is meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    log.info("saved concept set %r (k=%d, %d images) to %s", cs.name, cs.k, cs.n_images, path)
    return path


def _check_version(node: h5py.HLObject, where: str, expected: int | None = None) -> int:
    version = int(node.attrs.get(Names.SCHEMA_VERSION, -1))
    if version not in READABLE_VERSIONS:
        raise InvalidInput(f"{where}: schema_version {version} is not supported "
                           f"(this software reads {READABLE_VERSIONS})")
    if expected is not None and version != expected:
        raise DataLoss(f"{where}: schema_version {version} inside a version-{expected} file "
                       "(mixed or hand-edited; re-export it)")
    return version


def load_concept_set(path: str | os.PathLike[str]) -> ConceptSet:
    """Read a concept set written by :func:`save_concept_set`."""
    path = Path(path)
    if not path.is_file():
        raise NotFound(f"no concept set file at {path}")
    if not h5py.is_hdf5(path):
        raise InvalidInput(f"{path} is not an HDF5 file, so not a concept set")
    try:
        with h5py.File(path, "r") as f:
            version = _check_version(f, str(path))
            if f.attrs.get(Names.FORMAT) != FORMAT:
                raise InvalidInput(f"{path} is not a {FORMAT} file")
            cs = _READERS[version](f, str(path))
    except DFFError:
        raise
    except (OSError, KeyError, ValueError, TypeError, IndexError) as exc:
        # truncated, damaged or hand-edited: h5py's own message names neither file nor set
        raise DataLoss(f"{path}: the concept set file is damaged or incomplete "
                       f"({type(exc).__name__}: {exc})") from exc
    bases = np.asarray(cs.bases)
    if bases.ndim != 2 or not np.all(np.isfinite(bases)) or bases.min(initial=0.0) < 0:
        raise DataLoss(f"{path}: the concept bases (shape {bases.shape}) are not finite, "
                       "non-negative rows (damaged or hand-edited)")
    return cs


def _read_v2(f: h5py.File, where: str) -> ConceptSet:
    """Version 2 = version 1 + reliability, names, training statistics, hierarchy."""
    cs = _read_v1(f, where, version=2)
    _check_version(f[Names.CONCEPTS], f"{where}:/{Names.CONCEPTS}", 2)
    concepts = f[Names.CONCEPTS]
    cs.stability = concepts[Names.STABILITY][()]
    cs.stability_interval = concepts[Names.STABILITY_INTERVAL][()]
    names = _read_strings(concepts, Names.CONCEPT_NAMES)
    cs.concept_names = names if any(names) else []  # as a set no one named holds them
    cs.presence_threshold = concepts[Names.PRESENCE_THRESHOLD][()]
    cs.set_stability = float(f.attrs[Names.SET_STABILITY])
    cs.ood_threshold = float(f.attrs[Names.OOD_THRESHOLD])
    cs.reconstruction_errors = f[Names.IMAGES][Names.RECONSTRUCTION_ERRORS][()]
    for name, g in f[Names.HIERARCHY].items():
        cs.hierarchy[int(name[1:])] = {
            "bases": g[Names.BASES][()], "parents": g[Names.PARENTS][()],
            "cosines": g[Names.COSINES][()], "top_image": g[Names.TOP_IMAGE][()]}
    cs.schema_version = 2
    return cs


def _read_v1(f: h5py.File, where: str, version: int = 1) -> ConceptSet:
    """Version 1: bases, images, regions, decisions, k sweep (the golden file's layout)."""
    path = where
    for g in (Names.IMAGES, Names.REGIONS, Names.DECISIONS, Names.K_SWEEP):
        _check_version(f[g], f"{path}:/{g}", version)
    bases = f[Names.BASES][()]
    images = f[Names.IMAGES]
    ids = _read_strings(images, Names.IDS)
    sizes = images[Names.HEATMAP_SIZES][()]
    padded = images[Names.HEATMAPS][()]
    heat = [np.ascontiguousarray(padded[i, :, :h, :w]) for i, (h, w) in enumerate(sizes)]
    k = bases.shape[0]
    regions = f[Names.REGIONS]
    points = regions[Names.POINTS][()]
    offsets = regions[Names.OFFSETS][()]
    owner = regions[Names.OWNER][()]
    polygons: list[list[list[np.ndarray]]] = [[[] for _ in range(k)] for _ in ids]
    for m, (i, j) in enumerate(owner):
        polygons[int(i)][int(j)].append(points[offsets[m]:offsets[m + 1]].astype(np.int32))
    dec = f[Names.DECISIONS]
    d_ids = _read_strings(dec, Names.IDS)
    stages = _read_strings(dec, Names.STAGE)
    reasons = _read_strings(dec, Names.REASON)
    kept, score, prob = dec[Names.KEPT][()], dec[Names.SCORE][()], dec[Names.PROBABILITY][()]
    decisions = [Decision(d_ids[r], bool(kept[r]), stages[r], reasons[r], float(score[r]),
                          float(prob[r])) for r in range(len(d_ids))]
    sweep = f[Names.K_SWEEP]
    curves = {}
    for criterion, g in sweep.items():
        curves[criterion] = {int(a): float(b) for a, b in
                             zip(g[Names.K][()], g[Names.VALUE][()], strict=True)}
    return ConceptSet(
        name=str(f.attrs[Names.NAME]), bases=bases, image_ids=ids, heatmaps=heat,
        certainties=images[Names.CERTAINTIES][()],
        original_sizes=images[Names.ORIGINAL_SIZES][()],
        input_sizes=images[Names.INPUT_SIZES][()],
        polygons=polygons, decisions=decisions, k_curves=curves,
        k_criterion=str(sweep.attrs[Names.CRITERION]), k_reason=str(f.attrs[Names.K_REASON]),
        threshold=float(regions.attrs[Names.THRESHOLD]),
        min_area=float(regions.attrs[Names.MIN_AREA]),
        provenance=json.loads(f.attrs[Names.PROVENANCE]),
        notices=json.loads(f.attrs[Names.NOTICES]),
        stage_seconds=json.loads(f.attrs[Names.STAGE_SECONDS]),
        id=str(f.attrs[Names.ID]), created=str(f.attrs[Names.CREATED]), schema_version=1)


_READERS = {1: _read_v1, 2: _read_v2}


def read_summary(path: str | os.PathLike[str]) -> ConceptSetSummary:
    """Root attributes only: cheap enough for listing many sets."""
    with h5py.File(path, "r") as f:
        _check_version(f, str(path))
        a = f.attrs
        return ConceptSetSummary(str(a[Names.ID]), str(a[Names.NAME]), int(a[Names.K]),
                                 int(a[Names.N_IMAGES]), str(a[Names.MODEL]),
                                 str(a[Names.LAYER]), str(a[Names.CREATED]),
                                 str(a[Names.K_REASON]),
                                 float(a.get(Names.SET_STABILITY, float("nan"))))


def safe_id(text: str) -> str:
    """A safe id fragment from any text (letters, digits, '.', '_', '-'; no leading dot)."""
    s = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._-")
    return s[:64] or "concepts"


class ConceptSetStore:
    """A folder of concept sets, ``<root>/<id>.h5``. Ids are safe names (``[A-Za-z0-9][A-Za-z0-9
    ._-]*``, at most 128 characters); anything else - path separators, '..', absolute paths - is
    refused with InvalidInput before the file system is touched."""

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, concept_set_id: str) -> Path:
        if not isinstance(concept_set_id, str) or not _ID_RE.fullmatch(concept_set_id) \
                or ".." in concept_set_id:
            raise InvalidInput(f"invalid concept set id {concept_set_id!r}")
        p = self.root / f"{concept_set_id}{SUFFIX}"
        if p.resolve().parent != self.root.resolve():
            raise InvalidInput(f"invalid concept set id {concept_set_id!r}")
        return p

    def new_id(self, name: str, created: str | None = None) -> str:
        """``<name>-<UTC timestamp>``, with a counter appended if taken."""
        stamp = re.sub(r"[^0-9T]", "", (created or utc_now()).split("+")[0])
        base = f"{safe_id(name)}-{stamp}"
        candidate, n = base, 1
        while self.path(candidate).exists():
            n += 1
            candidate = f"{base}-{n}"
        return candidate

    def save(self, cs: ConceptSet) -> str:
        """Give ``cs`` an id (if it has none), write it, and return the id."""
        if not cs.created:
            cs.created = utc_now()
        if not cs.id:
            cs.id = self.new_id(cs.name, cs.created)
        save_concept_set(self.path(cs.id), cs)
        return cs.id

    def ids(self) -> list[str]:
        """The ids of the stored files (a folder named like one is not a concept set)."""
        return sorted(p.name[:-len(SUFFIX)] for p in self.root.glob(f"*{SUFFIX}")
                      if _ID_RE.fullmatch(p.name[:-len(SUFFIX)]) and not p.is_dir())

    def list(self) -> list[ConceptSetSummary]:
        """The summaries of the readable sets; an unreadable file (whatever is wrong with it:
        not HDF5, cut short, a malformed attribute) is skipped with a warning."""
        out = []
        for i in self.ids():
            try:
                out.append(read_summary(self.path(i)))
            except Exception as exc:  # noqa: BLE001 - one bad file must not fail the listing
                log.warning("skipping unreadable concept set %s: %s: %s", i,
                            type(exc).__name__, exc)
        return out

    def __iter__(self) -> Iterator[str]:
        return iter(self.ids())

    def get(self, concept_set_id: str) -> ConceptSet:
        """The concept set; NotFound when there is no such file - also when it vanished
        (deleted) while it was read."""
        p = self.path(concept_set_id)
        if not p.is_file():
            raise NotFound(f"no concept set {concept_set_id!r}")
        try:
            return load_concept_set(p)
        except Exception:
            if not p.is_file():
                raise NotFound(f"no concept set {concept_set_id!r}") from None
            raise

    def read_bytes(self, concept_set_id: str) -> bytes:
        """The stored HDF5 file of a concept set, byte for byte (NotFound as :meth:`get`:
        no file, or something else - a folder - under its name)."""
        p = self.path(concept_set_id)
        try:
            if not p.is_file():
                raise FileNotFoundError(p)
            return p.read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise NotFound(f"no concept set {concept_set_id!r}") from None

    def delete(self, concept_set_id: str) -> bool:
        """True if a set was deleted, False if there was none."""
        p = self.path(concept_set_id)
        if p.is_dir():  # a folder under a set's name is no concept set (get: NotFound)
            return False
        try:
            p.unlink()
        except FileNotFoundError:
            return False
        return True


def label_concepts(path: str | os.PathLike[str], names: dict[int, str]) -> ConceptSet:
    """Give concepts names (``{index: name}``; "" clears one) and rewrite the file atomically
    (a version-1 file becomes version 2). Returns the updated concept set."""
    cs = load_concept_set(path)
    labels = list(cs.concept_names) + [""] * (cs.k - len(cs.concept_names))
    for j, name in names.items():
        if not 0 <= int(j) < cs.k:
            raise InvalidInput(f"concept index {j} outside 0..{cs.k - 1}")
        labels[int(j)] = str(name).strip()
    cs.concept_names = labels[:cs.k]
    save_concept_set(path, cs)
    return cs

"""The discovery pipeline: images -> activations -> fine-graining -> k -> DFF -> concept set.

``discover`` runs, in order, one function per stage (each timed by ``_Run.timer`` into
``ConceptSet.stage_seconds``; NMF fits go through a :class:`FitCache` keyed by (image ids, k,
solver, init, seed, max_iter, tol), so no fit is ever made twice):

1. ``features``: one pass through the feature source gives every image's activations at
   ``options.layer`` AND (unless the prediction filter is OFF) the classifier probabilities.
   A failed image (undecodable, too large, ...) becomes a ``Decision`` with stage ``error``.
2. ``prediction_filter``: target class = ``options.target_class`` or else ``options.name``
   (the folder name), resolved against the classifier's class names (see
   :func:`concept_engine.finegrain.resolve_class`). AUTO skips the filter with a recorded
   notice when the class is unknown (the notice lists close matches) or no probabilities came
   back; ON makes that an InvalidInput error. The rule is ``prediction_mode`` (probability
   threshold, target in the top-n, calibrated probability threshold). Fewer than
   ``prediction_min_images`` passing: the ``prediction_min_images`` most probable are kept,
   with a notice (no cliff).
3. ``certainty_filter``: a provisional DFF fit at ``options.k`` when k is given, else at
   ``options.k_min``; the mean (over concepts) concept certainty per image is filtered at its
   ``certainty_quantile``. Skipped with a notice if fewer than ``certainty_min_images`` remain.
4. ``k_sweep`` (only when ``options.k == 0``): :func:`concept_engine.kselect.select_k` over
   ``k_min..k_max`` (k larger than the number of images is left out, with a notice) with
   ``options.k_criterion``; every measured curve is kept. The CHOSEN k is fitted next.
5. ``fit``: the final NMF on the kept images (from the cache when the sweep or the provisional
   fit already made it on exactly these images).
6. ``reliability``: per-concept bootstrap stability and the set's split-half stability at k
   (:mod:`concept_engine.reliability`); a notice warns when either is below 0.7.
7. ``regions``: per kept image the raw heatmaps (k, h, w) at feature resolution, the concept
   certainties (k,), contour polygons of the significant regions at the image's ORIGINAL size,
   the training statistics explanations are judged against (presence thresholds, relative
   reconstruction errors) and the hierarchy of the sweep's fits (k -> k+1 parents).

``explain`` applies a stored concept set to new images with the bases H fixed.

Too few usable images (fewer than 2, or fewer than k) raise TooFewImages.
The numerics use the array namespace of the backend (NumPy here, CuPy when V is on a GPU).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from typing import Any, cast

import numpy as np
from dff_protos.errors import (
    DeadlineExceeded,
    DFFError,
    InvalidInput,
    NotReady,
    TooFewImages,
    Unavailable,
)

from concept_engine import compiled
from concept_engine import heatmaps as hm
from concept_engine.backend import compute_namespace, get_namespace, to_device, to_host
from concept_engine.finegrain import (
    CERTAINTY,
    ERROR,
    PREDICTION,
    Decision,
    FilterOutcome,
    certainty_filter,
    prediction_filter,
    resolve_class,
)
from concept_engine.options import (
    CALIBRATION_TEMPERATURE,
    FILTER_MODES,
    INITS,
    K_CRITERIA,
    PRECISION_CHOICES,
    PREDICTION_MODES,
    RESIZE_MODES,
    SOLVERS,
)
from concept_engine.reliability import DEFAULT_B, DEFAULT_ITERS
from concept_engine.store import ConceptSet, utc_now
from feature_server.extractor import MAX_SIZE, MIN_SIZE, WIRE_DTYPES, ExtractOptions, FeatureSource
from feature_server.sparse import SparseActivation, from_dense

log = logging.getLogger(__name__)

__all__ = ["FILTER_MODES", "INITS", "K_CRITERIA", "PREDICTION_MODES", "RESIZE_MODES", "SOLVERS",
           "DiscoveryOptions", "Explanation", "FitCache", "Progress", "discover", "explain"]


def _software_version() -> str:
    try:
        from importlib.metadata import version

        return version("dff-concepts")
    except Exception:  # noqa: BLE001 - not installed as a distribution
        return "unknown"


@dataclass(frozen=True)
class DiscoveryOptions:
    """What to discover and how (mirrors dff.v1.DiscoverOptions; defaults are the proto's).

    Filter modes are 'auto' (apply when possible, else skip with a notice), 'on' (impossible
    is an error) or 'off'. ``k == 0`` estimates k in ``k_min..k_max`` with ``k_criterion``."""

    name: str = ""
    target_class: str = ""
    k: int = 0
    k_min: int = 2
    k_max: int = 6
    k_criterion: str = "stability"
    prediction_filter: str = "auto"
    prediction_mode: str = "top_n"  # chosen by benchmarks/bench_quality.py (README)
    min_probability: float = 0.95
    prediction_top_n: int = 5
    temperature: float = CALIBRATION_TEMPERATURE
    prediction_min_images: int = 10
    certainty_filter: str = "off"  # measured not to help (README, "Fine-graining")
    certainty_quantile: float = 0.25
    certainty_min_images: int = 15
    solver: str = "hals"
    init: str = "nndsvd"  # HALS moves its zeros; with solver="mu" prefer "nndsvda"
    max_iter: int = 200
    tol: float = 1e-4
    seed: int = 0
    layer: str = "conv5_4"
    resize_mode: str = "squash"
    size: int = 224
    model: str = "vgg19"
    precision: str = "auto"  # resolved against the feature source (options.PRECISION_CHOICES)
    classifier: str = "efficientnet_lite0"
    wire_dtype: str = "float32"
    threshold: float = hm.DEFAULT_THRESHOLD
    min_area: float = hm.DEFAULT_MIN_AREA
    bootstrap: int = DEFAULT_B  # resamples of the per-concept stability (0 = not measured)
    bootstrap_iters: int = DEFAULT_ITERS

    def validate(self) -> None:
        """Raise InvalidInput for an option no data could satisfy."""
        problems = []
        if self.k < 0:
            problems.append(f"k must be >= 0 (0 = estimate), got {self.k}")
        if self.k == 0 and not 1 <= self.k_min <= self.k_max:
            problems.append(f"need 1 <= k_min <= k_max, got {self.k_min}..{self.k_max}")
        if self.k_criterion not in K_CRITERIA:
            problems.append(f"k_criterion {self.k_criterion!r} not in {K_CRITERIA}")
        for label, mode in (("prediction_filter", self.prediction_filter),
                            ("certainty_filter", self.certainty_filter)):
            if mode not in FILTER_MODES:
                problems.append(f"{label} {mode!r} not in {FILTER_MODES}")
        if self.prediction_mode not in PREDICTION_MODES:
            problems.append(f"prediction_mode {self.prediction_mode!r} not in {PREDICTION_MODES}")
        if self.prediction_top_n < 1 or not self.temperature > 0:
            problems.append("prediction_top_n must be >= 1 and temperature > 0")
        if not (0 <= self.bootstrap <= MAX_BOOTSTRAP and 1 <= self.bootstrap_iters <= 10_000):
            problems.append(f"bootstrap must be in 0..{MAX_BOOTSTRAP} and bootstrap_iters in "
                            f"1..10000, got {self.bootstrap} and {self.bootstrap_iters}")
        if not 0.0 <= self.min_probability <= 1.0:
            problems.append(f"min_probability must be in 0..1, got {self.min_probability}")
        if not 0.0 <= self.certainty_quantile <= 1.0:
            problems.append(f"certainty_quantile must be in 0..1, got {self.certainty_quantile}")
        if self.solver not in SOLVERS:
            problems.append(f"solver {self.solver!r} not in {SOLVERS}")
        if self.init not in INITS:
            problems.append(f"init {self.init!r} not in {INITS}")
        if not 1 <= self.max_iter <= MAX_ITER or not self.tol >= 0:
            problems.append(f"max_iter must be in 1..{MAX_ITER} and tol >= 0, got "
                            f"{self.max_iter} and {self.tol}")
        if self.precision not in PRECISION_CHOICES:
            problems.append(f"precision {self.precision!r} not in {PRECISION_CHOICES}")
        if self.resize_mode not in RESIZE_MODES:
            problems.append(f"resize_mode {self.resize_mode!r} not in {RESIZE_MODES}")
        if not 0.0 <= self.min_area <= 1.0:
            problems.append(f"min_area is a fraction of the image (0..1), got {self.min_area}")
        if not 0.0 <= self.threshold <= 1.0:
            problems.append(f"threshold is a fraction of each map's maximum (0..1), got "
                            f"{self.threshold}")
        for label in ("k", "k_min", "k_max", "seed", "max_iter", "size", "bootstrap",
                      "bootstrap_iters", "prediction_top_n", "prediction_min_images",
                      "certainty_min_images"):
            value = getattr(self, label)
            if isinstance(value, bool) or not isinstance(value, int | np.integer):
                problems.append(f"{label} must be an integer, got {value!r}")
        if self.seed < 0:
            problems.append("seed must be >= 0")
        if not MIN_SIZE <= self.size <= MAX_SIZE:
            problems.append(f"size must be in {MIN_SIZE}..{MAX_SIZE}, got {self.size}")
        if self.wire_dtype not in WIRE_DTYPES:
            problems.append(f"wire_dtype {self.wire_dtype!r} not in {WIRE_DTYPES}")
        for label in ("model", "layer"):
            if not str(getattr(self, label)).strip():
                problems.append(f"{label} must be named")
        if problems:
            raise InvalidInput("; ".join(problems))

    def extract_options(self, probabilities: bool | None = None) -> ExtractOptions:
        """The feature request; class probabilities come in the same pass when
        ``probabilities`` (default: unless the prediction filter is off)."""
        if probabilities is None:
            probabilities = self.prediction_filter != "off"
        return ExtractOptions(model=self.model, layers=(self.layer,),
                              wire_dtype=self.wire_dtype, resize_mode=self.resize_mode,
                              size=self.size, return_probabilities=probabilities,
                              classifier=self.classifier, sparse=True)


@dataclass(frozen=True)
class Progress:
    """A progress event: ``done`` of ``total`` units of ``stage`` (see the module docstring)."""

    stage: str
    done: int
    total: int
    message: str = ""


ProgressCallback = Callable[[Progress | Decision], None]
"""Receives Progress events and every Decision as it is made. May raise to cancel."""


@dataclass
class _Image:
    """One usable image: its activations as rows of V (h*w, C) and its sizes."""

    id: str
    rows: np.ndarray
    feature_size: tuple[int, int]
    original_size: tuple[int, int]
    input_size: tuple[int, int]
    probabilities: np.ndarray | None
    key: bytes = b""  # digest of the image's data: its place in the canonical order


#: Upper bounds of options whose cost grows without limit (an engine's Discover slot is held
#: for as long as they take): 1000 resamples is ~80x the default's cost, 100000 iterations
#: 500x the default's.
MAX_BOOTSTRAP = 1000
MAX_ITER = 100_000


def _digest(data: Any) -> bytes:
    """The content digest of an item's data (file bytes, or pixels with their shape)."""
    h = hashlib.blake2b(digest_size=16)
    if isinstance(data, np.ndarray):
        h.update(f"{data.dtype.str}{data.shape}".encode())
        data = np.ascontiguousarray(data)
    h.update(memoryview(data).cast("B"))
    return h.digest()


def _content_order(images: Sequence[_Image]) -> np.ndarray:
    """The images' positions sorted by content digest (ties - identical files - by position):
    the k sweep's splits and the bootstrap's resamples are drawn over this order, so the same
    photos give the same concept set whatever their order or file names."""
    return np.array(sorted(range(len(images)), key=lambda i: images[i].key), dtype=np.int64)


@dataclass
class _Run:
    options: DiscoveryOptions
    progress: ProgressCallback | None
    decisions: list[Decision] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    cache: FitCache = field(default_factory=lambda: FitCache())

    @contextmanager
    def timer(self, stage: str) -> Iterator[None]:
        """Times the block into ``seconds[stage]`` (the stage timer)."""
        t = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - t

    def emit(self, event: Progress | Decision) -> None:
        if isinstance(event, Decision):
            self.decisions.append(event)
        if self.progress is not None:
            self.progress(event)

    def notice(self, text: str) -> None:
        log.info("%s", text)
        self.notices.append(text)
        self.emit(Progress("notice", 0, 0, text))


# ---------------------------------------------------------------------------------- helpers
def gpu_min_rows() -> int:
    """Feature rows (images x h x w) below which discovery stays on the host even where CuPy
    sees a GPU (``DFF_GPU_MIN_ROWS``, default 10000, about 51 images at 224 x 224).

    Measured on an H200 (README, GPU): at 48 images one CuPy fit ran no faster than the host
    kernels (1.0x), and the whole k sweep took 1.1 s there, as the CuPy HALS updates one row at
    a time (1520 small launches) and runs the sweep's 25 fits one after another; the host
    kernels run them side by side, one per core (0.2 s for 50 images on 2 cores). From 200
    images on the GPU's fits were faster (1.53x; 2.0x at 1000). Where the crossover lies
    between 50 and 200 images was not measured, so the default keeps only the measured side."""
    try:
        return max(0, int(os.environ.get("DFF_GPU_MIN_ROWS", "10000")))
    except ValueError:
        return 10000


def stack_rows(images: Sequence[_Image], xp=np):
    """V (sum h_i*w_i, C) in the form the solvers run fastest on: on the host a SciPy CSR
    matrix when sparse enough (ReLU features are ~93% zeros; see nmf.prepare_v), on a device a
    dense float32 CuPy array. The result of a fit does not depend on the form. Rows that
    arrived sparse (:func:`_rows`) are stacked without a dense copy of V on the host."""
    import scipy.sparse as sparse

    from concept_engine.nmf import SPARSE_MAX_DENSITY, prepare_v

    parts = [im.rows for im in images]
    if parts and all(sparse.issparse(p) for p in parts):
        V = sparse.vstack(parts, format="csr", dtype=np.float32)
        if xp is np and V.nnz <= SPARSE_MAX_DENSITY * V.shape[0] * V.shape[1]:
            return V
        return prepare_v(to_device(V.toarray(), xp))
    V = np.concatenate(parts, axis=0).astype(np.float32, copy=False)
    return prepare_v(to_device(V, xp))


def _pair(size: Sequence[int]) -> tuple[int, int]:
    """(height, width) as plain ints."""
    return int(size[0]), int(size[1])


def _rows(activation: Any):
    """(C, h, w) -> (h*w, C) rows in row-major (y, x) order after a ReLU, as a SciPy CSR float32
    matrix: activations are kept sparse as they arrive (~7% non-zeros after ReLU), so a class of
    5000 images holds ~0.3 GB of rows instead of a 2 GB dense V. A SparseActivation (what the
    sources send when asked for ``sparse``) becomes the matrix without a dense copy."""
    if not isinstance(activation, SparseActivation):
        activation = from_dense(np.maximum(np.asarray(activation, np.float32), 0))
    return activation.to_csr(relu=True)


def image_certainties(maps: Sequence[Any], input_sizes: Sequence[tuple[int, int]]
                      ) -> np.ndarray:
    """Concept certainty (N, k) of per-image raw maps (k, h_i, w_i), seed definition, computed
    at each image's network input size (224 x 224 under the seed's squash policy). Images with
    the same map and input sizes go through :func:`concept_certainty` together."""
    from concept_engine.certainty import concept_certainty

    n = len(maps)
    if n == 0:
        return np.zeros((0, 0), np.float32)
    k = int(maps[0].shape[0])
    out = np.zeros((n, k), dtype=np.float32)
    groups: dict[tuple, list[int]] = {}
    for i, (m, s) in enumerate(zip(maps, input_sizes, strict=True)):
        groups.setdefault((tuple(m.shape), tuple(int(v) for v in s)), []).append(i)
    for (_, size), members in groups.items():
        xp = get_namespace(maps[members[0]])
        batch = xp.stack([maps[i] for i in members])
        out[members] = to_host(concept_certainty(batch, upsample_to=size))
    return np.nan_to_num(out, nan=0.0)


def _fit(V, k: int, options: DiscoveryOptions):
    from concept_engine.nmf import Init, Solver, nmf_fit

    return nmf_fit(V, k, solver=cast(Solver, options.solver), init=cast(Init, options.init),
                   max_iter=options.max_iter, tol=options.tol, seed=options.seed)


def _maps(W, images: Sequence[_Image]) -> list:
    return hm.split_heatmaps(W, [im.feature_size for im in images])


def _model_info(describe: dict, name: str) -> dict:
    for m in describe.get("models", []) or []:
        if isinstance(m, dict) and m.get("name") == name:
            return m
    return {}


# ---------------------------------------------------------------------------------- stages
def _extract(items: Sequence[tuple[str, bytes]], source: FeatureSource, run: _Run,
             probabilities: bool) -> list[_Image]:
    options = run.options
    ids = [i for i, _ in items]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})[:5]
        raise InvalidInput(f"duplicate image ids: {dup}")
    order = {i: n for n, i in enumerate(ids)}
    data = dict(items)
    # Each answer is checked and its activation made sparse as it ARRIVES: holding the dense
    # answers until the end cost 0.4 MB per image (2 GB for a 5000-image class).
    kept: dict[str, _Image] = {}
    errors: dict[str, str] = {}
    outage: dict[str, str] = {}
    channels: int | None = None
    total = len(items)
    run.emit(Progress("features", 0, total, f"extracting {options.layer} from {total} images"))
    for answer in source.extract(items, options.extract_options(probabilities)):
        if answer.id not in order or answer.id in kept or answer.id in errors:
            log.warning("feature source answered an unexpected id %r", answer.id)
            continue
        error: str | None = None
        if isinstance(answer.error, NotReady | DeadlineExceeded):
            outage[answer.id] = str(answer.error)  # the source's failure, not the image's
            error = outage[answer.id]
        elif answer.error is not None:
            error = str(answer.error)
        elif options.layer not in answer.activations:
            error = f"no activations for layer {options.layer!r}"
        else:
            act = answer.activations[options.layer]
            if not isinstance(act, SparseActivation):
                act = np.asarray(act)
            if act.ndim != 3 or min(act.shape) < 1:
                error = f"activation of shape {act.shape} is not (C, h, w)"
            elif channels is not None and act.shape[0] != channels:
                error = f"activation has {act.shape[0]} channels, others have {channels}"
            elif not np.all(np.isfinite(act.values if isinstance(act, SparseActivation)
                                        else act)):
                error = "activation contains NaN or inf"
        if error is not None:
            errors[answer.id] = error
        else:
            channels = act.shape[0]
            probs = (None if answer.probabilities is None
                     else np.asarray(answer.probabilities, np.float64))
            kept[answer.id] = _Image(answer.id, _rows(act),
                                     (int(act.shape[1]), int(act.shape[2])),
                                     _pair(answer.original_size), _pair(answer.input_size),
                                     probs, _digest(data[answer.id]))
        run.emit(Progress("features", len(kept) + len(errors), total, answer.id))
    unanswered = [i for i in ids if i not in kept and i not in errors]
    if outage or unanswered:
        # A set fitted on the images that happened to arrive before a feature server died is
        # not the class's set, and would not reproduce: nothing is fitted.
        first = next(iter(outage.values()), "the source ended without answering them")
        raise Unavailable(f"{len(outage) + len(unanswered)} of {total} images got no "
                          f"features because the feature source failed ({first[:300]}); "
                          "nothing was fitted - run again when it answers")
    images: list[_Image] = []
    for item_id in ids:  # decisions and images in the caller's order
        if item_id in kept:
            images.append(kept[item_id])
        else:
            run.emit(Decision(item_id, False, ERROR, errors[item_id]))
    return images


def _resolve_target(source: FeatureSource, run: _Run) -> tuple[int, str] | None:
    """(index, class name) of the prediction filter's target class, or None when the filter is
    off or skipped (AUTO: a notice says why; ON: InvalidInput). Runs BEFORE extraction, so an
    impossible ON filter fails fast and a skipped one costs no classifier pass."""
    options = run.options
    mode = options.prediction_filter
    if mode == "off":
        return None

    def skip(text: str) -> tuple[int, str] | None:
        """No target (None): an error when the filter is ON, else a recorded notice."""
        if mode == "on":
            raise InvalidInput(f"prediction filter requested but impossible: {text}")
        run.notice(f"prediction filter skipped: {text}")
        return None

    target = options.target_class or options.name
    if not target:
        return skip("no target class (give target_class or a name)")
    try:
        names = source.class_names(options.classifier)
    except DFFError as exc:
        return skip(f"classifier {options.classifier!r} unavailable: {exc}")
    if not names:
        return skip(f"classifier {options.classifier!r} has no class names")
    wnids = _model_info(source.describe(), options.classifier).get("class_wnids") or None
    try:
        index = resolve_class(target, names, wnids)
    except InvalidInput as exc:
        return skip(str(exc))
    return index, names[index]


def _prediction_stage(images: list[_Image], target: tuple[int, str] | None, run: _Run
                      ) -> list[_Image]:
    options = run.options
    if target is None:
        return images
    index, name = target
    if any(im.probabilities is None or im.probabilities.shape[0] <= index for im in images):
        text = "the feature source returned no (or too short) class probabilities"
        if options.prediction_filter == "on":
            raise InvalidInput(f"prediction filter requested but impossible: {text}")
        run.notice(f"prediction filter skipped: {text}")
        return images
    probs = (np.stack([im.probabilities for im in images if im.probabilities is not None])
             if images else np.zeros((0, 1)))
    outcome = prediction_filter([im.id for im in images], probs, index,
                                options.min_probability, options.prediction_min_images,
                                class_name=name, mode=options.prediction_mode,
                                top_n=options.prediction_top_n,
                                temperature=options.temperature)
    return _apply(images, outcome, run)


def _apply(images: list[_Image], outcome: FilterOutcome, run: _Run) -> list[_Image]:
    for d in outcome.decisions:
        run.emit(d)
    if outcome.notice:
        run.notice(outcome.notice)
    return [im for im, keep in zip(images, outcome.kept, strict=True) if keep]


def _probability_of(decisions: list[Decision]) -> dict[str, float]:
    return {d.id: d.probability for d in decisions
            if d.stage == PREDICTION and not math.isnan(d.probability)}


def _check_enough(images: list[_Image], k: int, where: str) -> None:
    need = max(2, k)
    if len(images) < need:
        raise TooFewImages(f"{len(images)} usable image(s) {where}; discovery needs at least "
                           f"{need} (2, and at least k={k})")


# ---------------------------------------------------------------------------------- fit cache
class FitCache:
    """NMF fits keyed by (image ids, k, solver, init, seed, max_iter, tol): a fit made once on
    a set of images (the provisional fit, the k sweep, the final fit) is never recomputed,
    within one discovery or - when the same cache is passed to several ``discover`` calls, as
    benchmarks/bench_quality.py does - across configurations that keep the same images."""

    def __init__(self) -> None:
        self._fits: dict[tuple, Any] = {}
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(ids: Sequence[str], k: int, options: DiscoveryOptions) -> tuple:
        return (tuple(ids), int(k), options.solver, options.init, int(options.seed),
                int(options.max_iter), float(options.tol))

    def get(self, ids: Sequence[str], k: int, options: DiscoveryOptions) -> Any | None:
        fit = self._fits.get(self.key(ids, k, options))
        if fit is not None:
            self.hits += 1
        return fit

    def put(self, ids: Sequence[str], k: int, options: DiscoveryOptions, fit: Any) -> None:
        self._fits[self.key(ids, k, options)] = fit

    def fit(self, V: Any, ids: Sequence[str], k: int, options: DiscoveryOptions) -> Any:
        fit = self.get(ids, k, options)
        if fit is None:
            self.misses += 1
            fit = _fit(V, k, options)
            self.put(ids, k, options, fit)
        else:
            log.info("reusing the k=%d fit already made on the same %d images", k, len(ids))
        return fit


# ---------------------------------------------------------------------------------- stages
@dataclass
class _Sweep:
    k: int
    reason: str
    criterion: str
    curves: dict[str, dict[int, float]]
    fits: dict[int, Any]


def _certainty_stage(images: list[_Image], run: _Run, xp: Any) -> list[_Image]:
    options = run.options
    if options.certainty_filter == "off":
        return images
    k = options.k if options.k > 0 else options.k_min
    run.emit(Progress(CERTAINTY, 0, 1, f"provisional DFF fit at k={k}"))
    fit = run.cache.fit(stack_rows(images, xp), [im.id for im in images], k, options)
    cert = image_certainties(_maps(fit.W, images), [im.input_size for im in images])
    outcome = certainty_filter([im.id for im in images], cert.mean(axis=1),
                               options.certainty_quantile, options.certainty_min_images)
    probs = _probability_of(run.decisions)
    outcome.decisions = [replace(d, probability=probs.get(d.id, math.nan))
                         for d in outcome.decisions]
    images = _apply(images, outcome, run)
    run.emit(Progress(CERTAINTY, 1, 1, f"{len(images)} images kept"))
    return images


def _k_stage(images: list[_Image], V: Any, run: _Run) -> _Sweep:
    options = run.options
    ids = [im.id for im in images]
    if options.k > 0:
        return _Sweep(options.k, f"k={options.k} given by the user", "", {}, {})
    _check_enough(images, options.k_min, "for the k sweep")
    ks = [c for c in range(options.k_min, options.k_max + 1) if c <= len(images)]
    if len(ks) < options.k_max - options.k_min + 1:
        run.notice(f"k sweep limited to {ks} ({len(images)} images)")
    run.emit(Progress("k_sweep", 0, 0, f"{options.k_criterion} over k={ks}"))
    ticks = [0, 0]  # (done, total) of the sweep's NMF fits, for the closing event

    def on_fit(done: int, total: int, msg: str) -> None:
        ticks[:] = [done, total]
        run.emit(Progress("k_sweep", done, total, msg))

    from concept_engine.kselect import select_k

    prior = {k: f for k in ks if (f := run.cache.get(ids, k, options)) is not None}
    sel = select_k(V, len(images), [im.feature_size for im in images], ks=ks,
                   criterion=options.k_criterion, seed=options.seed,
                   solver=options.solver, init=options.init,
                   max_iter=options.max_iter, tol=options.tol, fits=prior,
                   input_sizes=[im.input_size for im in images], progress=on_fit,
                   order=_content_order(images))
    for k, fit in sel.fits.items():
        run.cache.put(ids, k, options, fit)
    curves = {c: {int(a): float(b) for a, b in v.items()} for c, v in sel.curves.items()}
    run.emit(Progress("k_sweep", ticks[1], ticks[1], f"k={sel.k}: {sel.reason}"))
    return _Sweep(int(sel.k), sel.reason, options.k_criterion, curves, dict(sel.fits))


def _fit_stage(images: list[_Image], V: Any, k: int, run: _Run) -> Any:
    options = run.options
    run.emit(Progress("fit", 0, 1, f"DFF k={k} on {len(images)} images"))
    fit = run.cache.fit(V, [im.id for im in images], k, options)
    if not getattr(fit, "converged", True):
        run.notice(f"the final fit stopped at max_iter={options.max_iter} before reaching "
                   f"tol={options.tol:g} (relative error change); raise max_iter to converge")
    run.emit(Progress("fit", 1, 1, f"{fit.n_iter} iterations, error {float(fit.error):.6g}"))
    return fit


def _reliability_stage(images: list[_Image], V: Any, fit: Any, sweep: _Sweep, run: _Run
                       ) -> Any:
    """Per-concept bootstrap stability and the split-half stability of the set at k."""
    from concept_engine.reliability import Reliability, bootstrap_stability, split_half_at

    options = run.options
    k = int(fit.H.shape[0])
    sizes = [im.feature_size for im in images]
    run.emit(Progress("reliability", 0, 1, f"bootstrap stability, B={options.bootstrap}"))
    if options.bootstrap > 0:
        stab, interval = bootstrap_stability(
            V, sizes, fit.W, fit.H, n_boot=options.bootstrap, iters=options.bootstrap_iters,
            seed=options.seed, solver=options.solver, order=_content_order(images),
            # an event per batch of resamples: a cancelled discovery stops here too
            progress=lambda done, total: run.emit(Progress(
                "reliability", 0, 1, f"bootstrap {done}/{total} resamples")))
    else:
        stab = np.full(k, np.nan, np.float32)
        interval = np.full((k, 2), np.nan, np.float32)
    split = sweep.curves.get("stability", {}).get(k)
    if split is None and len(images) >= 2 * k:  # also with --bootstrap 0: the set's warning
        split = split_half_at(V, sizes, k, seed=options.seed, solver=options.solver,
                              max_iter=options.max_iter, tol=options.tol,
                              order=_content_order(images))
    rel = Reliability(stab, interval, math.nan if split is None else float(split),
                      options.bootstrap)
    if rel.warning:
        run.notice(rel.warning)
    run.emit(Progress("reliability", 1, 1, f"set {rel.set_stability:.3f}, concepts "
                                           f"{np.round(stab, 2).tolist()}"))
    return rel


def _hierarchy(sweep: _Sweep, images: list[_Image]) -> dict[int, dict[str, np.ndarray]]:
    """Per k of the sweep: bases, parent of each concept in the (k-1)-fit (-1 at the first k),
    cosine to it, and the training image where the concept carries the most weight."""
    from concept_engine.matching import hierarchy

    out: dict[int, dict[str, np.ndarray]] = {}
    prev = None
    for k in sorted(sweep.fits):
        fit = sweep.fits[k]
        H = np.asarray(to_host(fit.H), np.float32)
        W = np.asarray(to_host(fit.W), np.float32)
        mass = np.stack([m.reshape(k, -1).sum(axis=1) for m in _maps(W, images)])  # (N, k)
        if prev is None:
            parents, cos = np.full(k, -1, np.int64), np.ones(k)
        else:
            parents, cos = hierarchy(prev, H, return_cosines=True)
        out[k] = {"bases": H, "parents": parents.astype(np.int32),
                  "cosines": np.asarray(cos, np.float32),
                  "top_image": np.argmax(mass, axis=0).astype(np.int32)}
        prev = H
    return out


def _regions_stage(images: list[_Image], fit: Any, run: _Run
                   ) -> tuple[list[np.ndarray], np.ndarray, list]:
    options = run.options
    maps = [np.asarray(to_host(m), np.float32) for m in _maps(fit.W, images)]
    certainties = image_certainties(maps, [im.input_size for im in images])

    def one(i: int) -> list:
        return hm.concept_polygons(maps[i], images[i].original_size, options.threshold,
                                   options.min_area)

    # the images are independent and OpenCV/NumPy release the GIL: one thread per core,
    # results collected in image order
    polygons = []
    workers = min(len(images), os.cpu_count() or 1)
    with concurrent.futures.ThreadPoolExecutor(max(1, workers),
                                               thread_name_prefix="dff-regions") as pool:
        for i, polys in enumerate(pool.map(one, range(len(images)))):
            polygons.append(polys)
            run.emit(Progress("regions", i + 1, len(images), images[i].id))
    return maps, certainties, polygons


def resolve_model(options: DiscoveryOptions, source: FeatureSource) -> DiscoveryOptions:
    """``options`` with ``model`` set to the variant ``options.precision`` asks for, from what
    ``source`` offers - the same rule in-process, through feature servers and on the engine.
    ``auto``: the source's default precision when that variant exists (a model named as a
    variant, e.g. ``vgg19_int8``, stays as named); an explicit precision that the source lacks
    is InvalidInput."""
    from feature_server.extractor import choose_model
    from feature_server.models.precision import PRECISIONS

    if options.precision == "auto" and any(options.model.endswith(f"_{p}")
                                            for p in PRECISIONS):
        return options
    try:
        model = choose_model(source.describe(), options.model, options.precision)
    except DFFError as exc:
        raise InvalidInput(str(exc)) from None
    return options if model == options.model else replace(options, model=model)


def _any_nonzero(rows: Any) -> bool:
    """An image's activation rows (dense or SciPy sparse) hold a non-zero value."""
    data = rows.data if hasattr(rows, "nnz") else rows
    return bool(np.any(np.asarray(data) != 0))


def _check_layer(options: DiscoveryOptions, source: FeatureSource) -> None:
    """InvalidInput, before any image is sent, for a layer the source's model lacks (when the
    source names its model's layers)."""
    layers = _model_info(source.describe(), options.model).get("layers")
    if layers and options.layer not in layers:
        raise InvalidInput(f"layer {options.layer!r}: {options.model} has no such layer; "
                           f"choose one of {', '.join(map(str, layers))}")


# ---------------------------------------------------------------------------------- discover
def discover(items: Sequence[tuple[str, bytes]], source: FeatureSource,
             options: DiscoveryOptions = DiscoveryOptions(),
             progress: ProgressCallback | None = None, *,
             cache: FitCache | None = None) -> ConceptSet:
    """Discover concepts in ``items`` ((id, encoded image bytes), ids unique) using activations
    from ``source``. Returns an unsaved ConceptSet (id empty). See the module docstring for the
    stages; each is one function, timed into ``ConceptSet.stage_seconds``. ``cache`` (a
    :class:`FitCache`) may be shared between calls. Raises InvalidInput (bad options,
    duplicate ids, impossible ON filter) or TooFewImages. Deterministic for a given seed, data
    and backend."""
    from concept_engine.reliability import relative_errors, training_statistics

    options.validate()
    options = resolve_model(options, source)
    _check_layer(options, source)
    compiled.warm_up()  # the NMF kernels load on a background thread while features arrive
    run = _Run(options, progress, cache=cache if cache is not None else FitCache())
    t_start = time.perf_counter()
    items = list(items)

    target = _resolve_target(source, run)
    with run.timer("features"):
        images = _extract(items, source, run, probabilities=target is not None)
    n_input = len(items)
    log.info("discover %r: %d of %d images usable", options.name, len(images), n_input)
    reasons = sorted({d.reason for d in run.decisions if d.stage == ERROR})[:3]
    _check_enough(images, 2, f"of {n_input} after decoding and feature extraction"
                  + (f" (errors: {'; '.join(reasons)})" if reasons else ""))
    if not any(_any_nonzero(im.rows) for im in images):
        raise InvalidInput(
            f"layer {options.layer!r} of {options.model} is zero everywhere in all "
            f"{len(images)} usable images: there is nothing to factorise (a dead layer, e.g. a "
            "ReLU after a large negative bias); choose another layer")
    with run.timer("prediction_filter"):
        images = _prediction_stage(images, target, run)
    _check_enough(images, options.k if options.k > 0 else options.k_min,
                  "after the prediction filter")
    # Activations arrive on the host; on a CUDA machine V moves to the device once, here -
    # unless the class is small, where the host's kernels are the faster (see gpu_min_rows).
    xp = compute_namespace()
    rows, min_rows = sum(int(im.rows.shape[0]) for im in images), gpu_min_rows()
    if xp is not np and rows < min_rows:
        log.info("discover %r: %d feature rows, below DFF_GPU_MIN_ROWS=%d: the concept engine "
                 "runs on the host", options.name, rows, min_rows)
        xp = np
    with run.timer("certainty_filter"):
        images = _certainty_stage(images, run, xp)
    V = stack_rows(images, xp)
    with run.timer("k_sweep"):
        sweep = _k_stage(images, V, run)
    k = sweep.k
    _check_enough(images, k, "for the final fit")
    with run.timer("fit"):
        fit = _fit_stage(images, V, k, run)
    with run.timer("reliability"):
        rel = _reliability_stage(images, V, fit, sweep, run)
    with run.timer("regions"):
        maps, certainties, polygons = _regions_stage(images, fit, run)
        errors = relative_errors([im.rows for im in images], fit.W, fit.H)
        stats = training_statistics(certainties, errors)
        tree = _hierarchy(sweep, images) if len(sweep.fits) > 1 else {}
    run.seconds["total"] = time.perf_counter() - t_start
    return _concept_set(items, images, source, target, sweep, fit, maps, certainties,
                        polygons, rel, stats, tree, run, xp)


def _concept_set(items, images, source, target, sweep, fit, maps, certainties, polygons,
                 rel, stats, tree, run: _Run, xp) -> ConceptSet:
    options = run.options
    ids = [im.id for im in images]
    describe = source.describe()
    model = _model_info(describe, options.model)
    classifier = _model_info(describe, options.classifier)
    created = utc_now()
    provenance = {
        "model": options.model,
        "weights_sha256": model.get("weights_sha256", ""),
        "onnx_sha256": model.get("onnx_sha256", ""),
        "model_source": model.get("source", ""),  # imported models: file + negative policy
        "precision": model.get("precision") or "fp32",
        "layer": options.layer,
        "preprocessing": model.get("preprocessing", {}),
        "resize_mode": options.resize_mode,
        "size": options.size,
        "wire_dtype": options.wire_dtype,
        "classifier": options.classifier if target is not None else "",
        "target_class": target[1] if target is not None else "",
        "classifier_weights_sha256": classifier.get("weights_sha256", ""),
        "execution_provider": describe.get("execution_provider", ""),
        "k": sweep.k,
        "k_reason": sweep.reason,
        "k_criterion": sweep.criterion,
        "solver": options.solver,
        "init": options.init,
        "max_iter": options.max_iter,
        "tol": options.tol,
        "n_iter": int(fit.n_iter),
        "reconstruction_error": float(fit.error),
        "converged": bool(getattr(fit, "converged", True)),
        "seed": options.seed,
        "backend": xp.__name__,
        "software_version": _software_version(),
        "created": created,
        "options": asdict(options),
        "input_images": [i for i, _ in items],
        "kept_images": ids,
        "bootstrap": {"B": options.bootstrap, "iters": options.bootstrap_iters},
    }
    return ConceptSet(
        name=options.name, bases=np.asarray(to_host(fit.H), np.float32), image_ids=ids,
        heatmaps=maps, certainties=certainties,
        original_sizes=np.array([im.original_size for im in images], np.int32).reshape(-1, 2),
        input_sizes=np.array([im.input_size for im in images], np.int32).reshape(-1, 2),
        polygons=polygons, decisions=run.decisions, k_curves=sweep.curves,
        k_criterion=sweep.criterion, k_reason=sweep.reason, threshold=options.threshold,
        min_area=options.min_area, provenance=provenance, notices=run.notices,
        stage_seconds=run.seconds, created=created,
        stability=np.asarray(rel.stability, np.float32),
        stability_interval=np.asarray(rel.interval, np.float32),
        set_stability=float(rel.set_stability),
        presence_threshold=stats.presence_threshold,
        reconstruction_errors=stats.reconstruction_errors,
        ood_threshold=stats.ood_threshold, hierarchy=tree)


# ---------------------------------------------------------------------------------- explain
@dataclass
class Explanation:
    """A stored concept set applied to one new image: raw heatmaps (k, h, w) at feature
    resolution, certainties (k,), polygons[j] list of (n, 2) int32 x, y for concept j at the
    ORIGINAL size (height, width). ``error`` set => the other fields are empty."""

    id: str
    heatmaps: np.ndarray | None = None
    certainties: np.ndarray | None = None
    polygons: list[list[np.ndarray]] = field(default_factory=list)
    original_size: tuple[int, int] = (0, 0)
    input_size: tuple[int, int] = (0, 0)
    error: DFFError | None = None
    present: np.ndarray | None = None  # (k,) bool: certainty >= the concept's training threshold
    relative_score: np.ndarray | None = None  # (k,) training percentile of the certainty, 0..1
    reconstruction_error: float = math.nan  # ||V - W H|| / ||V|| of this image
    out_of_distribution: bool = False  # error beyond the training images' 95th percentile


def _set_label(concept_set: ConceptSet) -> str:
    name = concept_set.name or concept_set.id
    return f"concept set {name!r}" if name else "the concept set"


def _check_same_weights(concept_set: ConceptSet, source: FeatureSource, model: str) -> None:
    """InvalidInput when the source's ``model`` has other weights than the set was made with
    (a model re-registered under the same name, or another server's build): its channels are
    not what the bases describe, so every heatmap would be wrong. Unknown on either side (a
    version-1 set, a source that does not say) is not checked."""
    recorded = str(concept_set.provenance.get("weights_sha256") or "")
    current = str(_model_info(source.describe(), model).get("weights_sha256") or "")
    if recorded and current and recorded != current:
        raise InvalidInput(
            f"{_set_label(concept_set)} was made with model {model!r} "
            f"of weights sha256 {recorded[:16]}..., but the feature source's {model!r} has "
            f"weights {current[:16]}...: its bases do not describe this network's channels. "
            "Explain with the original weights, or discover the concepts again")


def explain(concept_set: ConceptSet, items: Iterable[tuple[str, bytes]], source: FeatureSource,
            threshold: float | None = None, min_area: float | None = None, *,
            max_iter: int = 200, tol: float = 1e-4) -> Iterator[Explanation]:
    """Heatmaps of ``concept_set``'s concepts in new images: W from NMF with H fixed
    (nmf_transform), extracted with the set's own model, layer and resize policy. One
    Explanation per item, in the source's answer order; per-item failures are in ``error``.
    ``threshold``/``min_area`` default to the values the set was made with.

    Presence is judged against the TRAINING images (see :mod:`concept_engine.reliability`):
    a concept is ``present`` when its certainty reaches the set's presence threshold, and only
    present concepts get polygons; ``out_of_distribution`` flags an image the concepts do not
    reconstruct as well as 95% of the training images. A version-1 set has no training
    statistics: thresholds are derived from its stored certainties, and OOD is never flagged
    unless the set has reconstruction errors."""
    from concept_engine.nmf import nmf_transform
    from concept_engine.reliability import (
        PRESENCE_QUANTILE,
        judge,
        relative_errors,
    )

    prov = concept_set.provenance
    threshold = concept_set.threshold if threshold is None else threshold
    min_area = concept_set.min_area if min_area is None else min_area
    if not 0.0 <= min_area <= 1.0:
        raise InvalidInput(f"min_area is a fraction of the image (0..1), got {min_area}")
    if not 0.0 <= threshold <= 1.0:
        raise InvalidInput(f"threshold is a fraction of each map's maximum (0..1), got "
                           f"{threshold}")
    opts = ExtractOptions(model=prov.get("model", "vgg19"),
                          layers=(prov.get("layer", "conv5_4"),),
                          wire_dtype=prov.get("wire_dtype", "float32"),
                          resize_mode=prov.get("resize_mode", "squash"),
                          size=int(prov.get("size", 224)), sparse=True)
    layer = opts.layers[0]
    _check_same_weights(concept_set, source, opts.model)
    H = np.asarray(concept_set.bases, np.float32)
    solver = prov.get("solver", "hals")
    train_cert = np.asarray(concept_set.certainties, np.float32).reshape(-1, concept_set.k)
    presence = concept_set.presence_threshold
    if presence is None:
        presence = (np.quantile(train_cert, PRESENCE_QUANTILE, axis=0) if len(train_cert)
                    else np.zeros(concept_set.k))
    ood_threshold = float(concept_set.ood_threshold)
    for res in source.extract(items, opts):
        if res.error is not None:
            yield Explanation(res.id, error=res.error)
            continue
        act = res.activations.get(layer)
        if act is None or act.ndim != 3 or act.shape[0] != H.shape[1]:
            shape = None if act is None else act.shape
            yield Explanation(res.id, error=InvalidInput(
                f"activation {shape} does not match the concept set's {H.shape[1]} channels"))
            continue
        h, w = int(act.shape[1]), int(act.shape[2])
        V = _rows(act)
        W = nmf_transform(V, H, solver=solver, max_iter=max_iter, tol=tol)
        maps = np.asarray(to_host(hm.heatmaps(W, 1, h, w))[0], np.float32)
        cert = image_certainties([maps], [_pair(res.input_size)])[0]
        error = float(relative_errors([V], W, H)[0])
        present, relative, ood = judge(cert, error, train_cert, presence, ood_threshold)
        polys = hm.concept_polygons(maps, _pair(res.original_size), threshold, min_area)
        polys = [p if present[j] else [] for j, p in enumerate(polys)]
        yield Explanation(res.id, maps, cert, polys, _pair(res.original_size),
                          _pair(res.input_size), None, present, relative, error, ood)

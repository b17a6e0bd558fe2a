"""dff.v1 ConceptEngine messages <-> domain objects, both directions, in one place.

The servicer (:mod:`concept_engine.service`) and every client (:mod:`exporter.remote`) use these
functions, so a field added to ``engine.proto`` is mapped once (round-trip tested).
"""

from __future__ import annotations

import json

import numpy as np
from dff_protos import wire
from dff_protos.errors import InvalidInput
from dff_protos.v1 import common_pb2, engine_pb2

from concept_engine.discovery import DiscoveryOptions, Explanation, Progress
from concept_engine.finegrain import Decision
from concept_engine.options import (
    FILTER_MODES,
    INITS,
    K_CRITERIA,
    PRECISION_CHOICES,
    PREDICTION_MODES,
    RESIZE_MODES,
    SOLVERS,
)
from concept_engine.reliability import reliability_warning
from concept_engine.store import ConceptSet, ConceptSetSummary

# proto enum values <-> the option names of concept_engine.options (checked complete below)
_FILTER_MODE: dict[int, str] = {
    engine_pb2.FILTER_MODE_UNSPECIFIED: "", engine_pb2.AUTO: "auto", engine_pb2.ON: "on",
    engine_pb2.OFF: "off"}
_RESIZE_MODE: dict[int, str] = {
    common_pb2.RESIZE_MODE_UNSPECIFIED: "squash", common_pb2.SQUASH: "squash",
    common_pb2.KEEP_ASPECT: "keep_aspect"}
assert set(_FILTER_MODE.values()) - {""} == set(FILTER_MODES)
assert set(_RESIZE_MODE.values()) == set(RESIZE_MODES)
_STRING_CHOICES = {"k_criterion": K_CRITERIA, "solver": SOLVERS, "init": INITS,
                   "prediction_mode": PREDICTION_MODES, "precision": PRECISION_CHOICES}


def _f32(value: float) -> float:
    """A proto ``float`` (float32) as the double the sender most likely meant: the shortest
    decimal that gives the same float32 (0.95 arrives as 0.949999988 and leaves as 0.95)."""
    return float(str(np.float32(value)))


def options_from_proto(msg: engine_pb2.DiscoverOptions, name: str = "") -> DiscoveryOptions:
    """DiscoverOptions -> DiscoveryOptions; zero values take the documented defaults
    (threshold and min_area are proto3 ``optional``: unset takes the default, 0 is 0).
    The legacy ``min_images`` sets both filters' minimum unless 42/43 are set."""
    d = DiscoveryOptions()
    both = msg.min_images or 0

    def mode(value: int, default: str) -> str:
        if value not in _FILTER_MODE:
            raise InvalidInput(f"unknown filter mode {value}")
        return default if value == engine_pb2.FILTER_MODE_UNSPECIFIED else _FILTER_MODE[value]

    if msg.resize.mode not in _RESIZE_MODE:
        raise InvalidInput(f"unknown resize mode {msg.resize.mode}")
    for label, choices in _STRING_CHOICES.items():
        value = getattr(msg, label)
        if value and value not in choices:
            raise InvalidInput(f"{label} {value!r} not in {choices}")
    return DiscoveryOptions(
        name=msg.name or name, target_class=msg.target_class, k=msg.k,
        k_min=msg.k_min or d.k_min, k_max=msg.k_max or d.k_max,
        k_criterion=msg.k_criterion or d.k_criterion,
        prediction_filter=mode(msg.prediction_filter, d.prediction_filter),
        min_probability=_f32(msg.min_probability) or d.min_probability,
        prediction_min_images=msg.prediction_min_images or both or d.prediction_min_images,
        certainty_filter=mode(msg.certainty_filter, d.certainty_filter),
        certainty_quantile=_f32(msg.certainty_quantile) or d.certainty_quantile,
        certainty_min_images=msg.certainty_min_images or both or d.certainty_min_images,
        solver=msg.solver or d.solver, init=msg.init or d.init,
        max_iter=msg.max_iter or d.max_iter, tol=_f32(msg.tol) or d.tol, seed=int(msg.seed),
        layer=msg.layer or d.layer, resize_mode=_RESIZE_MODE[msg.resize.mode],
        size=msg.resize.size or d.size, model=msg.model or d.model,
        classifier=msg.classifier or d.classifier, wire_dtype=msg.wire_dtype or d.wire_dtype,
        threshold=msg.threshold if msg.HasField("threshold") else d.threshold,
        min_area=msg.min_area if msg.HasField("min_area") else d.min_area,
        prediction_mode=msg.prediction_mode or d.prediction_mode,
        prediction_top_n=msg.prediction_top_n or d.prediction_top_n,
        temperature=_f32(msg.temperature) or d.temperature,
        bootstrap=0 if msg.bootstrap < 0 else (msg.bootstrap or d.bootstrap),
        bootstrap_iters=msg.bootstrap_iters or d.bootstrap_iters,
        precision=msg.precision or d.precision)


_FILTER_MODE_TO_PROTO = {"auto": engine_pb2.AUTO, "on": engine_pb2.ON, "off": engine_pb2.OFF}
_RESIZE_MODE_TO_PROTO = {"squash": common_pb2.SQUASH, "keep_aspect": common_pb2.KEEP_ASPECT}


def options_to_proto(options: DiscoveryOptions) -> engine_pb2.DiscoverOptions:
    """DiscoveryOptions -> DiscoverOptions, every field (the inverse of options_from_proto).
    Raises InvalidInput for a filter or resize mode the protocol cannot carry."""
    o = options
    for label, value in (("prediction_filter", o.prediction_filter),
                         ("certainty_filter", o.certainty_filter)):
        if value not in _FILTER_MODE_TO_PROTO:
            raise InvalidInput(f"{label} {value!r} not in {sorted(_FILTER_MODE_TO_PROTO)}")
    if o.resize_mode not in _RESIZE_MODE_TO_PROTO:
        raise InvalidInput(f"resize_mode {o.resize_mode!r} not in "
                           f"{sorted(_RESIZE_MODE_TO_PROTO)}")
    same = o.prediction_min_images == o.certainty_min_images
    return engine_pb2.DiscoverOptions(
        name=o.name, target_class=o.target_class, k=o.k, k_min=o.k_min, k_max=o.k_max,
        k_criterion=o.k_criterion,
        prediction_filter=_FILTER_MODE_TO_PROTO[o.prediction_filter],
        min_probability=o.min_probability,
        certainty_filter=_FILTER_MODE_TO_PROTO[o.certainty_filter],
        certainty_quantile=o.certainty_quantile,
        # an engine that predates fields 42/43 still gets the minimum when both agree
        min_images=o.prediction_min_images if same else 0,
        solver=o.solver, max_iter=o.max_iter, tol=o.tol, seed=o.seed,
        resize=common_pb2.ResizePolicy(mode=_RESIZE_MODE_TO_PROTO[o.resize_mode], size=o.size),
        layer=o.layer, init=o.init, threshold=o.threshold, min_area=o.min_area,
        prediction_min_images=o.prediction_min_images,
        certainty_min_images=o.certainty_min_images, model=o.model, classifier=o.classifier,
        wire_dtype=o.wire_dtype, prediction_mode=o.prediction_mode,
        prediction_top_n=o.prediction_top_n, temperature=o.temperature,
        # 0 (no bootstrap) travels as -1: 0 means "the engine's default"
        bootstrap=o.bootstrap or -1, bootstrap_iters=o.bootstrap_iters, precision=o.precision)


def progress_to_proto(event: Progress | Decision) -> engine_pb2.DiscoverEvent:
    if isinstance(event, Decision):
        return engine_pb2.DiscoverEvent(decision=engine_pb2.ImageDecision(
            id=event.id, kept=event.kept, stage=event.stage, reason=event.reason,
            score=float(np.nan_to_num(event.score, nan=0.0))))
    return engine_pb2.DiscoverEvent(progress=engine_pb2.Progress(
        stage=event.stage, done=event.done, total=event.total, message=event.message))


def summary_to_proto(cs: ConceptSet, n_images: int) -> engine_pb2.DiscoverSummary:
    msg = engine_pb2.DiscoverSummary(
        concept_set_id=cs.id, k=cs.k, k_reason=cs.k_reason, n_images=n_images,
        n_kept=cs.n_images, reconstruction_error=float(cs.provenance.get(
            "reconstruction_error", 0.0)), n_iter=int(cs.provenance.get("n_iter", 0)),
        notices=list(cs.notices))
    for criterion, curve in sorted(cs.k_curves.items()):
        ks = sorted(curve)
        msg.curves.append(engine_pb2.KCurve(criterion=criterion, k=ks,
                                            value=[curve[k] for k in ks]))
    for stage, seconds in cs.stage_seconds.items():
        msg.stage_seconds[stage] = float(seconds)
    if cs.stability is not None:
        stab = np.asarray(cs.stability, np.float64)
        msg.concept_stability.extend(stab.tolist())
        interval = np.asarray(cs.stability_interval, np.float64).reshape(-1, 2)
        msg.stability_low.extend(interval[:, 0].tolist())
        msg.stability_high.extend(interval[:, 1].tolist())
        msg.reliability_warning = reliability_warning(
            cs.set_stability, float(np.mean(stab)) if stab.size else float("nan"))
    msg.set_stability = float(cs.set_stability)
    return msg


def info_to_proto(s: ConceptSetSummary, set_stability: float | None = None,
                  concept_names: list[str] | None = None) -> engine_pb2.ConceptSetInfo:
    stability = s.set_stability if set_stability is None else set_stability
    return engine_pb2.ConceptSetInfo(id=s.id, name=s.name, k=s.k, n_images=s.n_images,
                                     model=s.model, layer=s.layer, created=s.created,
                                     k_reason=s.k_reason, set_stability=stability,
                                     concept_names=list(concept_names or []))


def concept_set_to_proto(cs: ConceptSet) -> engine_pb2.ConceptSet:
    info = ConceptSetSummary(cs.id, cs.name, cs.k, cs.n_images,
                             str(cs.provenance.get("model", "")),
                             str(cs.provenance.get("layer", "")), cs.created, cs.k_reason)
    names = [cs.concept_names[j] if j < len(cs.concept_names) else "" for j in range(cs.k)]
    return engine_pb2.ConceptSet(info=info_to_proto(info, cs.set_stability, names),
                                 bases=wire.to_tensor(cs.bases),
                                 provenance_json=json.dumps(cs.provenance, sort_keys=True,
                                                            default=str))


def explanation_to_proto(e: Explanation, return_heatmaps: bool,
                         overlay_png: bytes = b"", names: list[str] | None = None
                         ) -> engine_pb2.ExplainResponse:
    if e.error is not None:
        return engine_pb2.ExplainResponse(id=e.id, error=wire.item_error(e.error))
    assert e.certainties is not None and e.heatmaps is not None  # set when error is None
    certainties = e.certainties
    resp = engine_pb2.ExplainResponse(id=e.id, certainties=[float(c) for c in certainties],
                                      overlay_png=overlay_png)
    k = len(e.certainties)
    present = [True] * k if e.present is None else [bool(v) for v in e.present]
    relative = ([float("nan")] * k if e.relative_score is None
                else [float(v) for v in e.relative_score])
    resp.present.extend(present)
    resp.relative_score.extend(relative)
    resp.reconstruction_error = float(e.reconstruction_error)
    resp.out_of_distribution = bool(e.out_of_distribution)
    if return_heatmaps:
        resp.heatmaps.CopyFrom(wire.to_tensor(e.heatmaps))
    names = list(names or [])
    for j, polys in enumerate(e.polygons):
        regions = engine_pb2.ConceptRegions(concept=j, certainty=float(certainties[j]),
                                            present=present[j], relative_score=relative[j],
                                            name=names[j] if j < len(names) else "")
        for p in polys:
            regions.contours.append(engine_pb2.Polygon(xy=np.asarray(p).ravel().tolist()))
        resp.regions.append(regions)
    resp.info.CopyFrom(common_pb2.ImageInfo(
        original_height=e.original_size[0], original_width=e.original_size[1],
        input_height=e.input_size[0], input_width=e.input_size[1]))
    return resp

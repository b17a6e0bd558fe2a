"""Discovery on a concept engine service (``dff discover --engine ADDR``).

The engine fits the concept set and stores it; the exporter then fetches it:

1. ``Discover``: options, then the images; events give progress, one decision per (image,
   stage) and a summary (k, reason, curves, stage times, notices, concept set id).
2. ``GetConceptSet`` with ``include_file``: the concept set's HDF5 file exactly as the engine
   stored it (the fit's own heatmaps W, certainties, regions, decisions, k sweep). It is written
   unchanged as ``OUT/<class>/concepts.h5`` (see :class:`EngineConceptSet`), so an engine run
   gives the same outputs as an in-process one, and every image goes through the network once.

Fallback, with a logged warning, when the file cannot come (larger than the engine's or this
client's max message size: RESOURCE_EXHAUSTED / FAILED_PRECONDITION; or an engine that predates
``include_file`` and leaves ``hdf5`` empty): ``GetConceptSet`` for the bases and provenance, then
``Explain`` (H fixed) of the kept images for heatmaps, certainties, contours and image sizes.
Those heatmaps are the fixed-basis solution W(H), close to the fit's W but not identical, and
the features of the kept images are extracted a second time.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
from dff_protos.errors import InvalidInput, TooFewImages

from concept_engine.store import ConceptSet

log = logging.getLogger(__name__)

_FILTER = {"auto": 1, "on": 2, "off": 3}
# DiscoveryOptions fields that DiscoverOptions carries (threshold/min_area go to Explain)
_ON_THE_WIRE = frozenset({
    "target_class", "k", "k_min", "k_max", "k_criterion", "prediction_filter",
    "min_probability", "prediction_min_images", "certainty_min_images", "certainty_filter",
    "certainty_quantile", "solver", "max_iter", "tol", "seed", "layer", "init", "resize_mode",
    "size", "threshold", "min_area",
    "prediction_mode", "prediction_top_n", "temperature", "bootstrap"})


def options_message(name: str, options: dict[str, Any]) -> Any:
    """engine_pb2.DiscoverOptions from the exporter's discovery keyword arguments."""
    from dff_protos.v1 import common_pb2, engine_pb2

    o = dict(options)
    unsupported = sorted(set(o) - _ON_THE_WIRE)
    if unsupported:
        log.warning("the engine protocol cannot carry %s; the engine uses its defaults",
                    ", ".join(unsupported))
    if o.get("certainty_min_images") is not None and o.get("prediction_min_images") is None:
        log.warning("the engine protocol has one min_images for both filters; "
                    "using certainty_min_images for both")
        o["prediction_min_images"] = o["certainty_min_images"]
    msg = engine_pb2.DiscoverOptions(name=name)
    for key in ("target_class", "k_criterion", "solver", "layer", "init", "prediction_mode"):
        if o.get(key):
            setattr(msg, key, str(o[key]))
    if o.get("prediction_min_images") is not None:
        msg.min_images = int(o["prediction_min_images"])
    for key in ("k", "k_min", "k_max", "max_iter"):
        if o.get(key) is not None:
            setattr(msg, key, int(o[key]))
    for key in ("min_probability", "certainty_quantile", "tol"):
        if o.get(key) is not None:
            setattr(msg, key, float(o[key]))
    if o.get("seed") is not None:
        msg.seed = int(o["seed"])
    if o.get("prediction_top_n") is not None:
        msg.prediction_top_n = int(o["prediction_top_n"])
    if o.get("temperature") is not None:
        msg.temperature = float(o["temperature"])
    if o.get("bootstrap") is not None:  # 0 (none) travels as -1: 0 means "engine default"
        msg.bootstrap = int(o["bootstrap"]) or -1
    for key in ("prediction_filter", "certainty_filter"):
        mode = o.get(key)
        if mode is not None:
            msg.__setattr__(key, _FILTER[str(getattr(mode, "value", mode)).lower()])
    resize_mode = o.get("resize_mode")
    size = o.get("size")
    if resize_mode or size:
        mode = {"squash": common_pb2.SQUASH, "keep_aspect": common_pb2.KEEP_ASPECT}.get(
            str(resize_mode or ""), common_pb2.RESIZE_MODE_UNSPECIFIED)
        msg.resize.CopyFrom(common_pb2.ResizePolicy(mode=mode, size=int(size or 0)))
    return msg


@dataclass
class EngineConceptSet(ConceptSet):
    """A concept set made by the engine. ``hdf5`` holds the engine's stored file, byte for byte,
    when this object is exactly that file's content (the exporter then writes those bytes as
    concepts.h5 instead of saving the object again); empty when it was rebuilt from Explain or
    changed here (other region options)."""

    hdf5: bytes = b""


class EngineDiscoverer:
    """A Discoverer that runs discovery on a ConceptEngine service."""

    def __init__(self, address: str, timeout: float = 3600.0,
                 max_message_bytes: int = 256 * 1024 * 1024) -> None:
        import grpc
        from dff_protos.v1 import engine_pb2_grpc

        self.address = address
        self.timeout = timeout
        self.channel = grpc.insecure_channel(address, options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes)])
        self.stub = engine_pb2_grpc.ConceptEngineStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def _requests(self, options: Any, items: list[tuple[str, bytes]]) -> Iterator[Any]:
        from dff_protos.v1 import common_pb2, engine_pb2

        yield engine_pb2.DiscoverRequest(options=options)
        for image_id, data in items:
            yield engine_pb2.DiscoverRequest(image=common_pb2.ImageInput(id=image_id, data=data))

    def discover(self, name: str, items: list[tuple[str, bytes]], options: dict[str, Any],
                 progress: Any = None) -> Any:
        import grpc
        from dff_protos.status import error_from_rpc

        from concept_engine.finegrain import Decision

        msg = options_message(name, options)
        decisions: list[Decision] = []
        summary = None
        try:
            for event in self.stub.Discover(self._requests(msg, items), timeout=self.timeout):
                kind = event.WhichOneof("kind")
                if kind == "progress" and progress is not None:
                    p = event.progress
                    progress(p.stage, p.done, p.total, p.message)
                elif kind == "decision":
                    d = event.decision
                    decisions.append(Decision(id=d.id, kept=d.kept, stage=d.stage,
                                              reason=d.reason, score=d.score))
                elif kind == "summary":
                    summary = event.summary
            if summary is None:
                raise TooFewImages(f"engine at {self.address} ended discovery of {name!r} "
                                   "without a summary")
            cs_msg = self._get_concept_set(summary.concept_set_id)
            if cs_msg.hdf5:
                return self._from_file(cs_msg.hdf5, summary, options)
            return self._from_explain(name, items, options, decisions, summary, cs_msg,
                                      progress)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None

    def _get_concept_set(self, concept_set_id: str) -> Any:
        """GetConceptSet with the stored file; without it (and a warning) when the engine
        cannot send it. A message with an empty ``hdf5`` means: use Explain."""
        import grpc
        from dff_protos.v1 import engine_pb2

        try:
            cs_msg = self.stub.GetConceptSet(engine_pb2.GetConceptSetRequest(
                id=concept_set_id, include_file=True), timeout=self.timeout)
        except grpc.RpcError as exc:
            if exc.code() not in (grpc.StatusCode.RESOURCE_EXHAUSTED,
                                  grpc.StatusCode.FAILED_PRECONDITION):
                raise
            log.warning("engine at %s cannot send concept set %s as a file (%s); explaining "
                        "the kept images again instead (their features are extracted twice "
                        "and the heatmaps only approximate the fit's)", self.address,
                        concept_set_id, exc.details())
            return self.stub.GetConceptSet(
                engine_pb2.GetConceptSetRequest(id=concept_set_id), timeout=60)
        if not cs_msg.hdf5:
            log.warning("engine at %s sent no concept set file (an engine older than "
                        "GetConceptSetRequest.include_file?); explaining the kept images again "
                        "instead (their features are extracted twice and the heatmaps only "
                        "approximate the fit's)", self.address)
        return cs_msg

    def _from_file(self, data: bytes, summary: Any, options: dict[str, Any]) -> EngineConceptSet:
        """The concept set in the engine's file; kept byte for byte unless other region
        options (threshold/min_area, which DiscoverOptions does not carry) were asked for."""
        from concept_engine import heatmaps as hm
        from concept_engine.store import load_concept_set

        fd, tmp = tempfile.mkstemp(prefix=".engine-", suffix=".h5")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            cs = load_concept_set(tmp)
        finally:
            os.unlink(tmp)
        if cs.id != summary.concept_set_id:
            raise InvalidInput(f"engine at {self.address} sent concept set {cs.id!r} for "
                               f"{summary.concept_set_id!r}")
        exact = True
        threshold = float(cs.threshold if options.get("threshold") is None
                          else options["threshold"])
        min_area = float(cs.min_area if options.get("min_area") is None else options["min_area"])
        if (threshold, min_area) != (cs.threshold, cs.min_area):
            # regions are a function of the stored heatmaps: redraw them here, as an
            # in-process run with these options would
            log.info("regions at threshold %g, min_area %g (the engine used %g, %g)",
                     threshold, min_area, cs.threshold, cs.min_area)
            cs.polygons = [hm.concept_polygons(m, (int(s[0]), int(s[1])), threshold, min_area)
                           for m, s in zip(cs.heatmaps, cs.original_sizes, strict=True)]
            cs.threshold, cs.min_area = threshold, min_area
            exact = False
        out = EngineConceptSet(**{f.name: getattr(cs, f.name) for f in fields(ConceptSet)},
                               hdf5=data if exact else b"")
        # for the report only (the file keeps the engine's own provenance and times)
        out.provenance = {**cs.provenance, "engine": self.address}
        out.stage_seconds = dict(summary.stage_seconds)
        return out

    def _from_explain(self, name: str, items: list[tuple[str, bytes]], options: dict[str, Any],
                      decisions: list[Any], summary: Any, cs_msg: Any,
                      progress: Any) -> EngineConceptSet:
        """The concept set rebuilt from the bases and Explain of the kept images (fallback)."""
        from dff_protos.wire import from_tensor

        bases = from_tensor(cs_msg.bases)
        provenance = json.loads(cs_msg.provenance_json or "{}")
        kept_ids = _kept_ids(items, decisions, provenance)
        used = provenance.get("options", {}) if isinstance(provenance.get("options"),
                                                            dict) else {}
        # the proto's DiscoverOptions has no threshold/min_area: apply them at Explain
        threshold = float(options.get("threshold", used.get("threshold", 0.75)))
        min_area = float(options.get("min_area", used.get("min_area", 0.01)))
        t0 = time.perf_counter()
        kept = set(kept_ids)
        explained = self._explain(summary.concept_set_id,
                                  [(i, d) for i, d in items if i in kept],
                                  threshold, min_area, progress)
        explain_s = time.perf_counter() - t0
        heatmaps, certs, orig, inp, polys = [], [], [], [], []
        for image_id in kept_ids:
            r = explained[image_id]
            if r.HasField("error") and r.error.code:
                raise TooFewImages(f"engine could not explain training image {image_id}: "
                                   f"{r.error.message}")
            heatmaps.append(from_tensor(r.heatmaps))
            certs.append(np.asarray(r.certainties, dtype=np.float32))
            orig.append((r.info.original_height, r.info.original_width))
            inp.append((r.info.input_height, r.info.input_width))
            per_concept: list[list[np.ndarray]] = [[] for _ in range(bases.shape[0])]
            for region in r.regions:
                per_concept[region.concept] = [
                    np.asarray(p.xy, dtype=np.int32).reshape(-1, 2) for p in region.contours]
            polys.append(per_concept)
        k = int(bases.shape[0])
        curves = {c.criterion: {int(kk): float(v) for kk, v in zip(c.k, c.value, strict=True)}
                  for c in summary.curves}
        return EngineConceptSet(
            name=name, bases=bases, image_ids=kept_ids, heatmaps=heatmaps,
            certainties=np.asarray(certs, dtype=np.float32).reshape(len(kept_ids), k),
            original_sizes=np.asarray(orig, dtype=np.int32).reshape(-1, 2),
            input_sizes=np.asarray(inp, dtype=np.int32).reshape(-1, 2),
            polygons=polys, decisions=decisions, k_curves=curves,
            k_criterion=str(provenance.get("k_criterion", options.get("k_criterion", ""))),
            k_reason=summary.k_reason, threshold=threshold, min_area=min_area,
            provenance={**provenance, "engine": self.address,
                        "reconstruction_error": summary.reconstruction_error,
                        "n_iter": summary.n_iter},
            notices=list(summary.notices),
            stage_seconds={**dict(summary.stage_seconds), "explain": explain_s},
            id=summary.concept_set_id, created=cs_msg.info.created)

    def _explain(self, concept_set_id: str, items: list[tuple[str, bytes]], threshold: float,
                 min_area: float, progress: Any) -> dict[str, Any]:
        from dff_protos.v1 import common_pb2, engine_pb2

        def requests() -> Iterator[Any]:
            yield engine_pb2.ExplainRequest(options=engine_pb2.ExplainOptions(
                concept_set_id=concept_set_id, return_heatmaps=True, threshold=threshold,
                min_area=min_area))
            for image_id, data in items:
                yield engine_pb2.ExplainRequest(
                    image=common_pb2.ImageInput(id=image_id, data=data))

        out: dict[str, Any] = {}
        for resp in self.stub.Explain(requests(), timeout=self.timeout):
            out[resp.id] = resp
            if progress is not None:
                progress("explain", len(out), len(items), "")
        return out


def _kept_ids(items: list[tuple[str, bytes]], decisions: list[Any],
              provenance: dict[str, Any]) -> list[str]:
    """Training images in fit order: the provenance's list when it has one, else every input
    image that no stage dropped, in input order."""
    for key in ("kept_images", "kept_ids", "image_ids"):
        ids = provenance.get(key)
        if isinstance(ids, list) and ids and all(isinstance(i, str) for i in ids):
            return ids
    dropped = {d.id for d in decisions if not d.kept}
    return [i for i, _ in items if i not in dropped]


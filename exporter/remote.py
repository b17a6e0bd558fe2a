"""Discovery on a concept engine service (``dff discover --engine ADDR``).

The engine fits the concept set; to write the same outputs as an in-process run the exporter
then needs the pieces the service exposes:

1. ``Discover``: options, then the images; events give progress, one decision per (image,
   stage) and a summary (k, reason, curves, stage times, notices, concept set id).
2. ``GetConceptSet``: the bases H and the provenance.
3. ``Explain`` (H fixed) of the kept images: heatmaps at feature resolution, certainties,
   contours and image sizes.

The heatmaps of step 3 are the fixed-basis solution W(H) for the training images, not the W of
the fit itself; for a converged fit the two agree closely (W of the fit is the fixed point of the
same update). The concept set is then saved locally with the engine's store module, so the
folder layout is the same either way.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
from dff_protos.errors import TooFewImages

log = logging.getLogger(__name__)

_FILTER = {"auto": 1, "on": 2, "off": 3}
# DiscoveryOptions fields that DiscoverOptions carries (threshold/min_area go to Explain)
_ON_THE_WIRE = frozenset({
    "target_class", "k", "k_min", "k_max", "k_criterion", "prediction_filter",
    "min_probability", "prediction_min_images", "certainty_min_images", "certainty_filter",
    "certainty_quantile", "solver", "max_iter", "tol", "seed", "layer", "init", "resize_mode",
    "size", "threshold", "min_area"})


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
    for key in ("target_class", "k_criterion", "solver", "layer", "init"):
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
        from dff_protos.v1 import engine_pb2
        from dff_protos.wire import from_tensor

        from concept_engine.finegrain import Decision
        from concept_engine.store import ConceptSet

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
            cs_msg = self.stub.GetConceptSet(
                engine_pb2.GetConceptSetRequest(id=summary.concept_set_id), timeout=60)
            bases = from_tensor(cs_msg.bases)
            provenance = json.loads(cs_msg.provenance_json or "{}")
            kept_ids = _kept_ids(items, decisions, provenance)
            used = provenance.get("options", {}) if isinstance(provenance.get("options"),
                                                                dict) else {}
            # the proto's DiscoverOptions has no threshold/min_area: apply them at Explain
            threshold = float(options.get("threshold", used.get("threshold", 0.75)))
            min_area = float(options.get("min_area", used.get("min_area", 0.01)))
            t0 = time.perf_counter()
            explained = self._explain(summary.concept_set_id,
                                      [(i, d) for i, d in items if i in set(kept_ids)],
                                      threshold, min_area, progress)
            explain_s = time.perf_counter() - t0
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None
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
        return ConceptSet(
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


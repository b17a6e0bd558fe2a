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
from typing import TYPE_CHECKING, Any

import numpy as np
from dff_protos.errors import DFFError, InvalidInput, TooFewImages

from concept_engine.store import ConceptSet

if TYPE_CHECKING:
    from concept_engine.discovery import DiscoveryOptions

log = logging.getLogger(__name__)


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
                 max_message_bytes: int = 256 * 1024 * 1024,
                 security: Any = None, max_image_bytes: int = (64 << 20) - 4096) -> None:
        """``security``: a :class:`dff_protos.security.ClientSecurity` (TLS, client
        certificate, token); None = the process default (the CLI flags, else the env)."""
        from dff_protos.security import default_client_security
        from dff_protos.v1 import engine_pb2_grpc

        self.address = address
        self.timeout = timeout
        # an image above the engine's message limit (default 64 MiB) would fail the whole
        # Discover stream: it fails alone, here, and is never sent
        self.max_image_bytes = max_image_bytes
        security = security if security is not None else default_client_security()
        self.channel = security.channel(address, options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.keepalive_time_ms", 30_000), ("grpc.keepalive_timeout_ms", 10_000)])
        self.stub = engine_pb2_grpc.ConceptEngineStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def _requests(self, options: Any, items: list[tuple[str, bytes]]) -> Iterator[Any]:
        from dff_protos.v1 import common_pb2, engine_pb2

        yield engine_pb2.DiscoverRequest(options=options)
        for image_id, data in items:
            yield engine_pb2.DiscoverRequest(image=common_pb2.ImageInput(id=image_id, data=data))

    def discover(self, name: str, items: list[tuple[str, bytes]], options: DiscoveryOptions,
                 progress: Any = None) -> Any:
        from concept_engine.convert import options_to_proto
        from concept_engine.finegrain import Decision
        from exporter.export import discovery_options

        options = discovery_options(name, options)
        msg = options_to_proto(options)
        decisions: list[Decision] = []
        items, too_big = _as_files(items)
        too_big += [Decision(id=i, kept=False, stage="error",
                             reason=f"file of {len(d)} bytes is above the engine's message "
                                    f"limit ({self.max_image_bytes} bytes); not sent")
                    for i, d in items if len(d) > self.max_image_bytes]
        if too_big:
            log.warning("%d image(s) of %r too large to send to the engine: %s", len(too_big),
                        name, ", ".join(d.id for d in too_big[:5]))
            refused = {d.id for d in too_big}
            items = [(i, d) for i, d in items if i not in refused]
        cs = self._discover(name, items, options, progress, msg, decisions)
        cs.decisions = list(cs.decisions) + too_big
        return cs

    def _discover(self, name: str, items: list[tuple[str, bytes]], options: DiscoveryOptions,
                  progress: Any, msg: Any, decisions: list[Any]) -> Any:
        import grpc
        from dff_protos.status import error_from_rpc

        from concept_engine.finegrain import Decision

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

    def _from_file(self, data: bytes, summary: Any, options: DiscoveryOptions
                   ) -> EngineConceptSet:
        """The concept set in the engine's file; kept byte for byte unless it was made with
        other region options (threshold/min_area: an engine that predates DiscoverOptions
        fields 40/41 ignores them) - then the regions are redrawn here."""
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
        threshold, min_area = float(options.threshold), float(options.min_area)
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

    def _from_explain(self, name: str, items: list[tuple[str, bytes]], options: DiscoveryOptions,
                      decisions: list[Any], summary: Any, cs_msg: Any,
                      progress: Any) -> EngineConceptSet:
        """The concept set rebuilt from the bases and Explain of the kept images (fallback)."""
        from dff_protos.wire import from_tensor

        bases = from_tensor(cs_msg.bases)
        provenance = json.loads(cs_msg.provenance_json or "{}")
        kept_ids = _kept_ids(items, decisions, provenance)
        threshold, min_area = float(options.threshold), float(options.min_area)
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
            k_criterion=str(provenance.get("k_criterion", options.k_criterion)),
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


def _as_files(items: list[tuple[str, Any]]) -> tuple[list[tuple[str, bytes]], list[Any]]:
    """Items for the engine, which takes files: decoded pixels (NumPy arrays) become lossless
    PNGs; pixels that are not uint8 (H, W, 3) are that image's error decision, not sent."""
    from concept_engine.finegrain import Decision
    from feature_server.images import pixels_to_png

    files: list[tuple[str, bytes]] = []
    refused: list[Any] = []
    for image_id, data in items:
        if isinstance(data, np.ndarray):
            try:
                data = pixels_to_png(data)
            except DFFError as exc:
                refused.append(Decision(id=image_id, kept=False, stage="error", reason=str(exc)))
                continue
        files.append((image_id, data))
    return files, refused


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


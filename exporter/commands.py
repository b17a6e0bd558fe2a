"""`dff discover`, `dff explain`, `dff label` and the run of `dff extract`: the user-facing
commands of the exporter.

Exit codes: 0 everything done (or already done), 2 usage error (bad arguments, missing
folder, and the ordinary mistakes checked before any feature is extracted: OUT a file,
a dangling link or read-only, --concepts not a (usable) concept set, explain's --out holding a
discover report, --engine pointed at a feature server, feature servers that cannot be reached,
an unknown --model/--layer/--classifier of the model that will run, --k above a class's number
of images, a class folder with sub-folders of images or named like a site-level file),
3 partial failure (a class failed, or some images could not be read, decoded, explained or
extracted), 1 internal error (a bug: the traceback is logged).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from concept_engine.options import (
    INITS,
    K_CRITERIA,
    PREDICTION_MODES,
    RESIZE_MODES,
    SOLVERS,
)

log = logging.getLogger(__name__)

EXIT_OK, EXIT_INTERNAL, EXIT_USAGE, EXIT_PARTIAL = 0, 1, 2, 3

_DISCOVER_HELP = """\
Discover the visual concepts a CNN (VGG-19, layer conv5_4) uses for a class of images, with
Deep Feature Factorization: non-negative matrix factorisation of the network's activations.

DATA_DIR is either ONE class folder (e.g. data/ant/ with photos in it) or a folder of class
folders (data/ with ant/, bee/, ...): then every class is exported. For each class you get
OUT/<class>/ with:
  index.html      open it in a browser: everything below on one page
  concepts.h5     the concept set (bases, heatmaps, certainties, k sweep, decisions, provenance)
  overlays/       every image with each concept's regions contoured (one folder per concept)
  combined/       every image with all concepts, one colour each, and a legend
  grids/          per concept: all images, and the top images by certainty
  k_sweep.png     how the number of concepts k was chosen
  summary.json    images kept/dropped, k and why, time per stage (written last: "done")

Steps: (1) features of every image; (2) fine-graining: keep images whose 5 most probable
classifier classes include the folder's class (prediction filter; skipped with a notice when the
folder name is not a classifier class) and, with --certainty-filter, drop the least certain
images; (3) choose k (or use --k); (4) fit, and measure each concept's stability; (5) write the
outputs. By default everything runs in this process; models are
built into $DFF_HOME (~/.cache/dff) on first use.
"""

_DISCOVER_EPILOG = """\
examples:
  dff discover data/imagenet_data/ant --out out/            # one class, k estimated
  dff discover data/imagenet_data --out out/ --k 3          # every class, k fixed
  dff discover data/gymnast --out out/ --no-prediction-filter
  dff discover data/ --out out/ --feature-server fs1:50051,fs2:50051
  dff discover data/ --out out/ --engine engine:50052

  dff discover data/ --out out/ --shard 0/4                 # a quarter of the classes

A run can be interrupted and started again: finished classes are skipped (use --force to
redo them), unfinished ones are redone from scratch. Sharding: N runs with --shard 0/N ..
N-1/N (or a Kubernetes Indexed Job: JOB_COMPLETION_INDEX/JOB_COMPLETIONS) writing to one OUT
give exactly what one run gives; each rebuilds OUT/index.html over all finished classes.

Layout: a folder with image files is one class; its sub-folders must not hold images (such a
folder is refused, never merged). Hidden files and OUT (when inside DATA_DIR) are not read.

Exit codes: 0 ok, 2 usage error (reported before any feature is extracted), 3 some class
failed or some image could not be read or decoded, 1 internal error.
"""

_EXPLAIN_HELP = """\
Explain new images with a concept set found by `dff discover`: the concept bases stay fixed,
only each image's heatmaps are fitted. Writes to DIR: overlays/concept_NN/ (each concept's
regions contoured), combined/ (all concepts, one colour each, with a legend), grids/,
explanations.json (certainty of every concept in every image) and index.html. A rerun into
the same DIR first removes what explain wrote there before; a DIR holding a `dff discover`
report is refused.
"""


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {value}")
    return value


def _k_range(text: str) -> tuple[int, int]:
    try:
        lo, hi = (int(x) for x in text.replace(":", "-").split("-"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN-MAX such as 2-6, got {text!r}") from None
    if not 1 <= lo <= hi:
        raise argparse.ArgumentTypeError(f"need 1 <= MIN <= MAX, got {text!r}")
    return lo, hi


def _addresses(text: str) -> list[str]:
    return [a.strip() for a in text.split(",") if a.strip()]


_SIZE_UNITS = {"": 1, "B": 1, "K": 1 << 10, "KB": 1 << 10, "KIB": 1 << 10, "M": 1 << 20,
               "MB": 1 << 20, "MIB": 1 << 20, "G": 1 << 30, "GB": 1 << 30, "GIB": 1 << 30}


def _byte_size(text: str) -> int:
    """'64M', '1G', '500k', '1048576' -> bytes (binary units)."""
    t = text.strip().upper()
    num = t.rstrip("KMGIB")
    unit = t[len(num):]
    try:
        value = float(num)
    except ValueError:
        value = -1.0
    if unit not in _SIZE_UNITS or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a size such as 64M, 1G or 500000, "
                                         f"got {text!r}")
    return int(value * _SIZE_UNITS[unit])


def parse_shard(text: str) -> tuple[int, int]:
    """'I/N' -> (I, N) with 0 <= I < N (I is 0-based, like JOB_COMPLETION_INDEX)."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected I/N such as 0/4, got {text!r}") from None
    if n < 1 or not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"need 0 <= I < N (I counts from 0), got {text!r}")
    return i, n


def shard_from_env(env: Any = None) -> tuple[int, int] | None:
    """(index, count) from Kubernetes' JOB_COMPLETION_INDEX + JOB_COMPLETIONS (Indexed Job),
    or None when unset. Raises ValueError with a message when they are malformed."""
    env = os.environ if env is None else env
    index, count = env.get("JOB_COMPLETION_INDEX"), env.get("JOB_COMPLETIONS")
    if index is None or index == "":
        if count:
            raise ValueError(f"JOB_COMPLETIONS={count} is set but JOB_COMPLETION_INDEX is not; "
                             "set both (an Indexed Job sets JOB_COMPLETION_INDEX) or give "
                             "--shard I/N")
        return None
    if not count:
        raise ValueError("JOB_COMPLETION_INDEX is set but JOB_COMPLETIONS is not; set both "
                         "(an Indexed Job with completions N) or give --shard I/N")
    try:
        return parse_shard(f"{index}/{count}")
    except argparse.ArgumentTypeError as exc:
        raise ValueError(f"JOB_COMPLETION_INDEX={index} JOB_COMPLETIONS={count}: {exc}"
                         ) from None


def _add_common_source(p: argparse.ArgumentParser) -> None:
    p.add_argument("--feature-server", metavar="ADDR[,ADDR...]", type=_addresses, default=[],
                   help="use running feature servers (host:port, comma-separated; requests "
                        "are balanced over them) instead of running the model in-process "
                        "(default: in-process)")
    p.add_argument("--client-decode", action="store_true",
                   help="with --feature-server: decode the images here and send their pixels, "
                        "so the servers spend no CPU on decoding (same as DFF_CLIENT_DECODE=1)")
    p.add_argument("--client-prepare", action="store_true",
                   help="with --feature-server: decode AND preprocess the images here and send "
                        "the network inputs, so the servers neither decode nor preprocess "
                        "(same as DFF_CLIENT_PREPARE=1; DFF_CLIENT_PREPARE=float16 sends them "
                        "as float16, half the bytes)")
    p.add_argument("--timeout", type=float, default=3600.0, metavar="SECONDS",
                   help="deadline of each service call (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bars on stderr (they are plain lines when not a terminal)")
    from dff_protos.security import add_client_security_args

    add_client_security_args(p)
    from feature_server.cli import add_precision_argument

    add_precision_argument(p)


def register(sub: argparse._SubParsersAction) -> None:
    """Add `discover` and `explain` to the `dff` command's subparsers."""
    from concept_engine.discovery import DiscoveryOptions
    from exporter.export import DEFAULT_MAX_FILE_BYTES

    D = DiscoveryOptions()  # the defaults shown are the library's own
    fmt = argparse.RawDescriptionHelpFormatter
    d = sub.add_parser("discover", help="discover concepts of a class folder (or of every "
                                        "class folder) and export pictures + HTML",
                       description=_DISCOVER_HELP, epilog=_DISCOVER_EPILOG, formatter_class=fmt)
    d.add_argument("data_dir", metavar="DATA_DIR", type=Path,
                   help="a class folder of images, or a folder of class folders")
    d.add_argument("--out", "-o", required=True, type=Path, metavar="OUT",
                   help="output folder; one sub-folder per class, and index.html over all")
    g = d.add_argument_group("number of concepts")
    g.add_argument("--k", type=_positive_int, metavar="N",
                   help="use exactly N concepts (default: estimate k over --k-range)")
    g.add_argument("--k-range", type=_k_range, metavar="MIN-MAX",
                   help=f"values of k tried when estimating (default: {D.k_min}-{D.k_max})")
    g.add_argument("--k-criterion", choices=K_CRITERIA, default=D.k_criterion,
                   help="how k is estimated: split-half stability of the concepts, "
                        "staNMF instability over random restarts, bi-cross-validation (bcv), "
                        "the seed's mean certainty (biased towards small k), or the elbow of "
                        "the reconstruction error")
    g = d.add_argument_group("factorisation")
    g.add_argument("--solver", choices=SOLVERS, default=D.solver,
                   help="NMF solver: hals (fast) or mu (Lee-Seung, as in the paper)")
    g.add_argument("--init", choices=INITS, default=D.init,
                   help="NMF initialisation (nndsvd is deterministic)")
    g.add_argument("--bootstrap", type=int, metavar="B", default=D.bootstrap,
                   help="resamples for each concept's bootstrap stability (0 = not measured)")
    g.add_argument("--max-iter", type=_positive_int, metavar="N", default=D.max_iter,
                   help="most NMF iterations per fit")
    g.add_argument("--tol", type=float, metavar="TOL", default=D.tol,
                   help="NMF stops when the relative error changes by less than this")
    g.add_argument("--seed", type=int, default=D.seed,
                   help="random seed: same images + same seed = same concepts")
    g.add_argument("--model", metavar="NAME", default=D.model,
                   help="feature model: vgg19 or one added with `dff models import` "
                        "/ `dff models export-torch` (see `dff models list`)")
    g.add_argument("--layer", metavar="NAME", default=D.layer,
                   help="network layer whose activations are factorised")
    g.add_argument("--classifier", metavar="NAME", default=D.classifier,
                   help="classifier of the prediction filter")
    g.add_argument("--resize", choices=RESIZE_MODES, default=D.resize_mode,
                   help="squash to 224x224 like the paper, or keep the aspect ratio")
    g = d.add_argument_group("fine-graining (which images are used)")
    g.add_argument("--target-class", metavar="NAME",
                   help="classifier class for the prediction filter (default: the folder "
                        "name)")
    g.add_argument("--no-prediction-filter", action="store_true",
                   help="use every image, whatever the classifier thinks it shows")
    g.add_argument("--require-prediction-filter", action="store_true",
                   help="fail (instead of skipping the filter with a notice) when the class "
                        "name is not a classifier class")
    g.add_argument("--prediction-mode", choices=PREDICTION_MODES,
                   help="prediction filter rule: probability (p >= --min-probability), top_n "
                        "(class among the --prediction-top most probable), calibrated "
                        "(temperature-scaled p >= --min-probability)")
    g.add_argument("--prediction-top", type=_positive_int, metavar="N",
                   help="top_n mode: keep images whose top N classes include the class "
                        "(default 5); implies --prediction-mode top_n")
    g.add_argument("--min-probability", type=_fraction, metavar="P",
                   default=D.min_probability,
                   help="prediction filter (probability and calibrated modes): keep images "
                        "with class probability >= P")
    g.add_argument("--certainty-filter", action="store_true",
                   help="drop the least certain images (the seed's second filter; off by "
                        "default: measured not to make concept sets more reproducible)")
    g.add_argument("--no-certainty-filter", action="store_true",
                   help="do not drop the least certain images (the default)")
    g.add_argument("--certainty-quantile", type=_fraction, metavar="Q",
                   default=D.certainty_quantile,
                   help="certainty filter: drop images below this quantile of certainty")
    g.add_argument("--min-images", type=_positive_int, metavar="N",
                   default=D.prediction_min_images,
                   help="prediction filter: if fewer than N images pass, keep the N most "
                        "probable, with a notice")
    g.add_argument("--certainty-min-images", type=_positive_int, metavar="N",
                   default=D.certainty_min_images,
                   help="certainty filter: skip it when fewer than N images would remain")
    g = d.add_argument_group("pictures")
    g.add_argument("--threshold", type=_fraction, metavar="T", default=D.threshold,
                   help="a concept's region is where its max-normalised heatmap >= T")
    g.add_argument("--min-area", type=_fraction, metavar="A", default=D.min_area,
                   help="ignore regions smaller than this fraction of the image")
    g.add_argument("--top", type=_positive_int, default=8, metavar="N",
                   help="images in each concept's 'top by certainty' grid")
    g = d.add_argument_group("where it runs")
    g.add_argument("--engine", metavar="ADDR",
                   help="run discovery on a concept engine service (host:port); it uses its "
                        "own feature servers (default: in this process)")
    _add_common_source(g)
    g.add_argument("--force", action="store_true",
                   help="redo classes that are already finished in OUT")
    g.add_argument("--shard", type=parse_shard, metavar="I/N",
                   help="do only shard I of N (0 <= I < N) of the classes: sorted by name, "
                        "class j goes to shard j mod N (default: every class; or "
                        "JOB_COMPLETION_INDEX/JOB_COMPLETIONS when set)")
    g.add_argument("--max-file-size", type=_byte_size, metavar="SIZE",
                   default=DEFAULT_MAX_FILE_BYTES,
                   help="image files larger than this are refused (an error for that image "
                        "only) from their size, before being read; e.g. 64M, 1G "
                        f"(default: {DEFAULT_MAX_FILE_BYTES >> 20}M)")
    pipe = g.add_mutually_exclusive_group()
    pipe.add_argument("--pipeline", dest="pipeline", action="store_const", const=True,
                      default=None,
                      help="overlap class i's fit and pictures with class i+1's feature "
                           "extraction (default: when the features are computed elsewhere - "
                           "--feature-server, --engine - or on a GPU; on the CPU the embedded "
                           "extractor already keeps every core busy)")
    pipe.add_argument("--no-pipeline", dest="pipeline", action="store_const", const=False,
                      help="export the classes strictly one after another")
    d.set_defaults(func=run_discover)

    e = sub.add_parser("explain", help="heatmaps, certainties and contoured overlays of new "
                                       "images with a stored concept set",
                       description=_EXPLAIN_HELP, formatter_class=fmt,
                       epilog="example:\n  dff explain new_photos/ --concepts out/ant/"
                              "concepts.h5 --out explained/")
    e.add_argument("images", metavar="IMAGES_OR_DIR", nargs="+", type=Path,
                   help="image files and/or folders of images")
    e.add_argument("--concepts", required=True, type=Path, metavar="CONCEPTS_H5",
                   help="a concept set written by `dff discover` (OUT/<class>/concepts.h5)")
    e.add_argument("--out", "-o", required=True, type=Path, metavar="DIR",
                   help="output folder (index.html, explanations.json, pictures)")
    e.add_argument("--threshold", type=_fraction, default=None, metavar="T",
                   help="region threshold (default: the concept set's)")
    e.add_argument("--min-area", type=_fraction, default=None, metavar="A",
                   help="minimum region area fraction (default: the concept set's)")
    e.add_argument("--top", type=_positive_int, default=8, metavar="N",
                   help="images in each concept's 'top by certainty' grid")
    e.add_argument("--max-file-size", type=_byte_size, metavar="SIZE",
                   default=DEFAULT_MAX_FILE_BYTES,
                   help="image files larger than this are refused (an error for that image "
                        f"only) before being read (default: {DEFAULT_MAX_FILE_BYTES >> 20}M)")
    _add_common_source(e)
    e.set_defaults(func=run_explain)

    lab = sub.add_parser("label", help="name the concepts of a concept set (every picture and "
                                       "report uses the names)", formatter_class=fmt,
                         description="Store names for concepts in a concept set, e.g. "
                                     "`dff label out/ant/concepts.h5 0=thorax 1=legs`. With "
                                     "--images the class's pictures and index.html next to "
                                     "the file are drawn again with the names.")
    lab.add_argument("concepts", type=Path, metavar="CONCEPTS_H5",
                     help="the concept set file (OUT/<class>/concepts.h5)")
    lab.add_argument("names", nargs="*", metavar="J=NAME",
                     help="concept index = name ('J=' clears a name); none: list the names")
    lab.add_argument("--images", type=Path, metavar="CLASS_DIR",
                     help="the class folder of photos the set was made from: redraw the "
                          "pictures next to the concept set with the names")
    lab.add_argument("--top", type=_positive_int, default=8, metavar="N",
                     help="with --images: images in each concept's 'top by certainty' grid")
    lab.set_defaults(func=run_label)


# ---------------------------------------------------------------------------- discover

def options_from_args(args: argparse.Namespace) -> Any:
    """The typed DiscoveryOptions of the command line (the class name is set per class)."""
    from concept_engine.discovery import DiscoveryOptions

    D = DiscoveryOptions()
    k_min, k_max = args.k_range or (D.k_min, D.k_max)
    prediction = "auto"
    if args.no_prediction_filter:
        prediction = "off"
    elif args.require_prediction_filter:
        prediction = "on"
    certainty = D.certainty_filter
    if args.no_certainty_filter:
        certainty = "off"
    elif args.certainty_filter:
        certainty = "auto"
    prediction_mode = args.prediction_mode or ("top_n" if args.prediction_top
                                               else D.prediction_mode)
    return DiscoveryOptions(
        target_class=args.target_class or "", k=args.k or 0, k_min=k_min, k_max=k_max,
        k_criterion=args.k_criterion, prediction_filter=prediction,
        prediction_mode=prediction_mode,
        prediction_top_n=args.prediction_top or D.prediction_top_n,
        min_probability=args.min_probability, prediction_min_images=args.min_images,
        certainty_filter=certainty, bootstrap=args.bootstrap,
        certainty_quantile=args.certainty_quantile,
        certainty_min_images=args.certainty_min_images, solver=args.solver, init=args.init,
        max_iter=args.max_iter, tol=args.tol, seed=args.seed, layer=args.layer,
        model=args.model, classifier=args.classifier,
        precision=getattr(args, "precision", D.precision),
        resize_mode=args.resize, threshold=args.threshold, min_area=args.min_area)


_STAGE_ORDER = ("read", "features_wait", "features", "prediction_filter", "certainty_filter",
                "k_sweep", "fit", "reliability", "regions", "explain", "total", "save", "render")


def _fmt_seconds(stages: dict[str, float]) -> str:
    """'features 20.1s, ...' in pipeline order ('total' is the engine's discovery total)."""
    rank = {s: i for i, s in enumerate(_STAGE_ORDER)}
    ordered = sorted(stages.items(), key=lambda kv: (rank.get(kv[0], len(rank)), kv[0]))
    return ", ".join(f"{'discovery total' if k == 'total' else k} {float(v):.1f}s"
                     for k, v in ordered)


def reliability_line(path: Path) -> str:
    """'reliability: split-half 0.91; concepts 0.95 0.88 ...' from a concept set file (plus
    the low-reliability warning), '' when the file has none (schema 1, or no file)."""
    if not path.is_file():
        return ""
    try:
        from concept_engine.reliability import reliability_warning
        from concept_engine.store import load_concept_set

        cs = load_concept_set(path)
    except Exception as exc:  # noqa: BLE001 - the summary must not fail on it
        log.debug("no reliability for %s: %s", path, exc)
        return ""
    if cs.stability is None:
        return ""
    import numpy as np

    stab = np.asarray(cs.stability, float)
    per = (" ".join(f"{cs.concept_label(j)}={v:.2f}" for j, v in enumerate(stab))
           if not np.isnan(stab).all() else "not measured (--bootstrap 0)")
    text = f"reliability: split-half {cs.set_stability:.2f}; concept stability {per}"
    warning = reliability_warning(cs.set_stability, float(np.mean(stab)))
    return text + (f"\n    WARNING: {warning}" if warning else "")


def print_report(report: Any, stream: Any = None) -> None:
    from exporter.progress import write_line

    r = report
    lines = []
    by_reason: dict[str, list[str]] = {}  # the files that could not be used, by reason
    for e in getattr(r, "errors", None) or []:
        by_reason.setdefault(str(e.get("reason", "")), []).append(str(e.get("id", "")))
    if r.status == "failed":
        lines.append(f"[FAILED] {r.name}: {r.error}")
        for why, ids in by_reason.items():
            lines.append(f"    error {len(ids):4d}: {_some(ids)}: {why}")
    else:
        tag = "done" if r.status == "done" else "skipped (already done; --force redoes it)"
        lines.append(f"[{tag}] {r.name} -> {Path(r.out_dir) / 'index.html'}")
        lines.append(f"    images: {r.n_images} found, {r.n_kept} used for the concepts")
        for why, count in r.dropped.items():
            ids = by_reason.get(why[len("error: "):]) if why.startswith("error: ") else None
            if ids:
                why = f"error: {_some(ids)}: {why[len('error: '):]}"
            lines.append(f"    dropped {count:4d}: {why}")
        lines.append(f"    k = {r.k}: {r.k_reason}")
        line = reliability_line(Path(r.out_dir) / "concepts.h5")
        if line:
            lines.append(f"    {line}")
        for notice in r.notices:
            lines.append(f"    notice: {notice}")
        if r.stage_seconds:
            lines.append(f"    time: {_fmt_seconds(r.stage_seconds)} (total {r.seconds:.1f}s)")
    write_line("\n".join(lines), file=stream or sys.stdout)


def _some(ids: list[str], n: int = 5) -> str:
    """'a.jpg, b.jpg' (at most n names, then 'and N more')."""
    more = f" and {len(ids) - n} more" if len(ids) > n else ""
    return ", ".join(ids[:n]) + more


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


class UsageError(Exception):
    """An ordinary mistake found before any work: exit 2 with this one-line message."""


def check_out_dir(out: Path) -> None:
    """OUT must be a folder this process can create and write (UsageError otherwise)."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; give a folder (it is created if missing)")
    probe = out
    while not probe.exists():  # the nearest existing ancestor is where it would be created
        if probe.is_symlink():  # a dangling link: mkdir cannot create the folder through it
            raise UsageError(f"--out {out}: {probe} is a symbolic link to "
                             f"{os.readlink(probe)}, which does not exist; create that folder "
                             "or remove the link")
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise UsageError(f"--out {out}: {probe} is a file; give a folder")
    try:
        with tempfile.TemporaryFile(dir=probe, prefix=".dff-write-test-"):
            pass
    except OSError as exc:
        raise UsageError(f"--out {out} is not writable ({probe}: {exc.strerror}); give a "
                         "folder you can write to, or fix its permissions") from None


def probe_service(address: str, want: str, other: str, other_flag: str,
                  timeout: float = 5.0) -> None:
    """UsageError when the server at ``address`` answers but does not serve ``want`` and does
    serve ``other`` (e.g. a feature server given to --engine). Checked with grpc.health.v1
    (reachable even with reflection off). A server that cannot be reached or does not answer
    health is left to the real call (it reports its own error)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    def status(stub: Any, service: str) -> str:
        try:
            resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as exc:
            return exc.code().name
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)

    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        mine = status(stub, want)
        if mine != "NOT_FOUND":
            return
        if status(stub, other) in ("SERVING", "NOT_SERVING"):
            raise UsageError(f"{address} is a {_SERVICE_WORDS.get(other, other)}, not a "
                             f"{_SERVICE_WORDS.get(want, want)}: use {other_flag} {address}")


_ENGINE_SERVICE = "dff.v1.ConceptEngine"
_FEATURE_SERVICE = "dff.v1.FeatureService"
_SERVICE_WORDS = {_ENGINE_SERVICE: "concept engine", _FEATURE_SERVICE: "feature server"}


def _close(source: Any) -> None:
    close = getattr(source, "close", None)
    if callable(close):
        close()


def source_describe(feature_servers: Sequence[str], timeout: float) -> dict[str, Any]:
    """What the feature source offers (DescribeModel's dict): the feature servers' (UsageError
    naming them when none answers) or, in-process, the models built here (built now when
    missing) and the precision the execution provider picks for ``--precision auto``."""
    from dff_protos.errors import DFFError

    from exporter import export

    if feature_servers:
        source = export.make_source(list(feature_servers), min(timeout, 30.0))
        try:
            return source.describe()
        except DFFError as exc:
            raise UsageError(f"--feature-server {','.join(feature_servers)} cannot be used "
                             f"({type(exc).__name__}: {_one_line(exc)}); start the server(s) "
                             "or fix the address") from None
        finally:
            _close(source)
    from feature_server.extractor import auto_precision, select_providers
    from feature_server.models.registry import ensure_models

    try:
        registry = ensure_models()
    except DFFError as exc:
        raise UsageError(_one_line(exc)) from None
    precisions = [s.precision for s in registry.values() if s.kind == "features"]
    return {"models": [{"name": s.name, "kind": s.kind, "layers": list(s.layers)}
                       for s in registry.values()],
            "default_precision": auto_precision(select_providers()[0], precisions)}


def _models_of_kind(describe: dict[str, Any], kind: str) -> dict[str, list[str]]:
    """name -> layers of the source's models of ``kind`` (a model without a kind: features)."""
    return {str(m["name"]): list(m.get("layers") or [])
            for m in describe.get("models", []) or []
            if isinstance(m, dict) and m.get("name") and m.get("kind", "features") == kind}


def resolve_feature_model(describe: dict[str, Any], model: str, precision: str,
                          layers: Sequence[str] = (), layer_flag: str = "--layer") -> str:
    """The feature model that will run for ``--model``/``--precision`` (the rule of
    concept_engine.discovery.resolve_model), checked to exist and to have ``layers``:
    UsageError naming the models or layers to choose from."""
    from dff_protos.errors import DFFError

    from feature_server.extractor import choose_model
    from feature_server.models.precision import PRECISIONS

    features = _models_of_kind(describe, "features")
    resolved = model
    if not (precision == "auto" and any(model.endswith(f"_{p}") for p in PRECISIONS)):
        try:
            resolved = choose_model(describe, model, precision)
        except DFFError as exc:
            raise UsageError(f"--precision {precision}: {_one_line(exc)}") from None
    if features and resolved not in features:
        raise UsageError(f"--model {model}: no such feature model; choose one of "
                         f"{', '.join(sorted(features))} (`dff models list`)")
    known = features.get(resolved) or []
    unknown = [layer for layer in layers if layer not in known]
    if known and unknown:
        which = resolved if resolved == model else \
            f"{resolved} (what --precision {precision} runs for {model} here)"
        with_it = [n for n, ls in sorted(features.items())
                   if n != resolved and all(x in ls for x in layers)]
        hint = f"; or a model that has it: {', '.join(with_it)} (--model/--precision)" \
            if with_it else ""
        raise UsageError(f"{layer_flag} {','.join(unknown)}: {which} has no such layer; choose one "
                         f"of {', '.join(known)}{hint}")
    return resolved


def check_classifier(describe: dict[str, Any], classifier: str) -> None:
    """UsageError for a classifier name the source does not have, unless it is the default one
    (not built or not served: the prediction filter is then skipped with a notice)."""
    from feature_server.models.registry import DEFAULT_CLASSIFIER

    classifiers = _models_of_kind(describe, "classifier")
    if classifier != DEFAULT_CLASSIFIER and classifier not in classifiers:
        choose = ", ".join(sorted(classifiers)) or "none is available"
        raise UsageError(f"--classifier {classifier}: no such classifier model; choose one "
                         f"of {choose} (`dff models list`)")


def preflight_discover(args: argparse.Namespace) -> tuple[list[tuple[str, Path]], Any]:
    """Every check that needs no feature: (the classes of this shard, the DiscoveryOptions),
    or UsageError naming the item and the fix."""
    from dff_protos.errors import DFFError

    from exporter import export

    if args.engine and args.feature_server:
        raise UsageError("--engine and --feature-server exclude each other (the engine has "
                         "its own feature servers)")
    shard = args.shard
    if shard is None:
        try:
            shard = shard_from_env()
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    check_out_dir(args.out)
    try:
        classes = export.find_classes(args.data_dir, out=args.out)
        export.check_class_names(classes)
    except DFFError as exc:
        raise UsageError(str(exc)) from None
    options = options_from_args(args)
    try:
        options.validate()
    except DFFError as exc:
        raise UsageError(str(exc)) from None
    if shard is not None:
        classes = export.shard_classes(classes, *shard)
    if options.k:
        for name, folder in classes:
            n = len(export.list_images(folder))
            if options.k > n:
                raise UsageError(f"--k {options.k} is larger than the number of images of "
                                 f"class {name} ({n} in {folder}); lower --k (or let it be "
                                 "estimated) or add images")
    if args.engine:
        probe_service(args.engine, _ENGINE_SERVICE, _FEATURE_SERVICE, "--feature-server")
    for address in args.feature_server:
        probe_service(address, _FEATURE_SERVICE, _ENGINE_SERVICE, "--engine")
    if not args.engine and classes:  # an engine resolves the model against its own source
        describe = source_describe(args.feature_server, args.timeout)
        options = dataclasses.replace(options, model=resolve_feature_model(
            describe, options.model, args.precision, [options.layer]))
        check_classifier(describe, options.classifier)
    return classes, options


def run_discover(args: argparse.Namespace) -> int:
    from dff_protos.errors import DFFError
    from dff_protos.security import client_security_from_args, set_default_client_security

    try:
        set_default_client_security(client_security_from_args(args))
    except DFFError as exc:
        print(f"dff discover: error: {exc}", file=sys.stderr)
        return EXIT_USAGE

    from exporter.export import ExportSettings, export
    from exporter.progress import StageProgress, write_line

    try:
        classes, options = preflight_discover(args)
    except UsageError as exc:
        print(f"dff discover: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    settings = ExportSettings(
        out=args.out, discovery=options,
        feature_servers=tuple(args.feature_server), client_decode=args.client_decode,
        client_prepare=args.client_prepare,
        engine=args.engine or "", force=args.force, top_n=args.top, timeout=args.timeout,
        show_progress=not args.no_progress, max_file_bytes=args.max_file_size,
        pipeline=args.pipeline)
    names = (", ".join(n for n, _ in classes[:8]) + (" ..." if len(classes) > 8 else "")
             or "none falls to this shard; the site index is rebuilt")
    shard = f" (shard {args.shard[0]}/{args.shard[1]})" if args.shard else ""
    write_line(f"dff discover: {len(classes)} class(es) from {args.data_dir}{shard}: {names}",
               file=sys.stderr)
    start = time.perf_counter()
    try:
        reports = export(classes, settings,
                         progress_for=lambda n: StageProgress(f"{n}: ",
                                                              enabled=settings.show_progress),
                         on_class=lambda r: print_report(r))
    except DFFError as exc:  # e.g. the feature servers or the engine could not be used
        log.debug("discover failed", exc_info=True)
        print(f"dff discover: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_PARTIAL
    except Exception:  # noqa: BLE001 - the one place that turns a bug into exit code 1
        log.exception("internal error")
        return EXIT_INTERNAL
    done = sum(r.status == "done" for r in reports)
    skipped = sum(r.status == "skipped" for r in reports)
    failed = [r for r in reports if r.status == "failed"]
    errors = sum(r.n_errors for r in reports if r.status != "skipped")
    bad = f"; {errors} image(s) could not be used" if errors else ""
    write_line(f"summary: {done} done, {skipped} skipped, {len(failed)} failed of "
               f"{len(reports)} class(es) in {time.perf_counter() - start:.1f}s{bad}; "
               f"output in {args.out} (index: {args.out / 'index.html'})")
    return EXIT_PARTIAL if failed or errors else EXIT_OK


# ---------------------------------------------------------------------------- label

def run_label(args: argparse.Namespace) -> int:
    from dff_protos.errors import DFFError

    from concept_engine.store import label_concepts, load_concept_set

    names: dict[int, str] = {}
    for item in args.names:
        index, sep, name = item.partition("=")
        if not sep or not index.strip().isdigit():
            print(f"dff label: error: expected J=NAME (e.g. 0=thorax), got {item!r}",
                  file=sys.stderr)
            return EXIT_USAGE
        names[int(index)] = name
    try:  # every argument is checked before the names are stored
        cs = load_concept_set(args.concepts)
        paths = _label_images(cs, args.images) if args.images else {}
        if names:
            cs = label_concepts(args.concepts, names)
    except (DFFError, UsageError) as exc:
        print(f"dff label: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    for j in range(cs.k):
        print(f"{j}\t{cs.concept_label(j)}")
    if args.images:
        return _redraw(cs, args, paths)
    return EXIT_OK


def _label_images(cs: Any, folder: Path) -> dict[str, Path]:
    """id -> path of the concept set's training images in ``folder`` (--images); UsageError
    when it is not a folder or lacks one of them."""
    from exporter.export import list_images

    if not folder.exists():
        raise UsageError(f"--images {folder}: no such folder; give the class folder the "
                         "concept set was made from")
    if not folder.is_dir():
        raise UsageError(f"--images {folder} is a file; give the class folder the concept set "
                         "was made from")
    paths = dict(list_images(folder))
    missing = [i for i in cs.image_ids if i not in paths]
    if missing:
        raise UsageError(f"--images {folder}: {len(missing)} training image(s) are not in it, "
                         f"e.g. {missing[0]}; give the class folder the concept set was made "
                         "from")
    return paths


def _redraw(cs: Any, args: argparse.Namespace, paths: dict[str, Path]) -> int:
    """Pictures and index.html next to the concept set again, from the class's photos."""
    import numpy as np

    from exporter.report import ImageResult, ReportData, decode_image, write_report

    out = args.concepts.parent

    def results():
        for i, image_id in enumerate(cs.image_ids):
            yield ImageResult(image_id, decode_image(paths[image_id].read_bytes()),
                              cs.polygons[i], np.asarray(cs.certainties[i]))

    data = ReportData(name=cs.name, k=cs.k, k_reason=cs.k_reason, curves=cs.k_curves,
                      decisions=[{"id": d.id, "kept": d.kept, "stage": d.stage,
                                  "reason": d.reason, "score": d.score} for d in cs.decisions],
                      notices=list(cs.notices))
    write_report(out, results(), data, top_n=args.top, total=cs.n_images,
                 concepts_file=args.concepts.name, concept_set=cs)
    print(f"pictures redrawn with the names -> {out / 'index.html'}")
    return EXIT_OK


# ---------------------------------------------------------------------------- explain

def check_concept_set(path: Path) -> None:
    """UsageError unless ``path`` is a concept set written by dff (HDF5, format attribute)."""
    import h5py

    hint = "give OUT/<class>/concepts.h5 written by `dff discover`"
    if not path.exists():
        raise UsageError(f"--concepts {path}: no such file; {hint}")
    if not path.is_file():
        raise UsageError(f"--concepts {path} is not a file; {hint}")
    try:
        if not h5py.is_hdf5(str(path)):
            raise UsageError(f"--concepts {path} is not an HDF5 file, so not a concept set; "
                             f"{hint}")
        with h5py.File(path, "r") as f:
            fmt = f.attrs.get("format")
    except OSError as exc:
        raise UsageError(f"--concepts {path} cannot be read ({exc}); {hint}") from None
    if isinstance(fmt, bytes):
        fmt = fmt.decode("utf-8", "replace")
    if fmt != "dff-concept-set":
        raise UsageError(f"--concepts {path} is an HDF5 file but not a dff concept set "
                         f"(format {fmt!r}); {hint}")


#: what `dff explain` writes into its --out folder (exporter.report's pictures, the copied
#: exemplars, the record): a rerun removes them first, so the folder holds this run's only
EXPLAIN_OUTPUTS = ("index.html", "explanations.json", "heatmaps.npz", "k_sweep.png",
                   "overlays", "combined", "dominant", "grids", "thumbs", "exemplars")


def _explain_inputs(entries: Sequence[Path]) -> list[tuple[str, Path]]:
    """(id, path) of the images to explain: files as given, folders' image files (id = file
    name); UsageError for a missing entry or two images with one id (also one file given
    twice: it would be counted twice)."""
    from exporter.export import file_id, list_images

    def found(entry: Path) -> list[tuple[str, Path]]:
        if entry.is_dir():
            return list_images(entry)
        if entry.is_file():
            return [(file_id(entry.name), entry)]
        raise UsageError(f"no such file or folder: {entry}")

    return _unique_ids((pair for entry in entries for pair in found(entry)), "explain",
                       "file name")


def _unique_ids(items: Iterable[tuple[str, Path]], command: str, id_is: str
                ) -> list[tuple[str, Path]]:
    """``items`` as a list, UsageError for an id seen twice: one file given twice (it would
    be counted twice), or two files with one id (``id_is`` says what an id is here)."""
    out: list[tuple[str, Path]] = []
    seen: dict[str, Path] = {}
    for image_id, path in items:
        if image_id in seen:
            if _same_file(path, seen[image_id]):
                raise UsageError(f"{image_id!r} is given twice ({seen[image_id]} and {path} "
                                 "are one file); give each image or folder once")
            raise UsageError(f"{path} and {seen[image_id]} have the same {id_is} {image_id!r} "
                             f"(an image's id is its file name, or its path below a folder "
                             f"given); {command} them in two runs or rename one")
        seen[image_id] = path
        out.append((image_id, path))
    return out


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # a dangling link, a file gone: compare the paths
        return os.path.abspath(a) == os.path.abspath(b)


def check_explain_out(out: Path) -> None:
    """UsageError when --out holds a `dff discover` report (a class folder, or an OUT with
    finished classes), or pictures explain did not write (they would be mixed)."""
    from exporter.export import CONCEPTS_FILE, DONE_MARKER, is_done

    check_out_dir(out)
    if not out.is_dir():
        return
    found = [n for n in (DONE_MARKER, CONCEPTS_FILE) if (out / n).exists()]
    if found:
        raise UsageError(f"--out {out} holds a `dff discover` report ({', '.join(found)}); "
                         "explain would overwrite it: give another folder, e.g. "
                         f"{out.parent / (out.name + '-explained')}")
    classes = [d.name for d in sorted(out.iterdir()) if d.is_dir() and is_done(d)]
    if classes:
        raise UsageError(f"--out {out} is a `dff discover` output folder (classes "
                         f"{_some(classes, 3)}); explain would overwrite its index.html: give "
                         "another folder")
    if not (out / "explanations.json").is_file():  # not an earlier explain's folder
        foreign = [n for n in EXPLAIN_OUTPUTS if (out / n).exists()]
        if foreign:
            raise UsageError(f"--out {out} already holds {', '.join(foreign)} not written by "
                             "`dff explain` (no explanations.json); give an empty or new "
                             "folder")


def _clear_explain_outputs(out: Path) -> None:
    """Remove what an earlier explain wrote into ``out`` (EXPLAIN_OUTPUTS only: nothing else
    in the folder is touched), so that its pictures never mix with this run's."""
    from exporter.export import _rmtree

    if not (out / "explanations.json").is_file():
        return
    for name in EXPLAIN_OUTPUTS:
        _rmtree(out / name)


def preflight_explain(args: argparse.Namespace) -> tuple[Any, list[tuple[str, Path]]]:
    """The explain checks that need no feature: (the concept set, the images), or UsageError
    naming the item and the fix."""
    from dff_protos.errors import DataLoss, InvalidInput, NotFound

    from concept_engine.store import load_concept_set

    check_concept_set(args.concepts)
    try:
        cs = load_concept_set(args.concepts)
    except (DataLoss, InvalidInput, NotFound) as exc:
        raise UsageError(f"--concepts {args.concepts} is not a usable concept set "
                         f"({_one_line(exc)}); give OUT/<class>/concepts.h5 written by "
                         "`dff discover`, or run discover again") from None
    check_explain_out(args.out)
    items = _explain_inputs(args.images)
    if not items:
        raise UsageError(f"no images in {', '.join(map(str, args.images))}")
    return cs, items


def run_explain(args: argparse.Namespace) -> int:
    from dff_protos.errors import DFFError, InvalidInput, NotFound
    from dff_protos.security import client_security_from_args, set_default_client_security

    try:
        set_default_client_security(client_security_from_args(args))
        cs, items = preflight_explain(args)
        if args.feature_server:  # unreachable servers: a usage error, as for discover
            source_describe(args.feature_server, args.timeout)
        if args.precision != "auto":  # auto: the concept set's own model and precision
            from feature_server.cli import resolve_precision

            cs.provenance["model"] = resolve_precision(
                args.precision, cs.provenance.get("model", "vgg19"), args.feature_server,
                args.timeout)
    except (UsageError, DFFError) as exc:
        print(f"dff explain: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    try:
        return _explain(args, cs, items)
    except DFFError as exc:
        print(f"dff explain: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_USAGE if isinstance(exc, InvalidInput | NotFound) else EXIT_PARTIAL
    except Exception:  # noqa: BLE001
        log.exception("internal error")
        return EXIT_INTERNAL


def _json_float(v: Any) -> float | None:
    """JSON has no NaN/inf: null instead."""
    import math

    v = float(v)
    return v if math.isfinite(v) else None


def _floats(values: Any) -> list[float | None]:
    return [] if values is None else [_json_float(v) for v in values]


def _copy_exemplars(concept_dir: Path, out: Path, k: int) -> list[str]:
    """The training exemplars (top images by certainty) that `dff discover` drew next to the
    concept set (concept_dir/grids/concept_NN_top.jpg), copied to out/exemplars/."""
    import shutil

    rels = []
    for j in range(k):
        src = concept_dir / "grids" / f"concept_{j:02d}_top.jpg"
        rel = f"exemplars/concept_{j:02d}.jpg"
        if src.is_file():
            (out / "exemplars").mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, out / rel)
            rels.append(rel)
        else:
            rels.append("")
    return rels


def _explain(args: argparse.Namespace, cs: Any, items: list[tuple[str, Path]]) -> int:
    import numpy as np
    from dff_protos.errors import InvalidInput

    from concept_engine.discovery import Explanation
    from exporter.export import explain_items, output_stems, read_files
    from exporter.progress import ProgressBar
    from exporter.report import ImageResult, ReportData, decode_image, write_report

    threshold = cs.threshold if args.threshold is None else args.threshold
    min_area = cs.min_area if args.min_area is None else args.min_area
    bar = ProgressBar("explain", len(items), enabled=not args.no_progress, unit="img")
    blobs, read_errors = read_files(items, args.max_file_size)
    explanations = explain_items(cs, blobs, feature_servers=args.feature_server,
                                 client_decode=args.client_decode,
                                 client_prepare=args.client_prepare,
                                 timeout=args.timeout, threshold=threshold, min_area=min_area,
                                 progress=lambda d, t: bar.update(d, t))
    bar.close()
    explanations += [Explanation(d.id, error=InvalidInput(d.reason)) for d in read_errors]
    by_id = dict(blobs)
    ok = [x for x in explanations if x.error is None]
    failed = [x for x in explanations if x.error is not None]
    args.out.mkdir(parents=True, exist_ok=True)
    _clear_explain_outputs(args.out)
    record = {
        "concept_set": str(args.concepts), "concept_set_id": cs.id, "name": cs.name,
        "k": cs.k, "threshold": threshold, "min_area": min_area,
        "concept_names": [cs.concept_label(j) for j in range(cs.k)],
        "presence_threshold": _floats(cs.presence_threshold),
        "ood_error_threshold": _json_float(cs.ood_threshold),
        "set_stability": _json_float(cs.set_stability),
        "images": [{"id": x.id, "certainties": _floats(x.certainties),
                    "present": [bool(v) for v in x.present],
                    "relative_score": _floats(x.relative_score),
                    "reconstruction_error": _json_float(x.reconstruction_error),
                    "out_of_distribution": bool(x.out_of_distribution)} for x in ok],
        "errors": [{"id": x.id, "error": str(x.error)} for x in failed],
    }
    np.savez_compressed(args.out / "heatmaps.npz",
                        **{f"img{i}": np.asarray(x.heatmaps, np.float32)
                           for i, x in enumerate(ok)},
                        ids=np.asarray([x.id for x in ok]))
    (args.out / "explanations.json").write_text(json.dumps(record, indent=2))

    def results():
        for x in ok:
            yield ImageResult(id=x.id, image=decode_image(by_id[x.id]),
                              polygons=x.polygons, certainties=np.asarray(x.certainties),
                              heatmaps=x.heatmaps, present=x.present,
                              relative_score=x.relative_score,
                              reconstruction_error=x.reconstruction_error,
                              out_of_distribution=x.out_of_distribution)

    n_ood = sum(x.out_of_distribution for x in ok)
    data = ReportData.from_concept_set(
        cs, name=f"{cs.name} (explained)",
        k_reason=f"fixed by the concept set {args.concepts}",
        decisions=[{"id": x.id, "kept": False, "stage": "error", "reason": str(x.error)}
                   for x in failed],
        summary={"images": len(items), "explained": len(ok), "failed": len(failed),
                 "out of distribution": n_ood, "concept set": str(args.concepts)},
        explain=True, exemplars=_copy_exemplars(args.concepts.parent, args.out, cs.k))
    write_report(args.out, results(), data, top_n=args.top, total=len(ok), concepts_file="",
                 stems=output_stems(x.id for x in ok))
    for x in ok:
        if x.out_of_distribution:
            print(f"    {x.id}: OUT OF DISTRIBUTION (relative reconstruction error "
                  f"{x.reconstruction_error:.4f} > {cs.ood_threshold:.4f}, the training "
                  f"images' 95th percentile): the concepts do not describe it", file=sys.stderr)
        elif not np.any(x.present):
            print(f"    {x.id}: none of the {cs.k} concepts is present", file=sys.stderr)
    for x in failed:
        print(f"    could not explain {x.id}: {x.error}", file=sys.stderr)
    print(f"explained {len(ok)} of {len(items)} image(s) -> {args.out / 'index.html'}")
    return EXIT_PARTIAL if failed else EXIT_OK


# ---------------------------------------------------------------------------- extract

def _extract_inputs(entries: Sequence[str]) -> list[tuple[str, Path]]:
    """(id, path) of the images to extract: files as given (id = file name), a folder's image
    files below it (id = path relative to it), including links and special files (a dangling
    link or a FIFO becomes a per-image error, as for discover); UsageError for a missing entry
    or two images with one id."""
    from feature_server.images import IMAGE_SUFFIXES, file_id

    def found(entry: Path) -> list[tuple[str, Path]]:
        if entry.is_dir():
            return [(file_id(str(p.relative_to(entry))), p) for p in sorted(entry.rglob("*"))
                    if p.suffix.lower() in IMAGE_SUFFIXES and not p.is_dir()]
        if entry.exists() or entry.is_symlink():
            return [(file_id(entry.name), entry)]
        raise UsageError(f"no such image file or folder: {entry}")

    return _unique_ids((pair for entry in map(Path, entries) for pair in found(entry)),
                       "extract", "id")


def check_out_file(out: Path) -> None:
    """--out of `dff extract`: a file this process can create (UsageError otherwise)."""
    if out.is_dir():
        raise UsageError(f"--out {out} is a folder; give a file name, e.g. "
                         f"{out / 'features.h5'}")
    if out.is_symlink() and not out.exists():
        raise UsageError(f"--out {out} is a symbolic link to {os.readlink(out)}, which does "
                         "not exist; remove the link or give another file")
    check_out_dir(out.parent)


def preflight_extract(args: argparse.Namespace, source: Any) -> tuple[Any, list[Any]]:
    """(the ExtractOptions, the images) of `dff extract`, checked against what ``source``
    offers before any image is read; UsageError naming the item and the fix."""
    from dff_protos.errors import DFFError

    from feature_server.extractor import MAX_SIZE, MIN_SIZE, ExtractOptions

    if not MIN_SIZE <= args.size <= MAX_SIZE:
        raise UsageError(f"--size {args.size}: the network input size must be between "
                         f"{MIN_SIZE} and {MAX_SIZE} pixels (default 224)")
    if args.top_k < 0:
        raise UsageError(f"--top-k {args.top_k}: must be >= 0 (0: no classes)")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size {args.batch_size}: must be >= 1")
    if args.timeout <= 0:
        raise UsageError(f"--timeout {args.timeout}: must be > 0 seconds")
    layers = tuple(x.strip() for x in args.layers.split(",") if x.strip())
    if not layers:
        raise UsageError(f"--layers {args.layers!r}: give at least one layer, e.g. conv5_4")
    try:
        describe = source.describe()
    except DFFError as exc:
        where = f"--feature-server {args.feature_server}" if args.feature_server else \
            "the models"
        raise UsageError(f"{where} cannot be used ({type(exc).__name__}: {_one_line(exc)})"
                         ) from None
    model = resolve_feature_model(describe, args.model, args.precision, layers, "--layers")
    options = ExtractOptions(
        model=model, layers=layers, wire_dtype=args.dtype, resize_mode=args.resize,
        size=args.size, return_probabilities=args.probabilities, top_k=args.top_k,
        sparse=bool(args.sparse and args.feature_server))
    if options.wants_classifier:
        check_classifier(describe, options.classifier)
    return options, _extract_inputs(args.images)


def run_extract(args: argparse.Namespace) -> int:
    """`dff extract`: its arguments are the feature server's (feature_server.cli); the
    checks before any image is read, the per-image errors and the exit codes are those of
    discover and explain: 2 usage, 3 some image could not be read or extracted."""
    from dff_protos.errors import DFFError, InvalidInput
    from dff_protos.security import client_security_from_args

    from exporter.export import DEFAULT_MAX_FILE_BYTES, read_files
    from feature_server.extractor import ExtractResult
    from feature_server.h5out import write_results

    source: Any = None
    try:
        security = client_security_from_args(args)
        out = Path(args.out)
        check_out_file(out)
        if args.feature_server:
            from feature_server.client import FeatureClient

            source = FeatureClient(args.feature_server, timeout=args.timeout, security=security,
                                   decode_locally=args.client_decode or None,
                                   prepare_locally=args.client_prepare or None)
        else:
            from feature_server.extractor import Extractor

            source = Extractor.from_cache(args.home, batch_size=args.batch_size)
        options, items = preflight_extract(args, source)
    except (UsageError, DFFError) as exc:
        _close(source)
        print(f"dff extract: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    try:
        blobs, read_errors = read_files(items, DEFAULT_MAX_FILE_BYTES)
        by_id = {r.id: ExtractResult(r.id, error=InvalidInput(r.reason)) for r in read_errors}
        for result in source.extract(blobs, options):
            by_id[result.id] = result
        results = [by_id.get(i) or ExtractResult(i, error=InvalidInput("no result"))
                   for i, _ in items]
        provider = source.describe().get("execution_provider", "")
        write_results(out, results, options, provider)
    except DFFError as exc:
        print(f"dff extract: error: {type(exc).__name__}: {_one_line(exc)}", file=sys.stderr)
        return EXIT_PARTIAL
    finally:
        _close(source)
    failed = [r for r in results if r.error is not None]
    for r in failed:
        print(f"    could not extract {r.id}: {r.error}", file=sys.stderr)
    print(f"{len(results) - len(failed)} of {len(results)} images -> {out}")
    return EXIT_PARTIAL if failed else EXIT_OK

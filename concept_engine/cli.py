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
    p.add_argument("--host", default=d.host, help="address to bind (default %(default)s)")
    p.add_argument("--port", type=int, default=d.port, help="port (0 = any free port)")
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
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace) -> EngineConfig:
    servers = tuple(a.strip() for a in args.feature_server.split(",") if a.strip())
    return EngineConfig(host=args.host, port=args.port, store_dir=args.store,
                        data_root=args.data_root, feature_servers=servers,
                        models_home=args.models_home, feature_timeout_s=args.feature_timeout,
                        max_message_mb=args.max_message_mb, max_images=args.max_images,
                        max_concurrent_discover=args.max_concurrent_discover,
                        grace_s=args.grace)


def run(args: argparse.Namespace) -> int:
    from concept_engine.service import serve

    return serve(config_from_args(args))

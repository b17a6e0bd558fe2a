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
    from dff_protos.serving import add_network_args, float_arg, int_arg

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
    p.add_argument("--feature-timeout", type=float_arg("--feature-timeout", 0, above=True),
                   default=d.feature_timeout_s,
                   metavar="SECONDS", help="deadline of one feature-server stream")
    p.add_argument("--max-message-mb", type=int_arg("--max-message-mb", 1, 2047),
                   default=d.max_message_mb,
                   help="largest gRPC message (default %(default)s MiB)")
    p.add_argument("--max-images", type=int_arg("--max-images", 1), default=d.max_images,
                   help="most images in one Discover/Explain call")
    p.add_argument("--max-concurrent-discover", type=int_arg("--max-concurrent-discover", 1),
                   default=d.max_concurrent_discover,
                   help="Discover calls run at once (others wait)")
    p.add_argument("--grace", type=float_arg("--grace", 0), default=d.grace_s,
                   metavar="SECONDS", help="shutdown grace period on SIGTERM")
    p.add_argument("--max-concurrent-explain", type=int_arg("--max-concurrent-explain", 1),
                   default=d.max_concurrent_explain,
                   help="Explain streams served at once")
    p.add_argument("--stream-wait-s", type=float_arg("--stream-wait-s", 0),
                   default=d.stream_wait_s,
                   help="a Discover/Explain waits this long for a slot, then "
                        "RESOURCE_EXHAUSTED")
    p.add_argument("--idle-timeout-s", type=float_arg("--idle-timeout-s", 0, above=True),
                   default=d.idle_timeout_s,
                   help="close a request stream that sends nothing this long")
    p.add_argument("--max-discover-mb", type=int_arg("--max-discover-mb", 1),
                   default=d.max_discover_mb,
                   help="streamed image bytes of one Discover")
    p.add_argument("--max-streamed-mb", type=int_arg("--max-streamed-mb", 1),
                   default=d.max_streamed_mb,
                   help="streamed image bytes held by all running calls together")
    p.add_argument("--feature-item-deadline",
                   type=float_arg("--feature-item-deadline", 0, above=True),
                   default=d.feature_item_deadline_s,
                   metavar="SECONDS", help="a feature server that answers nothing this long "
                                           "loses its items to another one")
    p.set_defaults(func=run)


def _check_folders(args: argparse.Namespace) -> None:
    """--store must be (or become) a folder, --data-root must be one: InvalidInput naming the
    flag otherwise (not a traceback, not a server that starts and then fails every call)."""
    import os
    from pathlib import Path

    from dff_protos.errors import InvalidInput

    store = Path(args.store)
    if store.exists() and not store.is_dir():
        raise InvalidInput(f"--store {args.store}: not a folder")
    # a folder to be created: its nearest existing ancestor must be a folder (the server
    # creates it at start)
    ancestor = store.absolute().parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not store.exists() and not ancestor.is_dir():
        raise InvalidInput(f"--store {args.store}: cannot create the folder: {ancestor} is "
                           "not a folder")
    folder = store if store.exists() else ancestor
    if folder.is_dir() and not os.access(folder, os.W_OK | os.X_OK):
        raise InvalidInput(f"--store {args.store}: {folder} is not writable")
    if args.data_root is not None:
        root = Path(args.data_root)
        if not root.exists():
            raise InvalidInput(f"--data-root {args.data_root}: no such folder")
        if not root.is_dir():
            raise InvalidInput(f"--data-root {args.data_root}: not a folder")


def config_from_args(args: argparse.Namespace) -> EngineConfig:
    """The EngineConfig of ``dff serve engine``'s flags; InvalidInput (one line naming the
    flag) for a value the server cannot run with."""
    from dff_protos.security import check_client_tls_files, client_security_from_args
    from dff_protos.serving import check_address, network_from_args

    network = network_from_args(args)  # first: it reports every refused flag value
    servers = tuple(a.strip() for a in args.feature_server.split(",") if a.strip())
    for address in servers:
        check_address(address, "--feature-server")
    feature_security = client_security_from_args(args, prefix="feature-")
    check_client_tls_files(args, prefix="feature-")
    _check_folders(args)
    return EngineConfig(host=args.host, port=args.port, store_dir=args.store,
                        network=network,
                        feature_security=feature_security,
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
    from dff_protos.serving import bind_failure, host_port

    from concept_engine.service import serve

    try:
        config = config_from_args(args)
    except DFFError as exc:
        print(f"dff serve engine: error: {exc}", file=sys.stderr)
        return 2
    try:
        return serve(config)
    except DFFError as exc:  # a health or metrics port that cannot be bound, named
        print(f"dff serve engine: error: {exc}", file=sys.stderr)
        return 2
    except (OSError, RuntimeError) as exc:
        reason = bind_failure(exc)
        if reason is None:
            raise
        print(f"dff serve engine: error: {host_port(args.host, args.port)}: {reason}",
              file=sys.stderr)
        return 2

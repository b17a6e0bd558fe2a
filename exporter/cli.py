"""The `dff` command. Each package registers its own subcommands; this module only assembles them.

    dff models build|list        feature_server.cli
    dff serve features           feature_server.cli
    dff extract                  feature_server.cli
    dff serve engine             concept_engine.cli
    dff discover | dff explain   exporter.commands
"""

from __future__ import annotations

import argparse
import logging
import sys


def build_parser() -> argparse.ArgumentParser:
    from concept_engine import cli as engine_cli
    from exporter import commands as exporter_cli
    from feature_server import cli as features_cli

    parser = argparse.ArgumentParser(
        prog="dff",
        description="Deep Feature Factorization: discover the concepts a CNN has learned from a "
                    "folder of images, and show where each concept lives in each image.")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more log output (-vv for debug)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = sub.add_parser("serve", help="run a gRPC service (features or engine)")
    serve_sub = serve.add_subparsers(dest="service", required=True, metavar="SERVICE")
    features_cli.register(sub, serve_sub)
    engine_cli.register(sub, serve_sub)
    exporter_cli.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose + 1, 2)]
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

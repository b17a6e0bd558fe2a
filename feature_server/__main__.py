"""``python -m feature_server ...``: the feature-server subcommands of ``dff`` on their own
(models build|list, serve features, extract), for images that carry only this package."""

from __future__ import annotations

import argparse
import logging
import sys

from feature_server import cli


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m feature_server")
    parser.add_argument("-v", "--verbose", action="count", default=0)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = sub.add_parser("serve", help="run the gRPC feature server")
    serve_sub = serve.add_subparsers(dest="service", required=True, metavar="SERVICE")
    cli.register(sub, serve_sub)
    args = parser.parse_args(argv)
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose + 1, 2)]
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

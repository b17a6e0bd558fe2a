"""The `dff` command. Each package registers its own subcommands; this module only assembles them.

    dff models build|list        feature_server.cli
    dff serve features           feature_server.cli
    dff extract                  feature_server.cli (options), exporter.commands (its run)
    dff serve engine             concept_engine.cli
    dff discover | dff explain   exporter.commands

Every subcommand's help shows each option's default (:class:`HelpFormatter`); bare `dff` (or a
bare `dff serve`) prints the help and exits 0; logging is WARNING by default, `-v` INFO, `-vv`
DEBUG, written through tqdm so that log lines never land on a progress bar.
"""

from __future__ import annotations

import argparse
import logging
import sys


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions and epilogs as written; every option's help ends with its default,
    unless the help already says it or there is no meaningful default (None, False, [])."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if ("default" in text or default is argparse.SUPPRESS or default is None
                or isinstance(default, bool) or default == [] or default == ()
                or not action.option_strings or action.nargs == 0):
            return text
        return f"{text} (default: %(default)s)"


def version() -> str:
    try:
        from importlib.metadata import version as dist_version

        return dist_version("dff-concepts")
    except Exception:  # noqa: BLE001 - not installed as a distribution (a source checkout)
        return "unknown (not installed)"


def _use_formatter(parser: argparse.ArgumentParser) -> None:
    """HelpFormatter on parser and every subparser below it (they are registered by several
    packages; the formatter is a property of the whole command)."""
    parser.formatter_class = HelpFormatter
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _use_formatter(sub)


def _print_help_of(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 0


def build_parser() -> argparse.ArgumentParser:
    from concept_engine import cli as engine_cli
    from exporter import commands as exporter_cli
    from feature_server import cli as features_cli

    parser = argparse.ArgumentParser(
        prog="dff", formatter_class=HelpFormatter,
        description="Deep Feature Factorization: discover the concepts a CNN has learned from a "
                    "folder of images, and show where each concept lives in each image.",
        epilog="Run `dff COMMAND --help` for the options of a command. Exit codes: 0 ok, "
               "1 internal error, 2 usage error, 3 partial failure.")
    parser.add_argument("--version", action="version", version=f"dff {version()}",
                        help="print the version and exit")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more log output: -v informational messages, -vv debug "
                             "(default: warnings and errors only)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    serve = sub.add_parser("serve", help="run a gRPC service (features or engine)",
                           description="Run one of the two gRPC services.")
    serve_sub = serve.add_subparsers(dest="service", metavar="SERVICE")
    serve.set_defaults(func=lambda args: _print_help_of(serve))
    features_cli.register(sub, serve_sub)
    engine_cli.register(sub, serve_sub)
    exporter_cli.register(sub)
    _use_formatter(parser)
    return parser


def setup_logging(verbose: int, stream=None) -> None:
    """WARNING by default, -v INFO, -vv DEBUG; plain lines (no timestamps) through tqdm;
    matplotlib's own chatter (font cache) stays quiet unless -vv."""
    from exporter.progress import TqdmLoggingHandler

    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(max(verbose, 0), 2)]
    handler = TqdmLoggingHandler(stream)
    fmt = "%(levelname)s %(name)s: %(message)s" if verbose >= 2 else "%(levelname)s: %(message)s"
    handler.setFormatter(logging.Formatter(fmt))
    root = logging.getLogger()
    for h in list(root.handlers):
        if isinstance(h, TqdmLoggingHandler):
            root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level)
    logging.getLogger("matplotlib").setLevel(logging.DEBUG if verbose >= 2 else logging.ERROR)
    logging.captureWarnings(True)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:  # bare `dff`
        parser.print_help()
        return 0
    setup_logging(args.verbose)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

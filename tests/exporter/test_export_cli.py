"""The `dff` command as a user meets it: help for every option with its default, --version,
bare `dff`, quiet log output by default, and progress that never garbles a log."""

from __future__ import annotations

import argparse
import io
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from exporter import cli
from exporter.progress import ProgressBar, StageProgress, TqdmLoggingHandler

ROOT = Path(__file__).resolve().parents[2]


def _walk(parser: argparse.ArgumentParser, path: list[str]):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _walk(sub, [*path, name])


def test_every_option_of_every_subcommand_is_explained_with_its_default():
    parser = cli.build_parser()
    commands = {" ".join(p) for p, _ in _walk(parser, ["dff"])}
    assert {"dff serve features", "dff serve engine", "dff extract", "dff discover",
            "dff explain", "dff models build"} <= commands
    problems = []
    for path, sub in _walk(parser, ["dff"]):
        text = sub.format_help()
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction | argparse._SubParsersAction):
                continue
            name = "/".join(action.option_strings) or action.dest
            if not (action.help or "").strip():
                problems.append(f"{' '.join(path)} {name}: no help")
                continue
            shown = sub._get_formatter()._get_help_string(action) % {
                **vars(action), "default": action.default, "prog": sub.prog}
            meaningful = action.default not in (None, False, [], (), argparse.SUPPRESS)
            if action.option_strings and action.nargs != 0 and meaningful \
                    and "default" not in shown:
                problems.append(f"{' '.join(path)} {name}: default {action.default!r} not shown")
        assert "%(default)" not in text
    assert not problems, "\n".join(problems)


def test_discover_help_shows_library_defaults():
    from concept_engine.discovery import DiscoveryOptions

    d = DiscoveryOptions()
    sub = next(p for path, p in _walk(cli.build_parser(), ["dff"])
               if path == ["dff", "discover"])
    text = " ".join(sub.format_help().split())
    for piece in (f"(default: {d.k_min}-{d.k_max})", f"(default: {d.k_criterion})",
                  f"(default: {d.max_iter})", f"(default: {d.tol})",
                  f"(default: {d.min_probability})", f"(default: {d.layer})",
                  "(default: 64M)", "JOB_COMPLETION_INDEX"):
        assert piece in text, piece


def test_version_and_bare_dff(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.startswith("dff ")
    assert cli.main([]) == 0  # bare dff: the help, exit 0
    out = capsys.readouterr().out
    assert out.startswith("usage: dff") and "discover" in out and "Exit codes" in out
    assert cli.main(["serve"]) == 0
    assert "features" in capsys.readouterr().out


def test_bare_dff_as_a_process():
    res = subprocess.run([sys.executable, "-m", "exporter.cli"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, check=False)
    assert res.returncode == 0 and res.stdout.startswith("usage: dff") and not res.stderr


def test_logging_is_quiet_plain_and_verbose_on_request():
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        for verbose, shown, hidden in ((0, ["WARNING: careful"], ["just so you know"]),
                                       (1, ["INFO: just so you know"], ["deep detail"]),
                                       (2, ["DEBUG exporter.test: deep detail"], [])):
            buf = io.StringIO()
            cli.setup_logging(verbose, stream=buf)
            log = logging.getLogger("exporter.test")
            log.warning("careful")
            log.info("just so you know")
            log.debug("deep detail")
            logging.getLogger("matplotlib.font_manager").info(
                "Matplotlib is building the font cache; this may take a moment.")
            text = buf.getvalue()
            for s in shown:
                assert s in text, (verbose, text)
            for s in hidden:
                assert s not in text, (verbose, text)
            if verbose < 2:
                assert "font cache" not in text
            assert not any(ch.isdigit() for ch in text.split(":")[0])  # no timestamp first
    finally:
        for h in list(root.handlers):
            if isinstance(h, TqdmLoggingHandler):
                root.removeHandler(h)
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])


class _Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def test_plain_lines_when_not_a_tty(monkeypatch):
    import exporter.progress as progress

    clock = _Clock()
    monkeypatch.setattr(progress.time, "monotonic", clock)
    buf = io.StringIO()
    bar = ProgressBar("ant: features", 10, stream=buf, interval=5.0, unit="img")
    bar.update(0)  # the start prints nothing (no "0 (0%)")
    clock.t += 2.0
    bar.update(1)
    for i in range(2, 10):
        clock.t += 1.0
        bar.update(i)  # throttled to one line per 5 s
    clock.t += 3.0
    bar.update(10)  # the end always prints
    bar.close()
    lines = buf.getvalue().splitlines()
    assert "\r" not in buf.getvalue()
    assert len(lines) == 3, lines
    assert lines[0].startswith("ant: features: 1/10 (10%) 2.0s 0.5 img/s, ETA 18s")
    assert lines[1].startswith("ant: features: 6/10 (60%) 7.0s")  # 5 s after the first
    assert lines[2].startswith("ant: features: 10/10 (100%)") and "ETA" not in lines[2]
    # a stage that ends within a second prints one line, at its end (no silly rates)
    buf = io.StringIO()
    bar = ProgressBar("ant: regions", 3, stream=buf, unit="img")
    for i in range(1, 4):
        bar.update(i)
    bar.close()
    assert len(buf.getvalue().splitlines()) == 1
    stages = StageProgress("ant: ", stream=buf, enabled=False)
    stages("fit", 0, 1)
    stages.close()


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_tty_bar_with_units_and_log_lines_on_their_own_line():
    buf = _Tty()
    stages = StageProgress("ant: ", stream=buf)
    stages("k_sweep", 0, 0, "stability over k=[2, 3]")  # nothing done yet: nothing drawn
    stages._bar.delay = 0  # draw at once (a real stage shorter than 0.5 s draws no bar)
    assert buf.getvalue() == ""
    stages("k_sweep", 1, 4, "fit 1")
    handler = TqdmLoggingHandler(buf)
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    handler.emit(logging.LogRecord("x", logging.WARNING, __file__, 1, "a log line", None,
                                   None))
    stages("k_sweep", 4, 4, "done")
    stages.close()
    text = buf.getvalue()
    assert "ant: k_sweep" in text and "fit/s" in text and "1/4" in text
    assert "0/4" not in text
    # the log line starts on a fresh line (tqdm cleared the bar) and ends its own line
    before, after = text.split("WARNING: a log line", 1)
    assert before.endswith(("\r", "\n")) or before.rstrip(" ").endswith(("\r", "\n"))
    assert after.startswith("\n")

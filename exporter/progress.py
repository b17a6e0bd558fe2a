"""Progress on stderr with tqdm (tqdm.auto: widgets in a notebook), never garbling logs.

- On a terminal or in a notebook: tqdm bars with a unit per stage (images/s for features and
  rendering, fits for the k sweep), an ETA, and a rate averaged over the whole stage (not the
  burst of the last update). Bars are transient: a finished stage's bar is cleared, what stays
  is the log and the class summary.
- Elsewhere (CI logs, files, pipes): a plain line per stage at most every ``interval`` seconds
  and at the end (``ant: features 24/70 (34%) 4.1s 5.8 img/s, ETA 8s``), never a ``0 (0%)``
  line before anything happened.
- Log records go through :class:`TqdmLoggingHandler` (``tqdm.write``), and other output
  through :func:`write_line`, so a log line is never glued to a bar.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from typing import Any, TextIO

# units of the stages the exporter reports (anything else counts "steps")
STAGE_UNITS = {
    "features": "img", "render": "img", "regions": "img", "explain": "img", "read": "img",
    "k_sweep": "fit", "certainty_filter": "fit", "fit": "fit",
    "prediction_filter": "img",
}

_LOCK = threading.RLock()


def _in_notebook() -> bool:
    ipython = sys.modules.get("IPython")  # never imported here: a notebook has it loaded
    if ipython is None:
        return False
    shell = ipython.get_ipython()
    return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"


def _is_tty(stream: Any) -> bool:
    return bool(getattr(stream, "isatty", lambda: False)())


def write_line(text: str, file: TextIO | None = None) -> None:
    """Print one line without breaking a bar being drawn (tqdm.write clears and redraws)."""
    from tqdm import tqdm

    with _LOCK:
        tqdm.write(text, file=file if file is not None else sys.stdout)


class TqdmLoggingHandler(logging.StreamHandler):
    """A logging handler that writes each record through tqdm.write (to its stream; with no
    stream, to whatever ``sys.stderr`` is at the time of the record - a handler must not keep
    a stream that a test harness or notebook has since closed)."""

    def __init__(self, stream: TextIO | None = None) -> None:
        super().__init__(stream)
        self._fixed = stream

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = self.format(record)
            write_line(msg, file=self._fixed if self._fixed is not None else sys.stderr)
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


def _fmt_duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f}s"
    m, s = divmod(int(seconds), 60)
    return f"{m}m{s:02d}s" if m < 60 else f"{m // 60}h{m % 60:02d}m"


class ProgressBar:
    """Progress of one stage: ``update(done, total)``; ``close()`` ends it."""

    def __init__(self, label: str, total: int = 0, *, stream: TextIO | None = None,
                 interval: float = 5.0, enabled: bool = True, unit: str = "it",
                 delay: float = 0.5) -> None:
        self.label = label
        self.total = total
        self.done = 0
        self.unit = unit
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.interval = interval
        self.delay = delay  # bar mode: stages shorter than this never draw a bar
        self._start = time.monotonic()
        self._last: float | None = None
        self._printed_done = 0  # plain mode: what the last line showed
        self._bar: Any = None
        self.mode = "off"
        if enabled:
            self.mode = "notebook" if _in_notebook() and stream is None else (
                "bar" if _is_tty(self.stream) else "lines")

    def _make_bar(self) -> Any:
        if self.mode == "notebook":
            from tqdm.auto import tqdm
        else:
            from tqdm import tqdm
        return tqdm(total=self.total or None, desc=self.label, unit=self.unit,
                    initial=self.done, delay=self.delay,
                    file=None if self.mode == "notebook" else self.stream, leave=False,
                    smoothing=0.0, dynamic_ncols=True, mininterval=0.2,
                    bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} "
                               "[{elapsed}<{remaining}, {rate_fmt}]" if self.total else None)

    def update(self, done: int, total: int | None = None, message: str = "") -> None:
        if total:
            self.total = total
        self.done = done
        if self.mode == "off":
            return
        if self.mode in ("bar", "notebook"):
            with _LOCK:
                if self._bar is None:
                    if done <= 0:
                        return  # nothing to show yet (no "0 (0%)" start)
                    self._bar = self._make_bar()  # starts at done (rate counts from here)
                if self.total and self._bar.total != self.total:
                    self._bar.total = self.total
                    self._bar.refresh()
                self._bar.update(max(0, done - self._bar.n))
            return
        now = time.monotonic()
        finished = self.total > 0 and done >= self.total
        if done <= 0 or done == self._printed_done:
            return
        if self._last is not None and now - self._last < self.interval and not finished:
            return
        if self._last is None and not finished and now - self._start < min(1.0, self.interval):
            return  # a stage that ends within a second prints one line, at its end
        self._last = now
        self._line()

    def _line(self) -> None:
        elapsed = time.monotonic() - self._start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        if self.total > 0:
            count = f"{self.done}/{self.total} ({100 * min(1.0, self.done / self.total):.0f}%)"
        else:
            count = str(self.done)
        eta = ""
        if self.total > self.done > 0 and rate > 0:
            eta = f", ETA {_fmt_duration((self.total - self.done) / rate)}"
        self._printed_done = self.done
        # a rate means something only over a measurable time (not "3.1e+04 fit/s" for one fit)
        shown = f" {rate:.3g} {self.unit}/s" if elapsed >= 0.5 else ""
        write_line(f"{self.label}: {count} {elapsed:.1f}s{shown}{eta}", file=self.stream)

    def close(self) -> None:
        """Finish the stage (plain mode: a final line if the last state was not shown)."""
        if self.mode in ("bar", "notebook"):
            with _LOCK:
                if self._bar is not None:
                    self._bar.close()
                    self._bar = None
        elif self.mode == "lines" and self.done > 0 and self.done != self._printed_done:
            self._line()
        self.mode = "off" if self.mode != "off" else self.mode


class StageProgress:
    """A ``progress(stage, done, total, message)`` callback that keeps one bar per stage."""

    def __init__(self, prefix: str = "", *, stream: TextIO | None = None,
                 enabled: bool = True, interval: float = 5.0) -> None:
        self.prefix = prefix
        self.stream = stream
        self.enabled = enabled
        self.interval = interval
        self._bar: ProgressBar | None = None
        self._stage = ""

    def __call__(self, stage: str, done: int = 0, total: int = 0, message: str = "") -> None:
        if stage != self._stage:
            self.close()
            self._stage = stage
            label = f"{self.prefix}{stage}" if self.prefix else stage
            self._bar = ProgressBar(label.rstrip(), total, stream=self.stream,
                                    enabled=self.enabled, interval=self.interval,
                                    unit=STAGE_UNITS.get(stage, "step"))
        assert self._bar is not None
        self._bar.update(done, total, message)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        self._stage = ""

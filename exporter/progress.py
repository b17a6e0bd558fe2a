"""A small stderr progress bar that never garbles logs.

On a TTY it redraws one line in place (`\\r`); otherwise (CI logs, files, pipes) it writes a plain
log-style line at most every `interval` seconds and at the end, so a log stays readable.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


class ProgressBar:
    """Progress of one stage: `update(done, total)`; `close()` ends the line."""

    def __init__(self, label: str, total: int = 0, *, stream: TextIO | None = None,
                 interval: float = 5.0, enabled: bool = True) -> None:
        self.label = label
        self.total = total
        self.done = 0
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval = interval if not self.tty else 0.1
        self.enabled = enabled
        self._start = time.monotonic()
        self._last: float | None = None  # None: the first update always draws
        self._drawn = False
        self._drawn_done = -1

    def update(self, done: int, total: int | None = None, message: str = "") -> None:
        if total:
            self.total = total
        self.done = done
        now = time.monotonic()
        finished = self.total > 0 and done >= self.total
        if not self.enabled or (self._last is not None and now - self._last < self.interval
                                 and not finished):
            return
        self._last = now
        self._draw(message)

    def _draw(self, message: str) -> None:
        elapsed = time.monotonic() - self._start
        if self.total > 0:
            frac = min(1.0, self.done / self.total)
            count = f"{self.done}/{self.total}"
        else:
            frac = 0.0
            count = str(self.done)
        rate = self.done / elapsed if elapsed > 0 else 0.0
        self._drawn_done = self.done
        extra = f" {message}" if message else ""
        if self.tty:
            width = 24
            filled = int(round(frac * width))
            bar = "#" * filled + "-" * (width - filled)
            line = f"\r{self.label:<18} [{bar}] {count} {elapsed:5.1f}s {rate:5.1f}/s{extra}"
            self.stream.write(line[:160].ljust(100))
            self._drawn = True
        else:
            self.stream.write(f"{self.label}: {count} ({100 * frac:.0f}%) "
                              f"{elapsed:.1f}s{extra}\n")
        self.stream.flush()

    def close(self) -> None:
        """Draw the final state (if not drawn yet) and end the line on a TTY."""
        if not self.enabled:
            return
        if self.done != self._drawn_done:
            self._draw("")
        if self.tty and self._drawn:
            self.stream.write("\n")
            self.stream.flush()
        self._drawn = False


class StageProgress:
    """A `progress(stage, done, total, message)` callback that keeps one bar per stage."""

    def __init__(self, prefix: str = "", *, stream: TextIO | None = None,
                 enabled: bool = True) -> None:
        self.prefix = prefix
        self.stream = stream
        self.enabled = enabled
        self._bar: ProgressBar | None = None
        self._stage = ""

    def __call__(self, stage: str, done: int = 0, total: int = 0, message: str = "") -> None:
        if stage != self._stage:
            self.close()
            self._stage = stage
            label = f"{self.prefix}{stage}" if self.prefix else stage
            self._bar = ProgressBar(label, total, stream=self.stream, enabled=self.enabled)
        assert self._bar is not None
        self._bar.update(done, total, message)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        self._stage = ""

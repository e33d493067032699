"""A one-line progress bar for long loops: rows done, rows per second, estimated time left."""

from __future__ import annotations

import sys
import time
from typing import TextIO

#: Seconds between redraws on a terminal.
REDRAW_INTERVAL_S = 0.2

#: Seconds between plain lines when the output is not a terminal (a log file, CI).
LOG_INTERVAL_S = 10.0

#: Width of the bar in characters.
BAR_WIDTH = 24


class Progress:
    """Draw progress on `stream`: a redrawn bar on a terminal, a line every 10 s otherwise.

    `total` is an estimate and may be None; the bar then shows only counts and rate.
    """

    def __init__(self, label: str, total: int | None, stream: TextIO = sys.stderr) -> None:
        self._label = label
        self.total = total
        self._stream = stream
        self._interactive = stream.isatty()
        self._started = time.monotonic()
        self._last_drawn = 0.0
        self.done = 0

    def advance(self, count: int = 1) -> None:
        self.done += count
        now = time.monotonic()
        interval = REDRAW_INTERVAL_S if self._interactive else LOG_INTERVAL_S
        if now - self._last_drawn >= interval:
            self._last_drawn = now
            self._draw(now)

    def finish(self) -> None:
        self._draw(time.monotonic())
        if self._interactive:
            self._stream.write("\n")
        self._stream.flush()

    @property
    def rate(self) -> float:
        elapsed = time.monotonic() - self._started
        return self.done / elapsed if elapsed > 0 else 0.0

    def _draw(self, now: float) -> None:
        elapsed = now - self._started
        rate = self.done / elapsed if elapsed > 0 else 0.0
        text = f"{self._label} {self.done:,} rows, {rate:,.0f} rows/s"

        if self.total:
            share = min(1.0, self.done / self.total)
            filled = int(share * BAR_WIDTH)
            bar = "#" * filled + "-" * (BAR_WIDTH - filled)
            left = (self.total - self.done) / rate if rate > 0 and share < 1 else 0.0
            text = f"{self._label} [{bar}] {share:4.0%} {self.done:,} rows, {rate:,.0f} rows/s, about {left:,.0f} s left"

        end = "\r" if self._interactive else "\n"
        self._stream.write(text + end)
        self._stream.flush()

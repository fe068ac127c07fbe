"""What a running job shows: a progress bar with rows/s and ETA on a terminal, plain lines otherwise."""

from __future__ import annotations

import time
from typing import TextIO

__all__ = ["Progress"]

_LINE_EVERY_S = 10.0
_BAR_EVERY_S = 0.2
_WIDTH = 30


class Progress:
    def __init__(self, stream: TextIO, total: int | None, done: int = 0, quiet: bool = False) -> None:
        self.stream = stream
        self.total = total
        self.done = done
        self.quiet = quiet
        self.tty = stream.isatty()
        self._start = time.monotonic()
        self._first = done
        self._shown = 0.0

    def advance(self, rows: int) -> None:
        self.done += rows
        now = time.monotonic()
        if self.quiet or now - self._shown < (_BAR_EVERY_S if self.tty else _LINE_EVERY_S):
            return
        self._shown = now
        self._show(now)

    def _show(self, now: float) -> None:
        elapsed = max(now - self._start, 1e-9)
        rate = (self.done - self._first) / elapsed
        text = f"{self.done:,} rows"
        if self.total:
            share = min(self.done / self.total, 1.0)
            left = (self.total - self.done) / rate if rate > 0 else float("inf")
            eta = f"{left:.0f} s" if left != float("inf") else "?"
            bar = "#" * int(share * _WIDTH)
            text = f"[{bar:<{_WIDTH}}] {share:6.1%} {self.done:,}/{self.total:,} rows, ETA {eta}"
        text += f", {rate:,.0f} rows/s"
        if self.tty:
            self.stream.write(f"\r{text}\x1b[K")
        else:
            self.stream.write(f"progress: {text}\n")
        self.stream.flush()

    def finish(self) -> None:
        if self.quiet:
            return
        self._show(time.monotonic())
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()

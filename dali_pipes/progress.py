"""A dependency-free progress line: live on a terminal, one plain line at the end otherwise."""
from __future__ import annotations

import sys
import time
from typing import Callable, TextIO


class Progress:
    """Count work done and show rate; redraws at most every `interval` seconds.

    On a terminal the line is redrawn in place; when the stream is not a terminal
    (CI, a log file) nothing is drawn until `close`, which prints one line, so logs
    stay clean.
    """

    def __init__(self, total: int, desc: str, unit: str = "img", stream: TextIO | None = None,
                 interval: float = 0.5, enabled: bool = True, scale: int = 1) -> None:
        self.scale = scale  # each update counts for `scale` items (DDP: every rank did the same)
        self.total = total
        self.desc = desc
        self.unit = unit
        self.stream = stream if stream is not None else sys.stderr
        self.interval = interval
        self.enabled = enabled
        self.live = enabled and self.stream.isatty()
        self.count = 0
        self.start = time.perf_counter()
        self._last_draw = 0.0
        self._postfix: Callable[[], str] | None = None

    def set_postfix(self, postfix: Callable[[], str]) -> None:
        """A function returning extra text (running loss...), called only when drawing."""
        self._postfix = postfix

    def update(self, n: int = 1) -> None:
        """Record `n` more items done (times `scale`)."""
        self.count += n * self.scale
        if self.live:
            now = time.perf_counter()
            if now - self._last_draw >= self.interval:
                self._last_draw = now
                self.stream.write("\r" + self.line() + "\x1b[K")
                self.stream.flush()

    @property
    def elapsed(self) -> float:
        """Seconds since the bar was made."""
        return time.perf_counter() - self.start

    @property
    def rate(self) -> float:
        """Items per second so far."""
        return self.count / max(self.elapsed, 1e-9)

    def line(self) -> str:
        """The current progress text."""
        pct = f" {100.0 * self.count / self.total:5.1f}%" if self.total else ""
        extra = f" {self._postfix()}" if self._postfix else ""
        return f"{self.desc}: {self.count}/{self.total}{pct} {self.rate:,.0f} {self.unit}/s {self.elapsed:.1f}s{extra}"

    def close(self) -> None:
        """Finish the line (terminal) or print it once (log)."""
        if not self.enabled:
            return
        self.stream.write(("\r" if self.live else "") + self.line() + ("\x1b[K" if self.live else "") + "\n")
        self.stream.flush()

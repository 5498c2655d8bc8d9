"""A dependency-free progress line: live on a terminal, a plain line every so often in a log."""
from __future__ import annotations

import sys
import time
from typing import Callable, TextIO


def format_eta(seconds: float | None) -> str:
    """h:mm:ss (or m:ss under an hour); `-` when unknown."""
    if seconds is None:
        return "-"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    """Count work done and show rate and ETA.

    On a terminal the line is redrawn in place at most every `interval` seconds. When
    the stream is not a terminal (Slurm, nohup, CI), a plain line is written every
    `log_interval` seconds (None: never) and once more at `close`, so a log shows
    progress without carriage returns. With `steps`, the line counts steps too
    (`first_step`: steps already done when resumed mid-epoch; they do not count
    towards the rate). Drawing calls only `clock` and the postfix function: it never
    touches a device.
    """

    def __init__(self, total: int, desc: str, unit: str = "img", stream: TextIO | None = None,
                 interval: float = 0.5, enabled: bool = True, scale: int = 1, *, steps: int | None = None,
                 first_step: int = 0, first_count: int = 0, log_interval: float | None = 30.0,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.scale = scale  # each update counts for `scale` items (DDP: every rank did the same)
        self.total = total
        self.desc = desc
        self.unit = unit
        self.stream = stream if stream is not None else sys.stderr
        self.interval = interval
        self.log_interval = log_interval
        self.enabled = enabled
        self.live = enabled and self.stream.isatty()
        self.steps = steps
        self.step = first_step
        self.count = first_count
        self._first_count = first_count
        self._clock = clock
        self.start = clock()
        self._last_draw = self.start if not self.live else 0.0
        self._postfix: Callable[[], str] | None = None

    def set_postfix(self, postfix: Callable[[], str]) -> None:
        """A function returning extra text (running loss...), called only when drawing."""
        self._postfix = postfix

    def update(self, n: int = 1) -> None:
        """Record `n` more items done (times `scale`) in one more step."""
        self.count += n * self.scale
        self.step += 1
        if not self.enabled:
            return
        now = self._clock()
        if self.live and now - self._last_draw >= self.interval:
            self._last_draw = now
            self.stream.write("\r" + self.line() + "\x1b[K")
            self.stream.flush()
        elif (not self.live and self.log_interval is not None and now - self._last_draw >= self.log_interval
              and self.step != self.steps):  # the last step's line is `close`'s
            self._last_draw = now
            self.stream.write(self.line() + "\n")
            self.stream.flush()

    @property
    def elapsed(self) -> float:
        """Seconds since the bar was made."""
        return self._clock() - self.start

    @property
    def rate(self) -> float:
        """Items per second so far (this session's items only)."""
        return (self.count - self._first_count) / max(self.elapsed, 1e-9)

    @property
    def eta(self) -> float | None:
        """Seconds left at the current rate (None before the first item)."""
        if self.count <= self._first_count or not self.total:
            return None
        return max(self.total - self.count, 0) / max(self.rate, 1e-9)

    def line(self) -> str:
        """The current progress text."""
        steps = f"step {self.step}/{self.steps} " if self.steps is not None else ""
        pct = f" {100.0 * self.count / self.total:5.1f}%" if self.total else ""
        extra = f" {self._postfix()}" if self._postfix else ""
        return (f"{self.desc}: {steps}{self.count}/{self.total}{pct} {self.rate:,.0f} {self.unit}/s{extra} "
                f"{self.elapsed:.1f}s ETA {format_eta(self.eta)}")

    def close(self) -> None:
        """Finish the line (terminal) or print it once more (log)."""
        if not self.enabled:
            return
        self.stream.write(("\r" if self.live else "") + self.line() + ("\x1b[K" if self.live else "") + "\n")
        self.stream.flush()

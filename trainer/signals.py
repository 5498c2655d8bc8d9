"""Turning SIGINT and SIGTERM into a request to stop after the current step."""
from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any


class StopSignals:
    """While active, SIGINT/SIGTERM set `received` instead of killing; a second SIGINT stops at once.

    Installed only in the main thread of the main interpreter (signal handlers can only
    be set there); elsewhere it is inert.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt  # asked twice: the user does not want to wait for the step
        self.received = signum

    @property
    def exit_code(self) -> int:
        """The shell convention: 128 + signal number (130 for SIGINT, 143 for SIGTERM)."""
        return 128 + int(self.received or 0)

    @property
    def name(self) -> str:
        """SIGINT or SIGTERM."""
        return signal.Signals(self.received).name if self.received else ""

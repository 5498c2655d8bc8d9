"""How long the train step waited for its batch, measured where the step needs it.

On the CPU the step runs on the host, so the wait is the host time spent getting the
next batch. On a GPU the host only queues work and runs ahead; host time in `next()`
counts only if the GPU had nothing left to do meanwhile. So the clock records two CUDA
events on the consumer's stream: one after each step is queued, one when the next
batch has been handed over (after the stream's wait for it). The GPU reaches the
second as soon as it has both finished the step and the batch is ready, so the time
between them is exactly how long the stream stalled for data: the host being late,
the side stream still preparing, or both. Reading event times needs them finished, so
the clock adds them up only when the loop syncs anyway (`settle`: every `--log-every`
steps and at the end of the epoch); no sync is added to a step.
"""
from __future__ import annotations

import time
from typing import Any

import torch


class DataWaitClock:
    """Adds to `seconds` the time each step waited for its batch (see module)."""

    def __init__(self, device: torch.device, seconds: float = 0.0) -> None:
        self.seconds = seconds
        self._device = device
        self._cuda = device.type == "cuda"
        self._step_done: Any = None  # event after the last queued step (CUDA), None before the first
        self._pending: list[tuple[Any, Any]] = []
        self._asked = time.perf_counter()

    def batch_arrived(self) -> None:
        """Call as soon as the loop holds the next batch, before using it."""
        if self._cuda and self._step_done is not None:
            ready = torch.cuda.Event(enable_timing=True)
            ready.record(torch.cuda.current_stream(self._device))
            self._pending.append((self._step_done, ready))
        else:  # the CPU, or the epoch's first batch on a GPU that had nothing queued
            self.seconds += time.perf_counter() - self._asked

    def step_queued(self) -> None:
        """Call when the loop has queued the step and goes back for the next batch."""
        if self._cuda:
            self._step_done = torch.cuda.Event(enable_timing=True)
            self._step_done.record(torch.cuda.current_stream(self._device))
        self._asked = time.perf_counter()

    def settle(self) -> float:
        """Add up the GPU stalls recorded so far (waits for their events: call where the loop syncs anyway)."""
        if self._pending:
            self._pending[-1][1].synchronize()
            self.seconds += sum(start.elapsed_time(end) for start, end in self._pending) / 1000.0
            self._pending = []
        return self.seconds

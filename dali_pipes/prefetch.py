"""Prepare batches in a background thread while the consumer's steps run (timm's `PrefetchLoader`, threaded).

`Prefetcher(items, prepare, device)` yields `prepare(item)` for each item, in order,
skipping None. With a `depth` (2 on CUDA by default), a background thread runs
`prepare` (host-to-device copies, JPEG decoding, the warp, normalization) on the device's
prepare stream and hands finished batches to a queue of that depth; the training thread
only takes them. torchvision's GPU decoder ends each call with a stream synchronize, so
in the training thread it would hold the next step's launch until the decode is done.

Handing a batch over costs the host nothing: the consumer's stream waits for that
batch's own event (not for the prepare stream as a whole, which by then holds later
batches' work), and each tensor is `record_stream`-ed there (`device.hand_over`).

A failure in `prepare` or in `items` reaches the consumer at the batch where it
happened, with its traceback. A consumer that stops early (`break`, an exception,
the generator dropped) stops the thread before its iteration ends: what the thread
still prepares is discarded and it is joined, so no thread outlives the iteration.

On the CPU (depth 0 by default) there is no thread and no stream: a plain loop.
"""
from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Any, Callable, Generic, Iterable, Iterator, TypeVar

import torch

from .device import device_streams, hand_over, on_device, on_stream, ready_marker

Item = TypeVar("Item")
Batch = tuple[torch.Tensor, ...]

GPU_QUEUE_DEPTH = 2  # batches prepared ahead of the step on CUDA


@dataclass(frozen=True)
class _Failed:
    error: BaseException


_END = object()


class Prefetcher(Generic[Item]):
    """Iterable of the non-None `prepare(item)` batches, prepared ahead in a thread when `depth` > 0 (see module)."""

    def __init__(self, items: Iterable[Item], prepare: Callable[[Item], Batch | None], device: torch.device,
                 depth: int | None = None) -> None:
        self._items = items
        self._prepare = prepare
        self._device = torch.device(device)
        self._depth = (GPU_QUEUE_DEPTH if self._device.type == "cuda" else 0) if depth is None else depth

    def __iter__(self) -> Iterator[Batch]:
        if self._depth == 0:
            for item in self._items:
                batch = self._prepare(item)
                if batch is not None:
                    yield batch
            return
        worker = _PrepareThread(self._items, self._prepare, self._device, self._depth)
        try:
            while True:
                entry = worker.take()
                if entry is _END:
                    return
                if isinstance(entry, _Failed):
                    raise entry.error
                batch, marker = entry
                hand_over(batch, marker, self._device)
                yield batch
        finally:
            worker.close()


class _PrepareThread:
    """The thread behind a `Prefetcher`: prepares batches into a bounded queue until told to stop."""

    def __init__(self, items: Iterable[Any], prepare: Callable[[Any], Batch | None], device: torch.device,
                 depth: int) -> None:
        self._items, self._prepare, self._device = items, prepare, device
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dali_pipes-prefetch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        stream = device_streams(self._device).prepare
        try:
            # The current device, stream and grad mode are the thread's own: set them here.
            with on_device(self._device), on_stream(stream), torch.no_grad():
                for item in self._items:
                    batch = self._prepare(item)
                    if batch is not None and not self._put((batch, ready_marker(stream))):
                        return
            self._put(_END)
        except BaseException as error:  # handed to the consumer, raised there
            self._put(_Failed(error))

    def _put(self, entry: Any) -> bool:
        """Queue `entry` (waiting for room); False once the consumer has stopped."""
        if self._stop.is_set():
            return False
        self._queue.put(entry)
        return not self._stop.is_set()

    def take(self) -> Any:
        """The next prepared entry: a (batch, marker) pair, `_Failed`, or `_END`."""
        return self._queue.get()

    def close(self) -> None:
        """Stop preparing, discard what was prepared, and wait for the thread to end."""
        self._stop.set()
        while self._thread.is_alive():
            # Emptying the queue frees a `put` the thread may be blocked in; it then sees the stop.
            try:
                while True:
                    self._queue.get_nowait()
            except queue.Empty:
                pass
            self._thread.join(timeout=0.05)

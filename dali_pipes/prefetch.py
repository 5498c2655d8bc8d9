"""Prepare batch k+1 on a side stream while the consumer's step k runs (timm's `PrefetchLoader` idea).

`Prefetcher(items, prepare, device)` yields `prepare(item)` for each item, skipping
None. With `lookahead` (the default on CUDA), it prepares the next batch on a side
stream before handing the current one over, so the host queues batch k+1's copy,
decode, warp and normalization while the GPU still runs step k, and the GPU can run
them beside it. Handing a batch over costs the host nothing: the consumer's stream
waits for that batch's own event (not for the side stream as a whole, which by then
already holds the next batch's work), and each tensor is `record_stream`-ed there.

On the CPU there are no streams: every stream call is a no-op and, unless asked,
there is no lookahead, so the CPU path behaves exactly as a plain loop.
"""
from __future__ import annotations

from typing import Any, Callable, Generic, Iterable, Iterator, TypeVar

import torch

from .device import hand_over, on_stream, ready_marker, side_stream

Item = TypeVar("Item")
Batch = tuple[torch.Tensor, ...]


class Prefetcher(Generic[Item]):
    """Iterable of the non-None `prepare(item)` batches, prepared one ahead on a side stream (see module)."""

    def __init__(self, items: Iterable[Item], prepare: Callable[[Item], Batch | None], device: torch.device,
                 lookahead: bool | None = None) -> None:
        self._items = items
        self._prepare = prepare
        self._device = torch.device(device)
        self._lookahead = self._device.type == "cuda" if lookahead is None else lookahead

    def __iter__(self) -> Iterator[Batch]:
        stream = side_stream(self._device)
        pending: tuple[Batch, Any] | None = None
        for item in self._items:
            with on_stream(stream):
                batch = self._prepare(item)
            if batch is None:
                continue
            ready = (batch, ready_marker(stream))
            if pending is not None:
                yield self._hand_over(*pending)
            pending = ready
            if not self._lookahead:
                yield self._hand_over(*pending)
                pending = None
        if pending is not None:
            yield self._hand_over(*pending)

    @staticmethod
    def _hand_over(batch: Batch, marker: Any) -> Batch:
        hand_over(batch, marker)
        return batch

"""The `synthetic` backend: random batches of the right shape and label range, no I/O.

It measures the model alone (compute-only images/s) and serves tests. Batches are made
once on the device and reused, so producing one costs nothing.
"""
from __future__ import annotations

from typing import Iterator

import torch

from .loader import BatchLoader, LoaderRequest, to_model_input
from .pack_format import PackReader


class SyntheticLoader(BatchLoader):
    """Random uint8 pixels normalized like real data; labels uniform over the pack's classes."""

    backend = "synthetic"

    def __init__(self, reader: PackReader, request: LoaderRequest) -> None:
        super().__init__(reader, request)
        generator = torch.Generator().manual_seed(request.seed + 1000003 * request.rank)
        size, n = request.spec.image_size, request.batch_size
        pixels = torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=generator)
        self._images = to_model_input(pixels.to(request.device), request.spec, request.dtype)
        self._labels = torch.randint(0, self.num_classes, (n,), generator=generator).to(request.device)

    def _batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for batch in self._remaining():
            n = len(batch)
            yield self._images[:n], self._labels[:n]


def make_loader(reader: PackReader, request: LoaderRequest) -> SyntheticLoader:
    """Backend entry point (see `backends.BACKENDS`)."""
    return SyntheticLoader(reader, request)

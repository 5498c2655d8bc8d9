"""The `synthetic` backend: random batches of the right shape and label range, no I/O.

It measures the model alone (compute-only images/s) and serves tests. Pixels are made
once per image size on the device and reused, so producing a batch costs nothing; a
training batch still gets its samples' colour jitter and random erasing
(`augment.batch_augmentation`, from its pack indices), so their device cost is measured too.
"""
from __future__ import annotations

from typing import Iterator

import torch

from .augment import batch_augmentation
from .loader import BatchLoader, LoaderRequest, to_model_input
from .pack_format import PackReader


class SyntheticLoader(BatchLoader):
    """Random uint8 pixels normalized like real data; labels uniform over the pack's classes."""

    backend = "synthetic"

    def __init__(self, reader: PackReader, request: LoaderRequest) -> None:
        super().__init__(reader, request)
        self._make_batch()

    def _make_batch(self) -> None:
        request = self.request
        generator = torch.Generator().manual_seed(request.seed + 1000003 * request.rank)
        size, n = self.spec.image_size, request.batch_size
        pixels = torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=generator)
        self._pixels = pixels.to(request.device)
        self._images = to_model_input(self._pixels, self.spec, request.dtype)
        self._labels = torch.randint(0, self.num_classes, (n,), generator=generator).to(request.device)

    def _spec_changed(self) -> None:
        self._make_batch()

    def _batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        augmented = self.request.train and self.spec.batch_augmented
        for batch in self._remaining():
            n = len(batch)
            if augmented:
                augmentation = batch_augmentation(self.spec, self.request.seed, self.epoch, batch)
                yield to_model_input(self._pixels[:n], self.spec, self.request.dtype, augmentation), self._labels[:n]
            else:
                yield self._images[:n], self._labels[:n]


def make_loader(reader: PackReader, request: LoaderRequest) -> SyntheticLoader:
    """Backend entry point (see `backends.BACKENDS`)."""
    return SyntheticLoader(reader, request)

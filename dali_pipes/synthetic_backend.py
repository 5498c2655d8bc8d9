"""The `synthetic` backend: random batches of the right shape and label range, no I/O.

It measures the model alone (compute-only images/s) and serves tests. Batches are made
once on the device and reused, so producing one costs nothing.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from .base import EpochCursor, to_model_input
from .pack import PackReader
from .spec import PipelineSpec


class SyntheticLoader:
    """Random uint8 pixels normalized like real data; labels uniform over the pack's classes."""

    backend = "synthetic"

    def __init__(self, reader: PackReader, split_indices: np.ndarray, spec: PipelineSpec, *, train: bool, batch_size: int,
                 device: torch.device, dtype: torch.dtype, seed: int, rank: int, world_size: int, drop_last: bool) -> None:
        self.spec = spec
        self.num_classes = reader.num_classes
        self._cursor = EpochCursor(split_indices, train=train, seed=seed, batch_size=batch_size, rank=rank,
                                   world_size=world_size, drop_last=drop_last)
        generator = torch.Generator().manual_seed(seed + 1000003 * rank)
        size = spec.image_size
        pixels = torch.randint(0, 256, (batch_size, size, size, 3), dtype=torch.uint8, generator=generator)
        self._images = to_model_input(pixels.to(device), spec, dtype)
        self._labels = torch.randint(0, self.num_classes, (batch_size,), generator=generator).to(device)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Start epoch `epoch` at batch `start_batch`."""
        self._cursor.set_epoch(epoch, start_batch)

    def __len__(self) -> int:
        return len(self._cursor)

    @property
    def num_samples(self) -> int:
        """Samples per epoch on this rank."""
        return self._cursor.num_samples

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for batch in self._cursor.batches():
            n = len(batch)
            yield self._images[:n], self._labels[:n]


def make_loader(reader: PackReader, split_indices: np.ndarray, spec: PipelineSpec, *, train: bool, batch_size: int,
                device: torch.device, dtype: torch.dtype, num_workers: int, seed: int, rank: int, world_size: int,
                drop_last: bool) -> SyntheticLoader:
    """Backend entry point (see `dali_pipes.loader.BACKENDS`)."""
    return SyntheticLoader(reader, split_indices, spec, train=train, batch_size=batch_size, device=device, dtype=dtype,
                           seed=seed, rank=rank, world_size=world_size, drop_last=drop_last)

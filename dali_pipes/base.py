"""What every backend shares: the epoch's sample order and shards, and the batch contract.

A backend only turns encoded bytes into uint8 NHWC pixel batches; the order of samples,
their sharding across ranks, their augmentation parameters (`spec.sample_augmentation`)
and the final normalization on the device all live here, written once.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Protocol

import numpy as np
import torch

from .spec import PipelineSpec


@dataclass(frozen=True)
class EpochPlan:
    """The samples one rank sees in one epoch, cut into batches.

    Train: a permutation seeded by (seed, epoch), the same on every rank, split into
    `world_size` equal disjoint shards (the remainder left out, as DistributedSampler
    does), then into batches (the last partial one dropped when `drop_last`).
    Eval: the split in pack order, sample i going to rank i % world_size, every sample
    exactly once, the last partial batch kept.
    """

    indices: np.ndarray  # pack indices for this rank, in visiting order
    batch_size: int
    drop_last: bool

    def __len__(self) -> int:
        if self.drop_last:
            return len(self.indices) // self.batch_size
        return math.ceil(len(self.indices) / self.batch_size)

    @property
    def num_samples(self) -> int:
        """Samples this rank yields in the epoch."""
        return len(self) * self.batch_size if self.drop_last else len(self.indices)

    def batch(self, b: int) -> np.ndarray:
        """Pack indices of batch `b`."""
        return self.indices[b * self.batch_size : min((b + 1) * self.batch_size, len(self.indices))]

    def batches(self, start: int = 0) -> Iterator[np.ndarray]:
        """Batches from `start` (to resume mid-epoch) to the end."""
        for b in range(start, len(self)):
            yield self.batch(b)


def plan_epoch(split_indices: np.ndarray, *, train: bool, seed: int, epoch: int, batch_size: int,
               rank: int = 0, world_size: int = 1, drop_last: bool | None = None) -> EpochPlan:
    """The `EpochPlan` for one rank; see its docstring for the rules."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world of size {world_size}")
    drop_last = train if drop_last is None else drop_last
    split_indices = np.asarray(split_indices, dtype=np.int64)
    if train:
        order = split_indices[np.random.default_rng((seed, epoch)).permutation(len(split_indices))]
        per_rank = len(order) // world_size
        mine = order[rank * per_rank : (rank + 1) * per_rank]
    else:
        mine = split_indices[rank::world_size]
    return EpochPlan(mine, batch_size, drop_last)


def to_model_input(images: torch.Tensor, spec: PipelineSpec, dtype: torch.dtype) -> torch.Tensor:
    """uint8 N x H x W x C pixels -> N x C x H x W channels_last, normalized, in `dtype`.

    `torch.uint8` returns the raw pixels in the same layout. Runs wherever `images`
    lives, so on a GPU the host ships uint8 and the device does the arithmetic.
    """
    nchw = images.permute(0, 3, 1, 2)  # a view: NHWC memory is exactly channels_last NCHW
    if dtype == torch.uint8:
        return nchw.contiguous(memory_format=torch.channels_last)
    mean = torch.tensor(spec.mean_255, device=images.device, dtype=torch.float32).view(1, 3, 1, 1)
    inv_std = torch.tensor([1.0 / s for s in spec.std_255], device=images.device, dtype=torch.float32).view(1, 3, 1, 1)
    out = nchw.float().sub_(mean).mul_(inv_std)  # in place: one full-size float buffer, not two
    return out.to(dtype).contiguous(memory_format=torch.channels_last)


class BatchLoader(Protocol):
    """The batch contract every backend honours (see `dali_pipes.build_loader`)."""

    backend: str
    spec: PipelineSpec
    num_classes: int

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...

    def __len__(self) -> int: ...

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None: ...

    @property
    def num_samples(self) -> int: ...

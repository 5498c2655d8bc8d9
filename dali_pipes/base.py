"""What every backend shares: the epoch's sample order and shards, and the batch contract.

A backend only turns encoded bytes into uint8 NHWC pixel batches; the order of samples,
their sharding across ranks, their augmentation parameters (`spec.sample_augmentation`)
and the final normalization on the device all live here, written once. So does the
bookkeeping of unreadable samples (`SkipLog`): a backend only says which sample failed.
"""
from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass
from typing import Iterator, Protocol, Sequence

import numpy as np
import torch

from .spec import PipelineSpec

log = logging.getLogger("dali_pipes")


class ImageDecodeError(RuntimeError):
    """An image in the pack cannot be decoded; the message names its pack index and source path."""


def decode_error_message(pack: object, index: int, path: str, reason: str) -> str:
    """The one-line report of an undecodable pack image: pack, index, source path, reason."""
    return f"{pack}: image {index} ({path}) cannot be decoded: {reason}"


@dataclass(frozen=True)
class SkippedSample:
    """A sample a loader left out: its pack index, source path, and why it could not be read."""

    index: int
    path: str
    reason: str


class SkipLog:
    """The unreadable samples a loader has found: every one so far (`bad`) and this epoch's (`skipped`).

    A sample found bad is remembered, so later epochs leave it out without trying it
    again (`drop_known`), yet it is counted in each epoch's `skipped`. The WARNING that
    names it is logged once per loader, not once per epoch.
    """

    def __init__(self, pack: object, paths: Sequence[str]) -> None:
        self._pack = pack
        self._paths = paths
        self.bad: dict[int, str] = {}  # pack index -> reason
        self.skipped: list[SkippedSample] = []

    def new_epoch(self) -> None:
        """Start counting a new epoch (a fresh list: one held from the last epoch stays as it was)."""
        self.skipped = []

    def add(self, index: int, reason: str) -> None:
        """Record sample `index` as unreadable for `reason`: remembered, counted in this epoch, logged once."""
        index = int(index)
        if index not in self.bad:
            self.bad[index] = reason
            log.warning("%s; sample skipped", decode_error_message(self._pack, index, self._paths[index], reason))
        self.skipped.append(SkippedSample(index, self._paths[index], self.bad[index]))

    def drop_known(self, indices: np.ndarray) -> np.ndarray:
        """`indices` without the samples already known bad, which are counted in this epoch."""
        if not self.bad:
            return indices
        known = np.isin(indices, np.fromiter(self.bad, dtype=np.int64, count=len(self.bad)))
        for index in indices[known]:
            self.add(int(index), self.bad[int(index)])
        return indices[~known]


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


class EpochCursor:
    """The epoch a loader is on, its plan, and the batch it starts from: one per loader.

    Every backend keeps one, so `set_epoch`, `len()` and `num_samples` mean the same
    thing everywhere: `len()` is a whole epoch's batches, also when resumed mid-epoch.
    """

    def __init__(self, split_indices: np.ndarray, *, train: bool, seed: int, batch_size: int, rank: int,
                 world_size: int, drop_last: bool) -> None:
        self._split_indices = split_indices
        self._plan_args = dict(train=train, seed=seed, batch_size=batch_size, rank=rank, world_size=world_size,
                               drop_last=drop_last)
        self.epoch = 0
        self.start_batch = 0
        self.plan: EpochPlan = plan_epoch(split_indices, epoch=0, **self._plan_args)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Move to epoch `epoch`, starting at batch `start_batch` (earlier batches are skipped)."""
        plan = plan_epoch(self._split_indices, epoch=epoch, **self._plan_args)
        if not 0 <= start_batch <= len(plan):
            raise ValueError(f"start_batch {start_batch} outside 0..{len(plan)}")
        self.epoch, self.start_batch, self.plan = epoch, start_batch, plan

    def __len__(self) -> int:
        return len(self.plan)

    @property
    def num_samples(self) -> int:
        """Samples this rank yields in a whole epoch."""
        return self.plan.num_samples

    def batches(self) -> Iterator[np.ndarray]:
        """The pack-index batches still to come in this epoch."""
        return self.plan.batches(self.start_batch)


@functools.lru_cache(maxsize=16)
def normalization_constants(mean_255: tuple[float, ...], std_255: tuple[float, ...],
                            device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, 1 / std) as 1 x 3 x 1 x 1 float32 on `device`, made once per (spec, device).

    Built per batch, each would be a small synchronizing host-to-device copy: the host
    would wait for the step queued before it, and book that wait as data wait.
    """
    mean = torch.tensor(mean_255, dtype=torch.float32).view(1, 3, 1, 1)
    inv_std = torch.tensor([1.0 / s for s in std_255], dtype=torch.float32).view(1, 3, 1, 1)
    return mean.to(device), inv_std.to(device)


def to_model_input(images: torch.Tensor, spec: PipelineSpec, dtype: torch.dtype) -> torch.Tensor:
    """uint8 N x H x W x C pixels -> N x C x H x W channels_last, normalized, in `dtype`.

    `torch.uint8` returns the raw pixels in the same layout. Runs wherever `images`
    lives, so on a GPU the host ships uint8 and the device does the arithmetic.
    """
    nchw = images.permute(0, 3, 1, 2)  # a view: NHWC memory is exactly channels_last NCHW
    if dtype == torch.uint8:
        return nchw.contiguous(memory_format=torch.channels_last)
    mean, inv_std = normalization_constants(spec.mean_255, spec.std_255, images.device)
    out = nchw.float().sub_(mean).mul_(inv_std)  # in place: one full-size float buffer, not two
    return out.to(dtype).contiguous(memory_format=torch.channels_last)


class BatchLoader(Protocol):
    """The batch contract every backend honours (see `dali_pipes.build_loader`).

    Unreadable samples (bytes damaged after packing) do not stop an epoch. The sample is
    left out of its batch, which is simply shorter; when every sample of a batch is bad,
    that batch is not yielded at all and the epoch goes on with the next one, so `len()`
    (and `num_samples`) are then upper bounds, exact for data without bad samples. Each
    sample left out is in `skipped` (a list of `SkippedSample`, the samples left out so
    far in the current epoch, emptied by `set_epoch` and when an iteration starts), and
    is logged once per loader at WARNING on the "dali_pipes" logger with its index, path
    and reason. A sample found bad is not tried again in later epochs, but is counted
    in each epoch's `skipped`.
    """

    backend: str
    spec: PipelineSpec
    num_classes: int
    skipped: list[SkippedSample]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...

    def __len__(self) -> int: ...

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None: ...

    @property
    def num_samples(self) -> int: ...

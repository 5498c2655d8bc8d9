"""What a loader is: the request, the epoch cursor, shards, the skipped-sample record, one base.

A backend only turns encoded bytes into uint8 NHWC pixel batches; everything else every
backend shares is written once here:

* `LoaderRequest`: the frozen request `build_loader` hands to a backend's
  `make_loader(reader, request)`, and the one place a request is checked.
* `samples_per_rank`, `plan_epoch`, `EpochPlan`, `EpochCursor`: the order of samples,
  their sharding across ranks and their cutting into batches, and the spec of each epoch
  (its image size can change from epoch to epoch: progressive resizing).
* `ImageDecodeError` and `SkippedSample`: one unreadable-sample concept, as an error
  (raised where one image is decoded) and as a record (what a loader left out), and
  `SkipLog`, the bookkeeping of those records.
* `BatchLoader`: the base every backend's loader extends; it owns the cursor and the
  skip log, so `set_epoch`, `len()`, `num_samples` and `skipped` mean the same thing
  everywhere, and a backend writes only `_batches()`.
* `to_model_input`: the final normalization on the device, with the batch's colour
  jitter and random erasing (`augment`).

Augmentation parameters come from `geometry` (the warp) and `augment` (the batch-level ones).
"""
from __future__ import annotations

import abc
import dataclasses
import functools
import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Iterator

import numpy as np
import torch

from .augment import BatchAugmentation
from .spec import PipelineSpec
from .words import plural

if TYPE_CHECKING:
    from .pack_format import PackReader

log = logging.getLogger("dali_pipes")

MODEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.uint8)


class LoaderError(Exception):
    """A loader cannot be built as asked; the message is one line for the user."""


def samples_per_rank(total: int, *, train: bool, world_size: int) -> int:
    """Samples one rank sees per epoch out of `total` (the most any rank sees, for eval).

    Train: equal disjoint shards, the remainder left out (as DistributedSampler does).
    Eval: every sample exactly once, sample i on rank i % world_size, so rank 0 has
    the ceiling.
    """
    return total // world_size if train else -(-total // world_size)


@dataclass(frozen=True)
class LoaderRequest:
    """What a backend is asked to load: one split of one pack, for one rank.

    Checked when made, and nowhere else: whatever holds a request may trust it.
    `drop_last=None` means "drop the last partial batch when training".
    """

    split_indices: np.ndarray
    spec: PipelineSpec
    train: bool
    batch_size: int
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32
    num_workers: int = 0
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    drop_last: bool | None = None
    split: str = "requested"  # the split's name, for messages

    def __post_init__(self) -> None:
        object.__setattr__(self, "split_indices", np.asarray(self.split_indices, dtype=np.int64))
        object.__setattr__(self, "device", torch.device(self.device))
        object.__setattr__(self, "drop_last", self.train if self.drop_last is None else bool(self.drop_last))
        self._check()

    def _check(self) -> None:
        if self.dtype not in MODEL_DTYPES:
            raise LoaderError(f"dtype must be float32, float16, bfloat16 or uint8, got {self.dtype}")
        if self.batch_size < 1:
            raise LoaderError(f"batch size must be positive, got {self.batch_size}")
        if not 0 <= self.rank < self.world_size:
            raise LoaderError(f"rank {self.rank} outside world of size {self.world_size}")
        if self.num_workers < 0:
            raise LoaderError(f"num_workers must be 0 or more, got {self.num_workers}")
        if len(self.split_indices) == 0:
            raise LoaderError(f"split {self.split!r} is empty")
        if self.drop_last and self.batch_size > self.per_rank:
            raise LoaderError(f"batch size {self.batch_size} is larger than the "
                              f"{plural(self.per_rank, self.split + ' image')} per rank; lower --batch-size")

    @property
    def per_rank(self) -> int:
        """Samples this rank sees per epoch (see `samples_per_rank`)."""
        return samples_per_rank(len(self.split_indices), train=self.train, world_size=self.world_size)


@dataclass(frozen=True)
class SkippedSample:
    """A sample a loader left out: its pack index, source path, and why it could not be read."""

    index: int
    path: str
    reason: str


class ImageDecodeError(RuntimeError):
    """An image in the pack cannot be decoded; the message names the pack, its index and source path."""

    def __init__(self, pack: object, index: int, path: str, reason: str) -> None:
        super().__init__(f"{pack}: image {index} ({path}) cannot be decoded: {reason}")
        self.pack, self.index, self.path, self.reason = pack, int(index), path, reason

    @classmethod
    def of(cls, reader: PackReader, index: int, reason: str) -> "ImageDecodeError":
        """The error for image `index` of `reader`."""
        return cls(reader.path, index, reader.paths[index], reason)

    def __reduce__(self) -> tuple[type, tuple[object, int, str, str]]:
        return type(self), (self.pack, self.index, self.path, self.reason)  # picklable across worker processes

    @property
    def sample(self) -> SkippedSample:
        """The record a loader keeps when it leaves this image out."""
        return SkippedSample(self.index, self.path, self.reason)


class SkipLog:
    """The unreadable samples a loader has found: every one so far (`bad`) and this epoch's (`skipped`).

    A sample found bad is remembered, so later epochs leave it out without trying it
    again (`drop_known`), yet it is counted in each epoch's `skipped`. The WARNING that
    names it is logged once per loader, not once per epoch.
    """

    def __init__(self, pack: object) -> None:
        self._pack = pack
        self.bad: dict[int, SkippedSample] = {}
        self.skipped: list[SkippedSample] = []

    def new_epoch(self) -> None:
        """Start counting a new epoch (a fresh list: one held from the last epoch stays as it was)."""
        self.skipped = []

    def add(self, sample: SkippedSample) -> None:
        """Record `sample` as unreadable: remembered, counted in this epoch, logged once."""
        if sample.index not in self.bad:
            self.bad[sample.index] = sample
            error = ImageDecodeError(self._pack, sample.index, sample.path, sample.reason)
            log.warning("%s; sample skipped", error)
        self.skipped.append(self.bad[sample.index])

    def drop_known(self, indices: np.ndarray) -> np.ndarray:
        """`indices` without the samples already known bad, which are counted in this epoch."""
        if not self.bad:
            return indices
        known = np.isin(indices, np.fromiter(self.bad, dtype=np.int64, count=len(self.bad)))
        for index in indices[known]:
            self.skipped.append(self.bad[int(index)])
        return indices[~known]

    def known_good(self, batches: Iterator[np.ndarray]) -> Iterator[np.ndarray]:
        """`batches` without the samples already known bad; a batch left empty is dropped."""
        for batch in batches:
            batch = self.drop_known(batch)
            if len(batch):
                yield batch


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
    """The `EpochPlan` for one rank; see its docstring for the rules.

    The arguments are those of a `LoaderRequest`, which has checked them.
    """
    drop_last = train if drop_last is None else drop_last
    split_indices = np.asarray(split_indices, dtype=np.int64)
    if train:
        order = split_indices[np.random.default_rng((seed, epoch)).permutation(len(split_indices))]
        per_rank = samples_per_rank(len(order), train=True, world_size=world_size)
        mine = order[rank * per_rank : (rank + 1) * per_rank]
    else:
        mine = split_indices[rank::world_size]
    return EpochPlan(mine, batch_size, drop_last)


class EpochCursor:
    """The epoch a loader is on, its plan, the batch it starts from, and the spec its batches follow.

    `len()` is a whole epoch's batches, also when resumed mid-epoch.
    """

    def __init__(self, request: LoaderRequest) -> None:
        self._request = request
        self.epoch = 0
        self.start_batch = 0
        self.plan: EpochPlan = self._plan(0)
        self.spec: PipelineSpec = request.spec

    def _plan(self, epoch: int) -> EpochPlan:
        r = self._request
        return plan_epoch(r.split_indices, train=r.train, seed=r.seed, epoch=epoch, batch_size=r.batch_size,
                          rank=r.rank, world_size=r.world_size, drop_last=r.drop_last)

    def set_epoch(self, epoch: int, start_batch: int = 0, image_size: int | None = None) -> None:
        """Move to epoch `epoch`, starting at batch `start_batch` (earlier batches are skipped), at `image_size`
        (None: the size so far)."""
        plan = self._plan(epoch)
        if not 0 <= start_batch <= len(plan):
            raise ValueError(f"start_batch {start_batch} outside 0..{len(plan)}")
        if image_size is not None and image_size != self.spec.image_size:
            self.spec = dataclasses.replace(self.spec, image_size=image_size)
        self.epoch, self.start_batch, self.plan = epoch, start_batch, plan

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


def to_model_input(images: torch.Tensor, spec: PipelineSpec, dtype: torch.dtype,
                   augmentation: BatchAugmentation | None = None) -> torch.Tensor:
    """uint8 N x H x W x C pixels -> N x C x H x W channels_last, normalized, in `dtype`.

    `augmentation` (host tensors, shipped to the images' device without blocking) adds
    the batch's colour jitter before the normalization and its random erasing after it.
    `torch.uint8` returns the pixels in the same layout, not normalized (erased boxes in
    the mean colour). Runs wherever `images` lives, so on a GPU the host ships uint8 and
    the device does the arithmetic.
    """
    nchw = images.permute(0, 3, 1, 2)  # a view: NHWC memory is exactly channels_last NCHW
    if dtype == torch.uint8 and augmentation is None:
        return nchw.contiguous(memory_format=torch.channels_last)
    mean, inv_std = normalization_constants(spec.mean_255, spec.std_255, images.device)
    pixels = nchw.float()
    if augmentation is not None:
        augmentation = augmentation.to(images.device)
        pixels = augmentation.jitter(pixels)
    out = pixels.sub_(mean).mul_(inv_std)  # in place: one full-size float buffer, not two
    if augmentation is not None:
        out = augmentation.erase(out)
    if dtype == torch.uint8:
        out = out.div_(inv_std).add_(mean).round_().clamp_(0, 255)
    return out.to(dtype).contiguous(memory_format=torch.channels_last)


class BatchLoader(abc.ABC):
    """The batch contract every backend honours (see `dali_pipes.build_loader`), and what they share.

    A backend subclass sets `backend` and writes `_batches()`, the epoch's
    `(images, labels)` from `self._remaining()`; the base owns the epoch cursor and the
    skip log.

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

    backend: ClassVar[str]

    def __init__(self, reader: PackReader, request: LoaderRequest) -> None:
        self.request = request
        self.num_classes: int = reader.num_classes
        self._cursor = EpochCursor(request)
        self._skips = SkipLog(reader.path)

    @property
    def spec(self) -> PipelineSpec:
        """The spec the current epoch's batches follow (the request's, at the size `set_epoch` chose)."""
        return self._cursor.spec

    def set_epoch(self, epoch: int, start_batch: int = 0, image_size: int | None = None) -> None:
        """Start epoch `epoch` at batch `start_batch` (resuming mid-epoch; earlier batches are skipped).

        `image_size` makes this epoch's batches that size (progressive resizing); None keeps the size.
        """
        before = self._cursor.spec
        self._cursor.set_epoch(epoch, start_batch, image_size)
        self._skips.new_epoch()
        if self._cursor.spec != before:
            self._spec_changed()

    def _spec_changed(self) -> None:
        """Called after `set_epoch` changed the spec: a backend that built something for the old size rebuilds."""

    @property
    def epoch(self) -> int:
        """The epoch `set_epoch` chose."""
        return self._cursor.epoch

    @property
    def skipped(self) -> list[SkippedSample]:
        """Samples left out so far in the current epoch."""
        return self._skips.skipped

    def __len__(self) -> int:
        """Batches per epoch on this rank (an upper bound once a whole batch was unreadable)."""
        return len(self._cursor.plan)

    @property
    def num_samples(self) -> int:
        """Samples this rank yields in a whole epoch."""
        return self._cursor.plan.num_samples

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self._skips.new_epoch()
        yield from self._batches()

    def _remaining(self) -> Iterator[np.ndarray]:
        """Pack-index batches still to come this epoch, without the samples known bad (counted as skipped)."""
        return self._skips.known_good(self._cursor.batches())

    @abc.abstractmethod
    def _batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The rest of the epoch's `(images, labels)` batches."""

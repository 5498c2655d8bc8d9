"""Loaders over the decoded cache (`cache.DecodedCache`): the torch backend's two paths with the decode taken out.

* "ram": the torch backend's CPU path (`torch_backend.TorchLoader`) whose workers take each
  image from the shared pixels (`DecodedCache.decode`) instead of decoding its JPEG, and
  warp it with the same `geometry` matrix moved onto the cached size. With the cache at
  full size the batches are exactly those of the uncached CPU path.
* "device": each loader copies its rank's samples onto its device (`DeviceImages`): an
  eval shard once, a train shard each epoch when the shard changes (the epoch's shards are
  those of `loader.plan_epoch`, as uncached: with one process it never changes). A batch
  is a gather plus `torch_gpu.transform_images`, the GPU path's batched warp, on the
  cached images and their moved matrices; no worker, no host pixel traffic.

Either way the epoch plan, the per-sample draws, resume and the skip log are the base
loader's (`loader.BatchLoader`), exactly as without a cache.

The cache always uses the torch path, also when `--backend dali` is asked for. Once the
JPEGs are decoded, what DALI does best (nvJPEG and the hardware decoder) has nothing left
to do; what remains is one warp per image, which `transform_images` does as one batched
`grid_sample` on pixels already on the device. DALI would have to take the pixels in
through `external_source`, copying each batch into its own buffers and running a second
prefetch queue beside ours, for the same warp; and a second implementation of the cached
path would have to be kept exactly equal to the first.
"""
from __future__ import annotations

import functools
from typing import Iterator

import numpy as np
import torch

from .augment import batch_augmentation
from .cache import DecodedCache
from .device import host_to_device
from .geometry import on_resized_source, train_matrices
from .loader import BatchLoader, LoaderError, LoaderRequest, to_model_input
from .pack_format import PackReader
from .prefetch import Prefetcher
from .torch_backend import TorchLoader
from .torch_gpu import transform_images

_COPY_CHUNK_BYTES = 256 << 20  # host staging per copy onto the device


class DeviceImages:
    """The cached pixels of some pack samples on one device: one flat uint8 tensor; where each image is, on the host."""

    def __init__(self, cache: DecodedCache, indices: np.ndarray, device: torch.device) -> None:
        self.indices = np.sort(np.asarray(indices, dtype=np.int64))
        slots = cache.plan.slots(self.indices)
        self.heights, self.widths = cache.plan.heights[slots], cache.plan.widths[slots]
        self.offsets = np.zeros(len(slots) + 1, dtype=np.int64)
        np.cumsum(self.heights * self.widths * 3, out=self.offsets[1:])
        self.device = device
        self.flat = torch.empty(int(self.offsets[-1]), dtype=torch.uint8, device=device)
        self._copy_from(cache, slots)
        # Images of one size (aligned faces, say) are one N x h x w x 3 tensor: a batch is one gather.
        self.uniform = len(slots) > 0 and len(np.unique(self.heights)) == 1 and len(np.unique(self.widths)) == 1

    @property
    def nbytes(self) -> int:
        """Bytes held on the device."""
        return int(self.offsets[-1])

    def _copy_from(self, cache: DecodedCache, slots: np.ndarray) -> None:
        starts, ends = cache.plan.offsets[slots], cache.plan.offsets[slots + 1]
        first = 0
        while first < len(slots):
            last = int(np.searchsorted(self.offsets, self.offsets[first] + _COPY_CHUNK_BYTES, side="right")) - 1
            last = min(max(last, first + 1), len(slots))
            staged = np.concatenate([cache.pixels[a:b] for a, b in zip(starts[first:last], ends[first:last])])
            self.flat[self.offsets[first] : self.offsets[last]].copy_(torch.from_numpy(staged))
            first = last

    def images(self, indices: np.ndarray) -> list[torch.Tensor]:
        """Pack `indices` as 3 x h x w uint8 tensors on the device (views; one gather when all share a size)."""
        positions = np.searchsorted(self.indices, indices)
        if self.uniform:
            stack = self.flat.view(-1, int(self.heights[0]), int(self.widths[0]), 3)
            picked = stack.index_select(0, host_to_device(torch.from_numpy(positions), self.device))
            return list(picked.permute(0, 3, 1, 2).unbind(0))
        return [self.flat[self.offsets[p] : self.offsets[p + 1]].view(int(self.heights[p]), int(self.widths[p]), 3)
                .permute(2, 0, 1) for p in positions]


class DeviceCacheLoader(BatchLoader):
    """`BatchLoader` whose batches are gathered from this rank's cached samples on its device (see module)."""

    backend = "torch"

    def __init__(self, reader: PackReader, request: LoaderRequest, cache: DecodedCache) -> None:
        super().__init__(reader, request)
        self._reader, self._cache = reader, cache
        self._held: DeviceImages | None = None

    @property
    def held(self) -> DeviceImages | None:
        """The samples this loader holds on its device (None before the first iteration)."""
        return self._held

    def _batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        held = self._hold(self._cursor.plan.indices)
        # On CUDA, batch k+1 is gathered and warped on a side stream while step k runs.
        yield from Prefetcher(self._remaining(), functools.partial(self._prepare, held), self.request.device)

    def _hold(self, indices: np.ndarray) -> DeviceImages:
        """The epoch's samples of this rank on the device: those held already, or the new shard in their place."""
        wanted = np.sort(indices[~self._cache.bad(indices)])
        if self._held is None or not np.array_equal(self._held.indices, wanted):
            self._held = None  # the last shard's memory goes before the next is allocated
            self._held = DeviceImages(self._cache, wanted, self.request.device)
        return self._held

    def _prepare(self, held: DeviceImages, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor] | None:
        bad = self._cache.bad(indices)
        if bad.any():
            for index in indices[bad]:
                self._skips.add(self._cache.skipped_sample(self._reader, int(index)))
            indices = indices[~bad]
            if len(indices) == 0:
                return None
        request = self.request
        matrices = None
        if request.train:
            heights, widths = self._reader.heights[indices], self._reader.widths[indices]
            slots = self._cache.plan.slots(indices)
            matrices = on_resized_source(train_matrices(self.spec, request.seed, self.epoch, indices, heights, widths),
                                         heights, widths, self._cache.plan.heights[slots],
                                         self._cache.plan.widths[slots])
        pixels = transform_images(held.images(indices), self.spec, matrices)
        labels = host_to_device(torch.from_numpy(self._reader.labels[indices]), request.device)
        augmentation = batch_augmentation(self.spec, request.seed, self.epoch, indices) if request.train else None
        return to_model_input(pixels, self.spec, request.dtype, augmentation), labels


def make_loader(reader: PackReader, request: LoaderRequest, cache: DecodedCache) -> BatchLoader:
    """The loader of `request` over `cache` (its `mode` chooses the path); the cache must hold the whole split."""
    if not np.isin(request.split_indices, cache.plan.indices).all():
        raise LoaderError(f"{reader.path}: the decoded cache does not hold every image of split {request.split!r}")
    if cache.mode == "device":
        return DeviceCacheLoader(reader, request, cache)
    return TorchLoader(reader, request, gpu_decode=False, decode=cache.decode)

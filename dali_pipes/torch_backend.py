"""The `torch` backend: a DataLoader over the pack whose items are whole batches.

Two paths share the sampler, the epoch plan and the per-sample augmentation
(`geometry.train_matrices` and `augment.batch_augmentation`, drawn from (seed, epoch,
index) in the workers, never from a worker's RNG, so batches do not depend on worker
count or scheduling; the sampler hands each batch the epoch's spec, so a new image size
reaches persistent workers too):

- CPU path (any device; `torch_cpu`): workers decode with OpenCV and warp on uint8 into
  one batch in shared memory.
- GPU path (`device.type == "cuda"` and torchvision's nvJPEG decode works; `torch_gpu`):
  workers only gather encoded bytes; the main process decodes and warps the whole batch
  on the device.

On CUDA both paths hand their batches through `prefetch.Prefetcher`: a background
thread copies, decodes, warps and normalizes the next batches on the device's prepare
stream (two ahead) while the training thread runs its steps.

An image that cannot be decoded costs its sample, not the batch: the worker (CPU path)
or the main process (GPU path) leaves its row out and hands back its
`loader.SkippedSample`; the loader records it in its skip log, and the sampler leaves
known-bad samples out of later epochs before any worker sees them.
"""
from __future__ import annotations

import functools
import multiprocessing as mp
import signal
import sys
from contextlib import contextmanager, nullcontext
from typing import Any, Iterator

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .augment import BatchAugmentation, batch_augmentation
from .device import host_to_device
from .geometry import train_matrices
from .loader import BatchLoader, EpochCursor, LoaderRequest, SkipLog, SkippedSample, to_model_input
from .pack_format import PackReader
from .prefetch import Prefetcher
from .spec import PipelineSpec
from .torch_cpu import Decoder, render_batch_cpu
from .torch_gpu import decode_on_device, gpu_decode_works, transform_images

PREFETCH_FACTOR = 4


class _PlanSampler(Sampler):
    """Yields `(epoch, spec, batch pack indices)` for the current epoch from `start_batch` on.

    It runs in the main process, so it is where samples already known bad (`skips`) are
    left out: no worker tries them again. A batch left with no sample is not yielded.
    """

    def __init__(self, cursor: EpochCursor, skips: SkipLog) -> None:
        self.cursor = cursor
        self._skips = skips

    def __iter__(self) -> Iterator[tuple[int, PipelineSpec, np.ndarray]]:
        epoch, spec = self.cursor.epoch, self.cursor.spec
        for batch in self._skips.known_good(self.cursor.batches()):
            yield epoch, spec, batch

    def __len__(self) -> int:
        return max(0, len(self.cursor.plan) - self.cursor.start_batch)


class _PackBatches(Dataset):
    """Items are whole batches: `(epoch, spec, pack indices)` -> what one worker prepares.

    CPU path: `(uint8 N x S x S x 3 pixels, labels, skipped, augmentation)`, the rows of
    undecodable images left out and listed in `skipped`. GPU path: the batch's encoded
    bytes back to back with their offsets, plus indices, warp matrices (None in eval),
    labels and augmentation (decode failures show only on the device, in the main
    process). `augmentation` is the batch's colour jitter and erasing (None in eval).
    """

    def __init__(self, reader: PackReader, *, train: bool, seed: int, bytes_only: bool,
                 decode: Decoder | None = None) -> None:
        self.reader, self.train, self.seed, self.bytes_only = reader, train, seed, bytes_only
        self.decode = decode

    def __getitem__(self, key: tuple[int, PipelineSpec, np.ndarray]) -> tuple[Any, ...]:
        epoch, spec, indices = key
        labels = torch.from_numpy(self.reader.labels[indices])
        matrices = None
        if self.train:
            matrices = train_matrices(spec, self.seed, epoch, indices, self.reader.heights[indices],
                                      self.reader.widths[indices])
        if self.bytes_only:
            data, offsets = self._gather_bytes(indices)
            warps = None if matrices is None else torch.from_numpy(matrices)
            return data, offsets, torch.from_numpy(indices), warps, labels, self._augmentation(spec, epoch, indices)
        pixels, skipped = render_batch_cpu(self.reader, indices, spec, matrices, self.decode)
        if skipped:
            kept = _kept(indices, skipped)
            labels, indices = labels[torch.from_numpy(kept)], indices[kept]
        return pixels, labels, skipped, self._augmentation(spec, epoch, indices)

    def _augmentation(self, spec: PipelineSpec, epoch: int, indices: np.ndarray) -> BatchAugmentation | None:
        return batch_augmentation(spec, self.seed, epoch, indices) if self.train else None

    def _gather_bytes(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        sizes = self.reader.offsets[indices + 1] - self.reader.offsets[indices]
        offsets = np.zeros(len(indices) + 1, dtype=np.int64)
        np.cumsum(sizes, out=offsets[1:])
        data = np.empty(int(offsets[-1]), dtype=np.uint8)
        for j, index in enumerate(indices):
            data[offsets[j] : offsets[j + 1]] = self.reader.image_bytes(int(index))
        return torch.from_numpy(data), torch.from_numpy(offsets)

    def __len__(self) -> int:
        return len(self.reader)


@contextmanager
def _opencv_threads(count: int) -> Iterator[None]:
    """OpenCV's thread count set to `count` inside the block, restored after.

    Workers get one OpenCV thread (parallelism comes from the workers), but they must not
    call `cv2.setNumThreads` themselves: OpenCV's pool does not survive fork, and a child
    resizing a pool its parent had used deadlocks in pthread_cond_destroy. So the parent
    shrinks its own pool while the workers fork, and they inherit the single thread.
    """
    previous = cv2.getNumThreads()
    cv2.setNumThreads(count)
    try:
        yield
    finally:
        cv2.setNumThreads(previous)


def _worker_context() -> str | None:
    """How DataLoader workers start: fork, unless DALI's threads live in this process.

    Forking a process in which DALI pipelines have run sometimes left a worker hung
    (seen in the test suite, cause not found); forkserver children start from a clean
    process instead, at the cost of about a second per worker at the first epoch.
    """
    if sys.modules.get("nvidia.dali") is not None and "forkserver" in mp.get_all_start_methods():
        return "forkserver"
    return None


def _init_worker(worker_id: int, fresh_process: bool) -> None:
    # Ctrl-C reaches the whole process group; the main process decides when to stop
    # (after the current step), so workers must not die of it first.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if fresh_process:
        cv2.setNumThreads(1)  # safe only where OpenCV's pool was never used (see _opencv_threads)


def _kept(indices: np.ndarray, skipped: list[SkippedSample]) -> np.ndarray:
    """Mask of `indices` not in `skipped`."""
    return ~np.isin(indices, [sample.index for sample in skipped])


class TorchLoader(BatchLoader):
    """DataLoader-backed `BatchLoader` (see the module docstring for its two paths)."""

    backend = "torch"

    def __init__(self, reader: PackReader, request: LoaderRequest, gpu_decode: bool,
                 decode: Decoder | None = None) -> None:
        """`decode` (CPU path) gets each image: the pack's JPEG decoded (None), or the decoded cache's pixels."""
        super().__init__(reader, request)
        self.device, self.dtype = request.device, request.dtype
        self.gpu_decode = gpu_decode
        self._reader = reader
        self._num_workers = request.num_workers
        # The sampler holds the cursor and the skip log, not the loader: no reference cycle
        # keeps the persistent workers alive after the loader is dropped.
        self._sampler = _PlanSampler(self._cursor, self._skips)
        self._dataset = _PackBatches(reader, train=request.train, seed=request.seed, bytes_only=gpu_decode,
                                     decode=decode)
        self._loader: DataLoader | None = None

    def _data_loader(self) -> DataLoader:
        # Made on first use and kept, so persistent workers survive from epoch to epoch.
        if self._loader is None:
            workers = self._num_workers
            context = _worker_context() if workers > 0 else None
            self._loader = DataLoader(
                self._dataset, batch_size=None, sampler=self._sampler, num_workers=workers,
                persistent_workers=workers > 0, prefetch_factor=PREFETCH_FACTOR if workers > 0 else None,
                pin_memory=self.device.type == "cuda" and not self.gpu_decode,
                multiprocessing_context=context,
                worker_init_fn=functools.partial(_init_worker, fresh_process=context is not None),
                # A private generator: iterating never draws from torch's global RNG, so a run
                # resumed mid-epoch keeps the same dropout stream as an uninterrupted one.
                generator=torch.Generator().manual_seed(0))
        return self._loader

    def _batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        finish = self._finish_gpu if self.gpu_decode else self._finish_cpu
        # The first iter() forks the (persistent) workers.
        with _opencv_threads(1) if self._num_workers > 0 else nullcontext():
            items = iter(self._data_loader())
        # On CUDA, a background thread prepares the next batches while the steps run;
        # finish() returns None when every sample of a batch was unreadable.
        yield from Prefetcher(items, finish, self.device)

    def _record(self, skipped: list[SkippedSample]) -> None:
        for sample in skipped:
            self._skips.add(sample)

    def _finish_cpu(self, item: tuple[Any, ...]) -> tuple[torch.Tensor, torch.Tensor] | None:
        pixels, labels, skipped, augmentation = item
        self._record(skipped)
        if len(labels) == 0:
            return None
        pixels = host_to_device(pixels, self.device)
        return to_model_input(pixels, self.spec, self.dtype, augmentation), host_to_device(labels, self.device)

    def _finish_gpu(self, item: tuple[Any, ...]) -> tuple[torch.Tensor, torch.Tensor] | None:
        data, offsets, indices, matrices, labels, augmentation = item
        bounds = offsets.tolist()
        encoded = [data[bounds[j] : bounds[j + 1]] for j in range(len(bounds) - 1)]
        images, skipped = decode_on_device(self._reader, indices.numpy(), encoded, self.device)
        if skipped:
            self._record(skipped)
            good = _kept(indices.numpy(), skipped)
            if not good.any():
                return None
            labels = labels[torch.from_numpy(good)]
            matrices = None if matrices is None else matrices[torch.from_numpy(good)]
            augmentation = None if augmentation is None else augmentation.select(good)
        pixels = transform_images(images, self.spec, None if matrices is None else matrices.numpy())
        return to_model_input(pixels, self.spec, self.dtype, augmentation), host_to_device(labels, self.device)


def make_loader(reader: PackReader, request: LoaderRequest) -> TorchLoader:
    """Backend entry point (see `backends.BACKENDS`)."""
    gpu_decode = gpu_decode_works(reader, int(request.split_indices[0]), request.device)
    return TorchLoader(reader, request, gpu_decode)

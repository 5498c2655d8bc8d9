"""The `torch` backend: a DataLoader over the pack whose items are whole batches.

Two paths share the sampler, the epoch plan and the augmentation draws:

- CPU path (any device): workers decode each JPEG with OpenCV (libjpeg-turbo) and do the
  geometry on uint8 into one N x S x S x 3 batch in shared memory. Train: one
  `cv2.warpAffine` per image with the matrix of `spec.affine_matrix` (resize, flip and
  rotation together); eval: `inputs.resize_cpu`, torchvision's antialiased resize (PIL's
  BILINEAR filter), the same function `dali_pipes.preprocess` applies to single files.
  The host ships uint8; `base.to_model_input` normalizes wherever the batch lands.
- GPU path (`device.type == "cuda"` and torchvision's nvJPEG decode works): workers only
  gather encoded bytes; the main process decodes the batch on the GPU and does the same
  geometry there with `affine_grid`/`grid_sample` (train) or `interpolate` (eval).

Flip and angle come from `spec.sample_augmentation(spec, seed, epoch, indices)`, never
from a worker's RNG, so batches do not depend on worker count or scheduling.

An image that cannot be decoded costs its sample, not the batch: the worker (CPU path)
or the main process (GPU path) leaves its row out and hands back its `base.SkippedSample`;
the loader records it in its skip log, and the sampler leaves known-bad samples out of
later epochs before any worker sees them.
"""
from __future__ import annotations

import functools
import logging
import math
import multiprocessing as mp
import re
import signal
import sys
from contextlib import contextmanager, nullcontext
from typing import Any, Iterator

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from .base import BatchLoader, EpochCursor, ImageDecodeError, LoaderRequest, SkipLog, SkippedSample, to_model_input
from .inputs import resize_cpu
from .pack import PackReader
from .spec import PipelineSpec, affine_matrix, sample_augmentation

log = logging.getLogger("dali_pipes")

PREFETCH_FACTOR = 4
_CV2_INTERPOLATION = {"linear": cv2.INTER_LINEAR, "cubic": cv2.INTER_CUBIC, "nearest": cv2.INTER_NEAREST}
_TORCH_MODE = {"linear": "bilinear", "cubic": "bicubic", "nearest": "nearest"}
# OpenCV >= 4.10 can hand out RGB directly; older builds decode BGR and we convert.
_IMREAD_RGB = getattr(cv2, "IMREAD_COLOR_RGB", None)


def _decode_error(reader: PackReader, index: int, reason: str) -> ImageDecodeError:
    return ImageDecodeError(reader.path, index, reader.paths[index], reason)


def _torchvision_reason(exc: Exception) -> str:
    """The first line of a torchvision decode error, without its "decode_jpeg, /source/file.cpp:171, " prefix."""
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return re.sub(r"^\w+, \S+:\d+, ", "", text) or text


# ---------------------------------------------------------------------------- geometry (pure)

def opencv_matrix(matrix: np.ndarray) -> np.ndarray:
    """`spec.affine_matrix` (pixel centres at +0.5) in OpenCV's convention (centres at integers).

    That is T(-0.5) @ M @ T(+0.5), written out: the linear part stays, the translation
    gains A @ (0.5, 0.5) - 0.5 (a 3x3 product per image costs more than the warp's setup).
    """
    out = np.array(matrix, dtype=np.float64)
    out[:, 2] += 0.5 * (out[:, 0] + out[:, 1]) - 0.5
    return out


def grid_theta(height: int, width: int, size: int, flip: bool, angle: float) -> np.ndarray:
    """2x3 `F.affine_grid` matrix (output -> source, normalized coordinates) for one image.

    affine_grid with align_corners=False normalizes continuous coordinates (corners at 0
    and the side length) to [-1, 1], which is the spec's convention up to that scaling.
    """
    inverse = np.linalg.inv(np.vstack([affine_matrix(height, width, size, flip, angle), [0.0, 0.0, 1.0]]))
    from_output = np.array([[size / 2.0, 0.0, size / 2.0], [0.0, size / 2.0, size / 2.0], [0.0, 0.0, 1.0]])
    to_source = np.array([[2.0 / width, 0.0, -1.0], [0.0, 2.0 / height, -1.0], [0.0, 0.0, 1.0]])
    return (to_source @ inverse @ from_output)[:2]


def _prefilter_size(height: int, width: int, size: int) -> tuple[int, int]:
    """Where `train_antialias` first shrinks an image to: no side larger than `size`."""
    return min(height, size), min(width, size)


# ---------------------------------------------------------------------------- CPU path

def decode_image(reader: PackReader, index: int, channels: int) -> np.ndarray:
    """Image `index` of `reader` as H x W x `channels` uint8 (RGB, or RGBA with opaque alpha).

    OpenCV decodes; when it refuses, torchvision tries too (and gives the reason), so a
    decoder quirk does not lose an image and a truly corrupt one fails with its name.
    """
    data = reader.image_bytes(index)
    if channels == 3 and _IMREAD_RGB is not None:
        image = cv2.imdecode(data, _IMREAD_RGB)
    else:
        bgr = cv2.imdecode(data, cv2.IMREAD_COLOR)
        # The colour conversion is needed anyway (RGBA warps twice as fast), so BGR costs nothing.
        image = None if bgr is None else cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB if channels == 3 else cv2.COLOR_BGR2RGBA)
    if image is None:
        image = _decode_torchvision(reader, index, channels)
    if image.shape[:2] != (reader.heights[index], reader.widths[index]):
        raise _decode_error(reader, index, f"decoded {image.shape[1]}x{image.shape[0]}, pack records "
                                           f"{reader.widths[index]}x{reader.heights[index]}")
    return image


def _decode_torchvision(reader: PackReader, index: int, channels: int) -> np.ndarray:
    try:
        from torchvision.io import ImageReadMode, decode_jpeg

        chw = decode_jpeg(torch.from_numpy(np.array(reader.image_bytes(index))), mode=ImageReadMode.RGB)
    except (RuntimeError, ValueError, ImportError) as exc:
        raise _decode_error(reader, index, _torchvision_reason(exc)) from None
    rgb = np.ascontiguousarray(chw.permute(1, 2, 0).numpy())
    return rgb if channels == 3 else cv2.cvtColor(rgb, cv2.COLOR_RGB2RGBA)


def warp_cpu(image: np.ndarray, spec: PipelineSpec, flip: bool, angle: float, out: np.ndarray) -> None:
    """Train geometry of one decoded image into `out` (S x S x channels), one bilinear warp."""
    size = spec.image_size
    if spec.train_antialias:
        h, w = _prefilter_size(*image.shape[:2], size)
        if (h, w) != image.shape[:2]:
            image = cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA)
    matrix = opencv_matrix(affine_matrix(image.shape[0], image.shape[1], size, flip, angle))
    border = (spec.fill, spec.fill, spec.fill, 255)
    cv2.warpAffine(image, matrix, (size, size), dst=out, flags=_CV2_INTERPOLATION[spec.interpolation],
                   borderMode=cv2.BORDER_CONSTANT, borderValue=border)


def _batch_buffer(shape: tuple[int, ...]) -> torch.Tensor:
    if get_worker_info() is not None and hasattr(torch.UntypedStorage, "_new_shared"):
        # As default_collate does: allocate in shared memory, so handing the batch to the
        # main process moves a file descriptor instead of copying the pixels.
        storage = torch.UntypedStorage._new_shared(math.prod(shape))
        return torch.empty(0, dtype=torch.uint8).set_(storage).view(shape)
    return torch.empty(shape, dtype=torch.uint8)


def render_batch_cpu(reader: PackReader, indices: np.ndarray, spec: PipelineSpec, train: bool,
                     flips: np.ndarray, angles: np.ndarray) -> tuple[torch.Tensor, list[SkippedSample]]:
    """Decode and transform pack images `indices` into one N x S x S x 3 uint8 tensor, and the samples left out.

    An image that cannot be decoded loses its row (the good rows keep their order, so
    the tensor then has fewer than len(indices) rows) and is listed as a `SkippedSample`.
    Workers hand these back as values: raising there would fail the whole batch, reach
    the user wrapped in DataLoader's "Caught ... in worker" text, and leave persistent
    workers' shutdown to the GC (a 5 s join).
    """
    size = spec.image_size
    batch = _batch_buffer((len(indices), size, size, 3))
    pixels = batch.numpy()
    # OpenCV's 4-channel warp is vectorized and ~2.5x faster than its 3-channel one.
    rgba = np.empty((size, size, 4), dtype=np.uint8)
    skipped: list[SkippedSample] = []
    row = 0
    for j, index in enumerate(indices):
        try:
            image = decode_image(reader, int(index), 4 if train else 3)
        except ImageDecodeError as exc:
            skipped.append(exc.sample)
            continue
        if train:
            warp_cpu(image, spec, bool(flips[j]), float(angles[j]), rgba)
            cv2.cvtColor(rgba, cv2.COLOR_RGBA2RGB, dst=pixels[row])
        else:
            resize_cpu(image, spec, batch[row])
        row += 1
    return (batch if row == len(indices) else batch[:row]), skipped


# ---------------------------------------------------------------------------- GPU path

def transform_images(images: list[torch.Tensor], spec: PipelineSpec, train: bool, flips: np.ndarray,
                     angles: np.ndarray) -> torch.Tensor:
    """Decoded 3 x H x W uint8 images (any device) -> N x S x S x 3 uint8 on that device.

    The GPU path's geometry, written with torch ops only, so it also runs (and is
    tested) on the CPU.
    """
    size = spec.image_size
    device = images[0].device
    batch = torch.empty((len(images), size, size, 3), dtype=torch.uint8, device=device)
    thetas = None
    if train:
        # All matrices in one host-to-device copy.
        thetas = torch.from_numpy(np.stack([grid_theta(*_train_source_size(im, spec), size, bool(f), float(a))
                                            for im, f, a in zip(images, flips, angles)])).to(device, torch.float32)
    for j, image in enumerate(images):
        pixels = image[None].float()
        if thetas is not None:
            result = _warp_torch(pixels, thetas[j : j + 1], spec)
        else:
            result = _resize_torch(pixels, (size, size), spec.interpolation, spec.eval_antialias)
        batch[j] = result[0].round_().clamp_(0, 255).permute(1, 2, 0).to(torch.uint8)
    return batch


def _train_source_size(image: torch.Tensor, spec: PipelineSpec) -> tuple[int, int]:
    h, w = image.shape[-2:]
    return _prefilter_size(h, w, spec.image_size) if spec.train_antialias else (h, w)


def _resize_torch(pixels: torch.Tensor, size: tuple[int, int], interpolation: str, antialias: bool) -> torch.Tensor:
    mode = _TORCH_MODE[interpolation]
    if mode == "nearest":
        return F.interpolate(pixels, size=size, mode=mode)
    return F.interpolate(pixels, size=size, mode=mode, antialias=antialias, align_corners=False)


def _warp_torch(pixels: torch.Tensor, theta: torch.Tensor, spec: PipelineSpec) -> torch.Tensor:
    if spec.train_antialias:
        target = _prefilter_size(pixels.shape[-2], pixels.shape[-1], spec.image_size)
        if target != tuple(pixels.shape[-2:]):
            pixels = _resize_torch(pixels, target, "linear", antialias=True)
    size = spec.image_size
    grid = F.affine_grid(theta, [1, 3, size, size], align_corners=False)
    # Zero padding around (image - fill), plus fill, is a constant border of `fill`
    # blended exactly as OpenCV's BORDER_CONSTANT blends it.
    warped = F.grid_sample(pixels - spec.fill, grid, mode=_TORCH_MODE[spec.interpolation], padding_mode="zeros",
                           align_corners=False)
    return warped + spec.fill


def decode_on_device(reader: PackReader, indices: np.ndarray, encoded: list[torch.Tensor],
                     device: torch.device) -> tuple[list[torch.Tensor], list[SkippedSample]]:
    """Batched nvJPEG decode of `encoded` to 3 x H x W uint8 on `device`, and the samples left out.

    Each image that cannot be decoded is left out of the result (good ones in order)
    and listed as a `SkippedSample` naming it and torchvision's reason.
    """
    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        return decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device), []
    except RuntimeError:
        pass
    # The batched call does not say which image failed: find them one by one.
    good, skipped = [], []
    for index, data in zip(indices, encoded):
        try:
            decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
        except RuntimeError as exc:
            skipped.append(_decode_error(reader, int(index), _torchvision_reason(exc)).sample)
            continue
        good.append(data)
    return (decode_jpeg(good, mode=ImageReadMode.RGB, device=device) if good else []), skipped


def gpu_decode_works(reader: PackReader, index: int, device: torch.device) -> bool:
    """Whether torchvision can decode image `index` on `device` (nvJPEG present and working)."""
    if device.type != "cuda":
        return False
    try:
        from torchvision.io import ImageReadMode, decode_jpeg

        decode_jpeg([torch.from_numpy(np.array(reader.image_bytes(index)))], mode=ImageReadMode.RGB, device=device)
    except (ImportError, RuntimeError, TypeError, ValueError) as exc:
        log.warning("torch backend: GPU JPEG decoding unavailable (%s); decoding in DataLoader workers instead",
                    str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return False
    return True


# ---------------------------------------------------------------------------- the loader

class _PlanSampler(Sampler):
    """Yields `(epoch, batch pack indices)` for the current epoch from `start_batch` on.

    It runs in the main process, so it is where samples already known bad (`skips`) are
    left out: no worker tries them again. A batch left with no sample is not yielded.
    """

    def __init__(self, cursor: EpochCursor, skips: SkipLog) -> None:
        self.cursor = cursor
        self._skips = skips

    def __iter__(self) -> Iterator[tuple[int, np.ndarray]]:
        epoch = self.cursor.epoch
        for batch in self._skips.known_good(self.cursor.batches()):
            yield epoch, batch

    def __len__(self) -> int:
        return max(0, len(self.cursor.plan) - self.cursor.start_batch)


class _PackBatches(Dataset):
    """Items are whole batches: `(epoch, pack indices)` -> what one worker prepares.

    CPU path: `(uint8 N x S x S x 3 pixels, labels, skipped)`, the rows of undecodable
    images left out and listed in `skipped`. GPU path: the batch's
    encoded bytes back to back with their offsets, plus indices, flips, angles and labels
    (decode failures show only on the device, in the main process).
    """

    def __init__(self, reader: PackReader, spec: PipelineSpec, *, train: bool, seed: int, bytes_only: bool) -> None:
        self.reader, self.spec, self.train, self.seed, self.bytes_only = reader, spec, train, seed, bytes_only

    def __getitem__(self, key: tuple[int, np.ndarray]) -> tuple[Any, ...]:
        epoch, indices = key
        labels = torch.from_numpy(self.reader.labels[indices])
        if self.train:
            flips, angles = sample_augmentation(self.spec, self.seed, epoch, indices)
        else:
            flips, angles = np.zeros(len(indices), dtype=bool), np.zeros(len(indices), dtype=np.float32)
        if self.bytes_only:
            data, offsets = self._gather_bytes(indices)
            return data, offsets, torch.from_numpy(indices), torch.from_numpy(flips), torch.from_numpy(angles), labels
        pixels, skipped = render_batch_cpu(self.reader, indices, self.spec, self.train, flips, angles)
        if skipped:
            labels = labels[torch.from_numpy(_kept(indices, skipped))]
        return pixels, labels, skipped

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

    def __init__(self, reader: PackReader, request: LoaderRequest, gpu_decode: bool) -> None:
        super().__init__(reader, request)
        self.device, self.dtype, self.train = request.device, request.dtype, request.train
        self.gpu_decode = gpu_decode
        self._reader = reader
        self._num_workers = request.num_workers
        # The sampler holds the cursor and the skip log, not the loader: no reference cycle
        # keeps the persistent workers alive after the loader is dropped.
        self._sampler = _PlanSampler(self._cursor, self._skips)
        self._dataset = _PackBatches(reader, request.spec, train=request.train, seed=request.seed, bytes_only=gpu_decode)
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
                multiprocessing_context=context, worker_init_fn=functools.partial(_init_worker, fresh_process=context is not None),
                # A private generator: iterating never draws from torch's global RNG, so a run
                # resumed mid-epoch keeps the same dropout stream as an uninterrupted one.
                generator=torch.Generator().manual_seed(0))
        return self._loader

    def _batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        finish = self._finish_gpu if self.gpu_decode else self._finish_cpu
        # The first iter() forks the (persistent) workers.
        with _opencv_threads(1) if self._num_workers > 0 else nullcontext():
            items = iter(self._data_loader())
        for item in items:
            batch = finish(item)
            if batch is not None:  # None: every sample of the batch was unreadable
                yield batch

    def _record(self, skipped: list[SkippedSample]) -> None:
        for sample in skipped:
            self._skips.add(sample)

    def _finish_cpu(self, item: tuple[Any, ...]) -> tuple[torch.Tensor, torch.Tensor] | None:
        pixels, labels, skipped = item
        self._record(skipped)
        if len(labels) == 0:
            return None
        pixels = pixels.to(self.device, non_blocking=True)
        return to_model_input(pixels, self.spec, self.dtype), labels.to(self.device, non_blocking=True)

    def _finish_gpu(self, item: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor] | None:
        data, offsets, indices, flips, angles, labels = item
        bounds = offsets.tolist()
        encoded = [data[bounds[j] : bounds[j + 1]] for j in range(len(bounds) - 1)]
        images, skipped = decode_on_device(self._reader, indices.numpy(), encoded, self.device)
        flips, angles = flips.numpy(), angles.numpy()
        if skipped:
            self._record(skipped)
            good = _kept(indices.numpy(), skipped)
            if not good.any():
                return None
            flips, angles, labels = flips[good], angles[good], labels[torch.from_numpy(good)]
        pixels = transform_images(images, self.spec, self.train, flips, angles)
        return to_model_input(pixels, self.spec, self.dtype), labels.to(self.device, non_blocking=True)


def make_loader(reader: PackReader, request: LoaderRequest) -> TorchLoader:
    """Backend entry point (see `dali_pipes.loader.BACKENDS`)."""
    gpu_decode = gpu_decode_works(reader, int(request.split_indices[0]), request.device)
    return TorchLoader(reader, request, gpu_decode)

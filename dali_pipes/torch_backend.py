"""The `torch` backend: a DataLoader over the pack whose items are whole batches.

Two paths share the sampler, the epoch plan and the augmentation draws:

- CPU path (any device): workers decode each JPEG with OpenCV (libjpeg-turbo) and do the
  geometry on uint8 into one N x S x S x 3 batch in shared memory. Train: one
  `cv2.warpAffine` per image with the matrix of `spec.affine_matrix` (resize, flip and
  rotation together); eval: `inputs.resize_cpu`, torchvision's antialiased resize (PIL's
  BILINEAR filter), the same function `dali_pipes.preprocess` applies to single files.
  The host ships uint8; `base.to_model_input` normalizes wherever the batch lands.
- GPU path (`device.type == "cuda"` and torchvision's nvJPEG decode works): workers only
  gather encoded bytes; the main process decodes the batch on the GPU (one nvJPEG call on
  a stream of its own, see `_decode_jpegs`) and does the same geometry there for the
  whole batch at once: one `affine_grid` + `grid_sample` over the images padded to one
  canvas (train) or one `interpolate` per image size (eval). The same functions run on
  CPU tensors, which is how CI tests them.

On CUDA both paths hand their batches through `prefetch.Prefetcher`: batch k+1 is
copied, decoded, warped and normalized on a side stream while step k runs.

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
import warnings
from contextlib import contextmanager, nullcontext
from typing import Any, Iterator

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from .base import BatchLoader, EpochCursor, ImageDecodeError, LoaderRequest, SkipLog, SkippedSample, to_model_input
from .device import decode_stream, hand_over, host_to_device, ready_marker
from .inputs import resize_cpu
from .pack import PackReader
from .prefetch import Prefetcher
from .spec import PipelineSpec, affine_matrices, affine_matrix, sample_augmentation

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
    """2x3 `F.affine_grid` matrix (output -> source, normalized coordinates) for one image."""
    return grid_thetas(np.array([height]), np.array([width]), size, np.array([flip]), np.array([angle]))[0]


def grid_thetas(heights: np.ndarray, widths: np.ndarray, size: int, flips: np.ndarray, angles: np.ndarray,
                canvas: tuple[int, int] | None = None) -> np.ndarray:
    """N x 2 x 3 `F.affine_grid` matrices (output -> source, normalized) for a batch, no per-image Python.

    affine_grid with align_corners=False normalizes continuous coordinates (corners at 0
    and the side length) to [-1, 1], which is the spec's convention up to that scaling.
    Image j lies in the top-left corner of a `canvas` (height, width) shared by the batch
    (default: its own size), so source coordinates are normalized by the canvas: the
    padding is folded into each matrix and one `grid_sample` serves the whole batch.
    """
    forward = affine_matrices(heights, widths, size, flips, angles)
    # The inverse of [[a, b, tx], [c, d, ty]] in closed form (no 3x3 inverse per image).
    a, b, c, d = forward[:, 0, 0], forward[:, 0, 1], forward[:, 1, 0], forward[:, 1, 1]
    det = a * d - b * c
    linear = np.stack([np.stack([d, -b], -1), np.stack([-c, a], -1)], 1) / det[:, None, None]  # N x 2 x 2
    translation = -np.einsum("nij,nj->ni", linear, forward[:, :, 2])
    source = np.stack([np.asarray(widths, np.float64), np.asarray(heights, np.float64)], -1) if canvas is None \
        else np.broadcast_to(np.array([canvas[1], canvas[0]], np.float64), (len(forward), 2))
    half = size / 2.0
    # output normalized u -> pixel (u + 1) * half -> source pixel -> source normalized 2 p / side - 1.
    scale = (2.0 / source)[:, :, None]
    theta = np.empty((len(forward), 2, 3), dtype=np.float64)
    theta[:, :, :2] = scale * linear * half
    theta[:, :, 2] = scale[:, :, 0] * (linear.sum(-1) * half + translation) - 1.0
    return theta


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

    The GPU path's geometry, written with torch ops only, so it also runs (and is tested)
    on the CPU. Train: the images are padded into one canvas and warped by one batched
    `affine_grid` + `grid_sample`; eval: one `interpolate` per distinct image size.
    """
    if train:
        if spec.train_antialias:
            images = _prefilter(images, spec.image_size)
        pixels = _warp_torch(images, flips, angles, spec)
    else:
        pixels = _resize_torch_batch(images, spec)
    # Rounded like the CPU path's uint8 output; NHWC memory is what `to_model_input` expects.
    return pixels.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def _by_shape(images: list[torch.Tensor]) -> dict[tuple[int, ...], list[int]]:
    """Positions of the images of each distinct shape (datasets often have one or a few)."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for j, image in enumerate(images):
        groups.setdefault(tuple(image.shape), []).append(j)
    return groups


def _resize_torch(pixels: torch.Tensor, size: tuple[int, int], interpolation: str, antialias: bool) -> torch.Tensor:
    mode = _TORCH_MODE[interpolation]
    if mode == "nearest":
        return F.interpolate(pixels, size=size, mode=mode)
    return F.interpolate(pixels, size=size, mode=mode, antialias=antialias, align_corners=False)


def _resize_torch_batch(images: list[torch.Tensor], spec: PipelineSpec) -> torch.Tensor:
    """Eval geometry: every image resized to S x S (float N x 3 x S x S), one call per image size."""
    size = spec.image_size
    out = torch.empty((len(images), 3, size, size), dtype=torch.float32, device=images[0].device)
    for shape, rows in _by_shape(images).items():
        group = torch.stack([images[j] for j in rows]).float()
        resized = _resize_torch(group, (size, size), spec.interpolation, spec.eval_antialias)
        if len(rows) == len(images):
            return resized
        # index_copy_ with a pinned index: indexing with a Python list would copy it to the device synchronously.
        out.index_copy_(0, host_to_device(torch.tensor(rows), out.device), resized)
    return out


def _prefilter(images: list[torch.Tensor], size: int) -> list[torch.Tensor]:
    """`train_antialias`: images larger than `size` first shrunk with antialiasing (float, not rounded)."""
    out = [image.float() for image in images]
    for shape, rows in _by_shape(images).items():
        target = _prefilter_size(shape[-2], shape[-1], size)
        if target != tuple(shape[-2:]):
            group = _resize_torch(torch.stack([images[j] for j in rows]).float(), target, "linear", antialias=True)
            for j, image in zip(rows, group):
                out[j] = image
    return out


def _canvas(images: list[torch.Tensor], fill: int) -> torch.Tensor:
    """The images in the top-left corners of one N x 3 x Hmax x Wmax float tensor, minus `fill`.

    The padding is 0 there, exactly what `grid_sample`'s zero padding reads outside an
    image, so sampling the canvas equals sampling each image on its own. Images of
    different sizes are padded by a nested tensor: a few kernels for the whole batch
    (float is the dtype with a fused padding kernel on CUDA), not one copy per image.
    """
    if all(image.shape == images[0].shape for image in images):
        canvas = torch.stack(images).float()  # one kernel: the usual case
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "nested tensors are in prototype stage"
            canvas = torch.nested.nested_tensor(images).float().to_padded_tensor(float(fill))
    return canvas.sub_(fill) if fill else canvas


def _warp_torch(images: list[torch.Tensor], flips: np.ndarray, angles: np.ndarray, spec: PipelineSpec) -> torch.Tensor:
    """Train geometry of the whole batch: one `affine_grid` + `grid_sample` (float N x 3 x S x S)."""
    size = spec.image_size
    canvas = _canvas(images, spec.fill)
    heights = np.array([image.shape[-2] for image in images])
    widths = np.array([image.shape[-1] for image in images])
    thetas = grid_thetas(heights, widths, size, flips, angles, canvas=tuple(canvas.shape[-2:]))
    # All matrices in one pinned, non-blocking host-to-device copy.
    theta = host_to_device(torch.from_numpy(thetas.astype(np.float32)), canvas.device)
    grid = F.affine_grid(theta, [len(images), 3, size, size], align_corners=False)
    # Zero padding around (image - fill), plus fill, is a constant border of `fill`
    # blended exactly as OpenCV's BORDER_CONSTANT blends it.
    warped = F.grid_sample(canvas, grid, mode=_TORCH_MODE[spec.interpolation], padding_mode="zeros", align_corners=False)
    return warped.add_(spec.fill)


def _decode_jpegs(encoded: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """torchvision's batched `decode_jpeg` to `device`; on CUDA, safe for the memory it writes.

    torchvision allocates the outputs on the caller's current stream, then has nvJPEG
    write them from a stream of its own that does not wait for the current one (and
    nvJPEG's hardware engine ignores stream order anyway). The caching allocator hands a
    stream any block freed on that stream at once, trusting stream order, so decoding
    on the training stream could be given a block autograd has just freed while queued
    kernels still read it. So the decode runs with a dedicated stream current, on which
    nothing but these outputs is ever allocated: only blocks freed there can come back to
    the decoder, and every output is `record_stream`-ed on the consumer (`hand_over`),
    so its block returns only after the consumer's kernels using it have finished. That
    holds whatever stream the decoder writes from: correct by construction, not by
    timing. The decode stream first waits on the consumer, so any work torchvision does
    queue on the current stream is ordered after what the consumer queued before.
    """
    from torchvision.io import ImageReadMode, decode_jpeg

    if device.type != "cuda":
        return decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)
    stream = decode_stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        images = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)
    hand_over(images, ready_marker(stream))
    return images


def decode_on_device(reader: PackReader, indices: np.ndarray, encoded: list[torch.Tensor],
                     device: torch.device) -> tuple[list[torch.Tensor], list[SkippedSample]]:
    """Batched decode of `encoded` to 3 x H x W uint8 on `device` (nvJPEG on CUDA), and the samples left out.

    Each image that cannot be decoded is left out of the result (good ones in order)
    and listed as a `SkippedSample` naming it and torchvision's reason. On the CPU this
    is torchvision's CPU decoder, so the whole path runs in CI.
    """
    try:
        return _decode_jpegs(encoded, device), []
    except RuntimeError:
        pass
    # The batched call does not say which image failed: find them one by one.
    good, skipped = [], []
    for index, data in zip(indices, encoded):
        try:
            _decode_jpegs([data], device)
        except RuntimeError as exc:
            skipped.append(_decode_error(reader, int(index), _torchvision_reason(exc)).sample)
            continue
        good.append(data)
    return (_decode_jpegs(good, device) if good else []), skipped


def gpu_decode_works(reader: PackReader, index: int, device: torch.device) -> bool:
    """Whether torchvision can decode image `index` on `device` (nvJPEG present and working)."""
    if device.type != "cuda":
        return False
    try:
        _decode_jpegs([torch.from_numpy(np.array(reader.image_bytes(index)))], device)
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
        # On CUDA, batch k+1 is prepared on a side stream while step k runs; finish()
        # returns None when every sample of a batch was unreadable.
        yield from Prefetcher(items, finish, self.device)

    def _record(self, skipped: list[SkippedSample]) -> None:
        for sample in skipped:
            self._skips.add(sample)

    def _finish_cpu(self, item: tuple[Any, ...]) -> tuple[torch.Tensor, torch.Tensor] | None:
        pixels, labels, skipped = item
        self._record(skipped)
        if len(labels) == 0:
            return None
        pixels = host_to_device(pixels, self.device)
        return to_model_input(pixels, self.spec, self.dtype), host_to_device(labels, self.device)

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
        return to_model_input(pixels, self.spec, self.dtype), host_to_device(labels, self.device)


def make_loader(reader: PackReader, request: LoaderRequest) -> TorchLoader:
    """Backend entry point (see `dali_pipes.loader.BACKENDS`)."""
    gpu_decode = gpu_decode_works(reader, int(request.split_indices[0]), request.device)
    return TorchLoader(reader, request, gpu_decode)

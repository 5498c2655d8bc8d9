"""The decoded cache: every image of a set of pack samples decoded once and kept as uint8 pixels in shared memory.

What is stored (`plan_cache`, `CachePlan`): each image area-averaged (OpenCV's
INTER_AREA) so that its short side is at most `size`, aspect ratio kept, never enlarged,
as H x W x 3 RGB uint8, back to back. The short side, not the long one: the training
warp stretches each axis of the image onto the output on its own (the aspect ratio is
not kept), so each axis needs `size` pixels; bounding the long side would starve the
short axis of an elongated image. The training matrices are made for the stored image
size and moved onto the cached size with `geometry.on_resized_source`, so a cached epoch
draws the same crops, flips and angles as an uncached one; with `size` at least the
stored sides the pixels are exactly the decoded ones.

Where it lives (`DecodedCache`): one file in `cache_dir()` (/dev/shm), memory-mapped by
every process that reads it: the processes of one node and their DataLoader workers share
one copy. The file is created under a name every process of the node can compute, opened
by each of them, and unlinked as soon as all have it open (the run does that, see
`trainer.run_cache`); from then on the pages belong to the open descriptors and maps, and
the kernel frees them when the last holder exits, also after kill -9. DataLoader workers
inherit the map (fork) or receive a duplicate of the descriptor when they start
(forkserver, spawn: `multiprocessing.reduction.DupFd`, as multiprocessing's own shared
heap passes its arenas).

Filling (`DecodedCache.fill`): threads, since OpenCV's decode and resize release the GIL;
several processes may fill disjoint slots of one file. An image that cannot be decoded
gets a bad status byte and is recorded as the `SkippedSample` the loaders record
(`torch_cpu.decode_image` raises the same `ImageDecodeError`); `DecodedCache.decode`
decodes such an image again when a loader asks for it, so a loader meets the same error
at the same point of the epoch as without a cache.
"""
from __future__ import annotations

import errno
import mmap
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from multiprocessing.reduction import DupFd
from pathlib import Path
from typing import Any, Callable, Sequence

import cv2
import numpy as np
import torch

from .cores import default_workers
from .loader import ImageDecodeError, LoaderError, SkippedSample
from .pack_format import PackReader
from .torch_cpu import decode_image

CACHE_DIR_ENV = "DALI_TRAINER_CACHE_DIR"  # where cache files are made; default /dev/shm
FILE_PREFIX = "dali-trainer-cache-"
MODES = ("ram", "device")
EMPTY, GOOD, BAD = 0, 1, 2  # status byte of a slot
_HEADER_ALIGN = 4096  # pixels start on a page boundary after the status bytes
_FILL_CHUNK = 64  # slots per thread task: the progress line moves often, the pool's overhead stays small


class CacheError(LoaderError):
    """A cache cannot be made or opened; the message is one line for the user."""


def cache_dir() -> Path:
    """Where cache files are made: $DALI_TRAINER_CACHE_DIR, else /dev/shm (RAM), else the temp folder."""
    chosen = os.environ.get(CACHE_DIR_ENV)
    if chosen:
        return Path(chosen)
    shm = Path("/dev/shm")
    return shm if shm.is_dir() else Path(tempfile.gettempdir())


def cache_file(name: str) -> Path:
    """The path of the cache file called `name` in `cache_dir()`."""
    return cache_dir() / f"{FILE_PREFIX}{name}"


def cached_sizes(heights: np.ndarray, widths: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(heights, widths) of images shrunk so the short side is at most `size`, aspect ratio kept, never enlarged."""
    heights = np.asarray(heights, dtype=np.int64)
    widths = np.asarray(widths, dtype=np.int64)
    scale = np.minimum(1.0, size / np.minimum(heights, widths))
    return (np.maximum(1, np.rint(heights * scale)).astype(np.int64),
            np.maximum(1, np.rint(widths * scale)).astype(np.int64))


def default_cache_size(image_size: int, zoom: float = 1.0) -> int:
    """The smallest cached short side that loses nothing the training geometry can show: `image_size` x `zoom`.

    The whole-image warp maps each axis of the image onto `image_size` output pixels, so
    a short side of `image_size` keeps every frequency the output can hold (`zoom` 1);
    a geometry that magnifies (a crop box smaller than the image) needs its largest
    magnification as `zoom`.
    """
    return int(np.ceil(image_size * zoom))


@dataclass(frozen=True)
class CachePlan:
    """Where each cached image lives: pack `indices` (sorted), their cached sizes and byte `offsets` (n + 1)."""

    size: int
    indices: np.ndarray
    heights: np.ndarray
    widths: np.ndarray
    offsets: np.ndarray

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def nbytes(self) -> int:
        """Bytes of pixels."""
        return int(self.offsets[-1])

    @property
    def file_bytes(self) -> int:
        """Bytes of the cache file: status bytes, padding, pixels."""
        return self.pixel_offset + max(self.nbytes, 1)

    @property
    def pixel_offset(self) -> int:
        """Where the pixels start in the file."""
        return -(-max(len(self), 1) // _HEADER_ALIGN) * _HEADER_ALIGN

    def slots(self, indices: np.ndarray | Sequence[int]) -> np.ndarray:
        """Positions of pack `indices` in the plan; a `KeyError` for one the plan does not hold."""
        indices = np.asarray(indices, dtype=np.int64)
        slots = np.minimum(np.searchsorted(self.indices, indices), len(self.indices) - 1)
        missing = self.indices[slots] != indices
        if missing.any():
            raise KeyError(f"pack index {int(indices[missing][0])} is not in the cache")
        return slots

    def image_bytes(self, slots: np.ndarray) -> np.ndarray:
        """Bytes of each slot's pixels."""
        return self.offsets[slots + 1] - self.offsets[slots]


def plan_cache(reader: PackReader, indices: np.ndarray | Sequence[int], size: int) -> CachePlan:
    """The `CachePlan` of pack `indices` of `reader` at `size` (short side), from the pack's metadata alone."""
    indices = np.unique(np.asarray(indices, dtype=np.int64))
    heights, widths = cached_sizes(reader.heights[indices], reader.widths[indices], size)
    offsets = np.zeros(len(indices) + 1, dtype=np.int64)
    np.cumsum(heights * widths * 3, out=offsets[1:])
    return CachePlan(int(size), indices, heights, widths, offsets)


def shard_bytes(plan: CachePlan, split_indices: np.ndarray, *, train: bool, world_size: int, rank: int) -> int:
    """The most bytes of `plan` that one rank's shard of a split can hold (see `loader.plan_epoch`).

    Eval shards are fixed (sample i on rank i % world_size): their exact size. Train shards
    are drawn anew each epoch, so the bound is the largest images that fill one.
    """
    split_indices = np.asarray(split_indices, dtype=np.int64)
    if not train:
        return int(plan.image_bytes(plan.slots(split_indices[rank::world_size])).sum())
    per_rank = len(split_indices) // world_size
    sizes = np.sort(plan.image_bytes(plan.slots(split_indices)))
    return int(sizes[len(sizes) - per_rank:].sum())


class DecodedCache:
    """The pixels of a `CachePlan` in one memory-mapped file (see the module docstring for its life).

    `mode` says how loaders use it: "ram" (DataLoader workers warp from the shared pixels)
    or "device" (each loader holds its shard on its device; `cached_backend`).
    """

    def __init__(self, plan: CachePlan, fd: int, mode: str = "ram", *, writable: bool = True) -> None:
        if mode not in MODES:
            raise ValueError(f"cache mode must be one of {MODES}, got {mode!r}")
        self.plan, self.mode = plan, mode
        self._fd = fd
        self._map = mmap.mmap(fd, plan.file_bytes, access=mmap.ACCESS_WRITE if writable else mmap.ACCESS_READ)
        self.status = np.frombuffer(self._map, dtype=np.uint8, count=len(plan))
        self.pixels = np.frombuffer(self._map, dtype=np.uint8, count=plan.nbytes, offset=plan.pixel_offset)

    @classmethod
    def create(cls, plan: CachePlan, path: Path, mode: str = "ram") -> "DecodedCache":
        """A new, empty cache file at `path`, its memory reserved now (so a full /dev/shm fails here, not later)."""
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as exc:
            raise CacheError(f"cannot create the cache file {path}: {exc.strerror}") from None
        try:
            os.posix_fallocate(fd, 0, plan.file_bytes)
        except OSError as exc:
            os.close(fd)
            os.unlink(path)
            hint = "; give it room (docker: --shm-size) or point $" + CACHE_DIR_ENV + " elsewhere"
            raise CacheError(f"cannot reserve {plan.file_bytes / 1e9:.2f} GB for the cache in {path.parent}: "
                             f"{exc.strerror}" + (hint if exc.errno == errno.ENOSPC else "")) from None
        return cls(plan, fd, mode)

    @classmethod
    def open(cls, plan: CachePlan, path: Path, mode: str = "ram") -> "DecodedCache":
        """The cache file another process created at `path` for the same `plan`."""
        try:
            fd = os.open(path, os.O_RDWR)
        except OSError as exc:
            raise CacheError(f"cannot open the cache file {path}: {exc.strerror}") from None
        if os.fstat(fd).st_size != plan.file_bytes:
            os.close(fd)
            raise CacheError(f"{path} is not the cache this run planned ({plan.file_bytes} bytes expected)")
        return cls(plan, fd, mode)

    @classmethod
    def anonymous(cls, plan: CachePlan, mode: str = "ram") -> "DecodedCache":
        """A cache for this process and its workers only: created and unlinked at once (nothing to clean up)."""
        path = cache_file(f"{os.getpid()}-{os.urandom(4).hex()}")
        cache = cls.create(plan, path, mode)
        os.unlink(path)
        return cache

    def __reduce__(self) -> tuple[Callable[..., "DecodedCache"], tuple[Any, ...]]:
        # A duplicate of the descriptor travels to a starting worker; the pixels are never copied.
        return _reopen, (self.plan, DupFd(self._fd), self.mode)

    def fill(self, reader: PackReader, slots: np.ndarray, *, workers: int | None = None,
             on_done: Callable[[int], None] | None = None) -> list[SkippedSample]:
        """Decode and store the images of `slots` with `workers` threads (default: this process's share of the
        cores, `loader.default_workers`); the samples that cannot be decoded.

        `on_done(n)` is called in this thread as each group of n images is stored (the progress line).
        """
        reader.image_bytes(int(self.plan.indices[0]))  # open the pack's map before the threads share it
        chunks = [slots[i : i + _FILL_CHUNK] for i in range(0, len(slots), _FILL_CHUNK)]
        skipped: list[SkippedSample] = []
        threads = default_workers() if workers is None else max(1, workers)
        pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="cache-fill")
        try:
            futures = {pool.submit(self._fill_slots, reader, chunk): len(chunk) for chunk in chunks}
            for future in as_completed(futures):
                skipped += future.result()
                if on_done is not None:
                    on_done(futures[future])
        finally:
            # On Ctrl-C or an error, queued chunks are dropped instead of decoded to the end.
            pool.shutdown(wait=True, cancel_futures=True)
        return sorted(skipped, key=lambda sample: sample.index)

    def _fill_slots(self, reader: PackReader, slots: np.ndarray) -> list[SkippedSample]:
        skipped = []
        for slot in slots:
            index = int(self.plan.indices[slot])
            try:
                image = decode_image(reader, index, 3)
            except ImageDecodeError as exc:
                self.status[slot] = BAD
                skipped.append(exc.sample)
                continue
            out = self.image_at(int(slot))
            if image.shape == out.shape:
                out[...] = image
            else:
                cv2.resize(image, (out.shape[1], out.shape[0]), dst=out, interpolation=cv2.INTER_AREA)
            self.status[slot] = GOOD
        return skipped

    def image_at(self, slot: int) -> np.ndarray:
        """The cached h x w x 3 pixels of `slot` (a view)."""
        start = self.plan.offsets[slot]
        shape = (int(self.plan.heights[slot]), int(self.plan.widths[slot]), 3)
        return self.pixels[start : start + shape[0] * shape[1] * 3].reshape(shape)

    def bad(self, indices: np.ndarray) -> np.ndarray:
        """Mask of pack `indices` whose image could not be decoded."""
        return self.status[self.plan.slots(indices)] == BAD

    def bad_indices(self) -> np.ndarray:
        """Pack indices of every image that could not be decoded."""
        return self.plan.indices[self.status == BAD]

    def decode(self, reader: PackReader, index: int, channels: int) -> np.ndarray:
        """`torch_cpu.decode_image` from the cache: image `index` as h x w x `channels` (3 RGB, 4 RGBA).

        The image has its cached size, not the stored one. An image that could not be
        decoded is decoded again, which raises the `ImageDecodeError` a loader expects.
        """
        slot = int(self.plan.slots([index])[0])
        if self.status[slot] != GOOD:
            return decode_image(reader, index, channels)
        image = self.image_at(slot)
        return image if channels == 3 else cv2.cvtColor(image, cv2.COLOR_RGB2RGBA)

    def skipped_sample(self, reader: PackReader, index: int) -> SkippedSample:
        """The record of image `index`, known bad: its decoding error again, reason and all."""
        try:
            decode_image(reader, index, 3)
        except ImageDecodeError as exc:
            return exc.sample
        return SkippedSample(index, reader.paths[index], "could not be decoded when the cache was built")

    def close(self) -> None:
        """Drop this process's map and descriptor (the pixels stay while another process holds them)."""
        self.status = self.pixels = np.zeros(0, dtype=np.uint8)
        try:
            self._map.close()
        except BufferError:
            pass  # a view handed out is still alive: the map closes when it goes
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _reopen(plan: CachePlan, fd: Any, mode: str) -> DecodedCache:
    return DecodedCache(plan, fd.detach(), mode, writable=False)


def build_cache(reader: PackReader, indices: np.ndarray | Sequence[int], size: int, *, mode: str = "ram",
                workers: int | None = None,
                on_done: Callable[[int], None] | None = None) -> tuple[DecodedCache, list[SkippedSample]]:
    """A filled cache of pack `indices` for this process and its workers, and the samples that cannot be decoded.

    The one-process form (benchmarks, tests, notebooks); `trainer run` shares one cache
    among the processes of a node (`trainer.run_cache`).
    """
    cache = DecodedCache.anonymous(plan_cache(reader, indices, size), mode)
    skipped = cache.fill(reader, np.arange(len(cache.plan)), workers=workers, on_done=on_done)
    return cache, skipped


@dataclass(frozen=True)
class Room:
    """Free memory where a cache can go, in bytes."""

    ram: int  # what the kernel can hand out without swapping (MemAvailable)
    folder: int  # free space in `cache_dir()` (for /dev/shm: what its tmpfs limit leaves)
    device: int | None  # free memory of the device asked about (the CPU's: `ram`); None when not asked


def free_room(device: torch.device | None = None) -> Room:
    """The free RAM, cache folder space and (with `device`) device memory now."""
    ram = _free_ram()
    stats = os.statvfs(cache_dir())
    on_device = None if device is None else (
        int(torch.cuda.mem_get_info(device)[0]) if device.type == "cuda" else ram)
    return Room(ram, stats.f_bavail * stats.f_frsize, on_device)


def _free_ram() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")

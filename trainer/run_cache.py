"""The decoded cache of a run (`--cache ram|device`): what it needs, whether it fits, one copy per node.

* `need_cache`: the plan from the pack's metadata (nothing decoded, nothing allocated),
  the line that says how much memory it takes, and the one-line refusal, naming
  --cache-max-gb, when that does not fit.
* `open_cache`: the one copy per node. Rank 0 draws a name and every rank learns it; the
  node's local rank 0 creates the file (its memory reserved at once), the node's other
  processes open it after a barrier, and after a second barrier local rank 0 unlinks the
  name: from then on the pixels belong to the processes holding them (and their loader
  workers), and the kernel frees them when the last one exits, kill -9 included. Every
  local rank then decodes its share of the images into the file, with the progress line.
  A kill between the create and the unlink (two barriers, no work between them) would
  leave the file behind, as `dali-trainer-cache-*` in the cache folder.
* `cache_backend`: the backend a cached run uses (the torch path; `dali_pipes.cached_backend`
  says why) and the line that says so when another was asked for.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from dali_pipes import (
    CACHE_DIR_ENV,
    CachePlan,
    DecodedCache,
    PackReader,
    Progress,
    cache_dir,
    cache_file,
    default_cache_size,
    free_room,
    largest_zoom,
    plan_cache,
    shard_bytes,
)
from trainer.config import RunConfig
from trainer.distributed import DistContext
from trainer.errors import TrainerError

DEFAULT_SHARE = 0.5  # of the free RAM (or GPU memory) a cache may take unless --cache-max-gb says otherwise
CACHED_SPLITS = ("train", "val", "test")  # a run trains on one, validates on one and tests on one


@dataclass(frozen=True)
class CacheNeed:
    """What a run's cache takes: its plan, the bytes on each device (device mode), and the line that says so."""

    mode: str
    plan: CachePlan
    device_bytes: int
    line: str


def run_cache_size(cfg: RunConfig) -> int:
    """The default --cache-size: what training at --image-size (through the largest magnification of its crops) and
    evaluation at --eval-image-size can show."""
    train = default_cache_size(cfg.image_size, largest_zoom(cfg.crop_scale, cfg.crop_ratio))
    return max(train, cfg.eval_image_size or 0)


def need_cache(cfg: RunConfig, reader: PackReader, world_size: int,
               device: torch.device | None) -> CacheNeed | None:
    """The cache `cfg` asks for (None for --cache none), refused in one line when it does not fit.

    `device` None leaves the GPU's side unchecked (the launcher of --nproc does not touch the GPU).
    """
    if cfg.cache == "none":
        return None
    size = cfg.cache_size or run_cache_size(cfg)
    splits = [name for name in CACHED_SPLITS if len(reader.split_indices(name))]
    plan = plan_cache(reader, np.concatenate([reader.split_indices(name) for name in splits]), size)
    room = free_room(device if cfg.cache == "device" else None)
    if plan.file_bytes > room.folder:
        raise TrainerError(f"--cache {cfg.cache} needs {amount(plan.file_bytes)} in {cache_dir()}, which has "
                           f"{amount(room.folder)} free; lower --cache-size (now {size}), give it room (docker: "
                           f"--shm-size), or set {CACHE_DIR_ENV} to a larger RAM disk")
    ram_limit, ram_why = _limit(cfg.cache_max_gb, room.ram, "the free RAM")
    _refuse_above(cfg, plan.file_bytes, ram_limit, ram_why, "of shared memory", size)
    where = f"{amount(plan.file_bytes)} in shared memory, one copy for all processes of a machine"
    allowed = f"allowed {amount(ram_limit)}: {ram_why}"
    device_bytes = 0
    if cfg.cache == "device":
        device_bytes = sum(shard_bytes(plan, reader.split_indices(name), train=name == "train",
                                       world_size=world_size, rank=0) for name in splits)
        where += f", and up to {amount(device_bytes)} on each device (its shard of each split)"
        if room.device is not None:
            limit, why = _limit(cfg.cache_max_gb, room.device, f"the free memory of {device}")
            _refuse_above(cfg, device_bytes, limit, why, f"on {device}", size)
            allowed += f"; {amount(limit)} on the device: {why}"
    line = (f"cache {cfg.cache}: {len(plan)} images of {', '.join(splits)} with short side <= {size} px: {where} "
            f"({allowed}; --cache-max-gb)")
    return CacheNeed(cfg.cache, plan, device_bytes, line)


def _limit(max_gb: float | None, free: int, what: str) -> tuple[int, str]:
    if max_gb is not None:
        return int(max_gb * 1e9), "--cache-max-gb"
    return int(DEFAULT_SHARE * free), f"half {what}, {amount(free)}"


def _refuse_above(cfg: RunConfig, need: int, limit: int, why: str, where: str, size: int) -> None:
    if need > limit:
        raise TrainerError(f"--cache {cfg.cache} needs {amount(need)} {where}, more than the {amount(limit)} "
                           f"allowed ({why}); lower --cache-size (now {size}) or raise --cache-max-gb")


def amount(nbytes: int) -> str:
    """`nbytes` as the cache's lines say it: GB, or MB below 0.1 GB."""
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e8 else f"{nbytes / 1e6:.1f} MB"


def local_world_size() -> int:
    """Processes of this run on this machine (torchrun's LOCAL_WORLD_SIZE; 1 without it)."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


def open_cache(need: CacheNeed, ctx: DistContext, reader: PackReader, say: Callable[[str], None], *,
               workers: int | None) -> DecodedCache:
    """This process's handle on its node's filled cache (see the module docstring for who does what)."""
    local_rank, local_world = ctx.local_rank, local_world_size()
    # The node's processes are ranks (rank - local_rank) .. under torchrun: one name per node.
    path = cache_file(f"{ctx.broadcast_object(os.urandom(6).hex())}-{ctx.rank - local_rank}")
    cache = DecodedCache.create(need.plan, path, need.mode) if local_rank == 0 else None
    try:
        ctx.barrier()
        if cache is None:
            cache = DecodedCache.open(need.plan, path, need.mode)
        ctx.barrier()
    finally:
        if local_rank == 0:
            path.unlink(missing_ok=True)  # every process of the node holds it now
    start = time.perf_counter()
    progress = Progress(len(need.plan), "cache", enabled=ctx.is_main, scale=local_world)
    cache.fill(reader, np.arange(local_rank, len(need.plan), local_world), workers=workers, on_done=progress.update)
    progress.close()
    ctx.barrier()
    bad = len(cache.bad_indices())
    say(f"cache {need.mode}: decoded {len(need.plan)} images in {time.perf_counter() - start:.1f}s"
        + (f"; {bad} cannot be decoded and are skipped, as without the cache" if bad else ""))
    return cache


def cache_backend(cfg: RunConfig) -> tuple[str, str | None]:
    """The backend of a cached run, torch, and the line that says so when --backend asked for another."""
    if cfg.backend == "torch":
        return "torch", None
    return "torch", f"backend {cfg.backend} -> torch: --cache {cfg.cache} serves decoded pixels through the torch path"

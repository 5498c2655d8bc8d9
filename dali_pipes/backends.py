"""The backend registry, the one place a backend is chosen, and `build_loader`."""
from __future__ import annotations

import importlib
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .cores import default_workers
from .loader import BatchLoader, LoaderError, LoaderRequest
from .pack_format import PackReader
from .spec import PipelineSpec

if TYPE_CHECKING:
    from .cache import DecodedCache

log = logging.getLogger("dali_pipes")

# name -> module defining `make_loader(reader: PackReader, request: LoaderRequest) -> BatchLoader`.
# Modules import lazily.
BACKENDS = {
    "dali": "dali_pipes.dali_backend",
    "torch": "dali_pipes.torch_backend",
    "synthetic": "dali_pipes.synthetic_backend",
}
CACHED_BACKEND = "dali_pipes.cached_backend"  # serves a decoded cache, whatever the backend
DALI_INSTALL_HINT = ("pip install nvidia-dali-cuda120 for CUDA 12, nvidia-dali-cuda130 for CUDA 13 "
                     "(from a checkout: pip install -e '.[dali]' or '.[dali-cu13]')")


def dali_available() -> bool:
    """True when nvidia.dali imports (which imports it)."""
    try:
        importlib.import_module("nvidia.dali")
    except Exception:  # a broken install raises more than ImportError
        return False
    return True


def available_backends() -> list[str]:
    """Backends that can run on this machine (imports nvidia.dali to find out)."""
    return [name for name in BACKENDS if name != "dali" or dali_available()]


def choose_backend(backend: str, device: str | torch.device) -> tuple[str, str | None]:
    """The concrete backend for `backend` on `device`, and for "auto" the line that says what it chose.

    "auto" is dali on a CUDA device when DALI imports, else torch. nvidia.dali is imported
    only where it would be used: never for "auto" off CUDA, because a process that has
    imported it starts the torch backend's workers with forkserver (see
    `torch_backend._worker_context`). Raises `LoaderError` for an unknown name and for
    "dali" without DALI.
    """
    device = torch.device(device)
    if backend not in (*BACKENDS, "auto"):
        raise LoaderError(f"unknown backend {backend!r}; choose from auto, {', '.join(BACKENDS)}")
    if backend == "auto":
        if device.type != "cuda":
            return "torch", f"backend auto -> torch (device {device}; auto uses dali on CUDA only)"
        if dali_available():
            return "dali", f"backend auto -> dali (device {device}, DALI available)"
        return "torch", f"backend auto -> torch (device {device}, DALI not installed)"
    if backend == "dali" and not dali_available():
        raise LoaderError(f"backend 'dali' needs NVIDIA DALI, which is not installed: {DALI_INSTALL_HINT}")
    return backend, None


def resolve_backend(backend: str, device: str | torch.device) -> str:
    """The concrete backend for `backend` on `device`: `choose_backend` without its line."""
    return choose_backend(backend, device)[0]


def build_loader(pack: str | os.PathLike[str] | PackReader, split: str, *, backend: str = "auto", batch_size: int,
                 train: bool, image_size: int = 224, device: str | torch.device | None = None,
                 dtype: torch.dtype = torch.float32, num_workers: int | None = None, seed: int = 0, rank: int = 0,
                 world_size: int = 1, drop_last: bool | None = None, spec: PipelineSpec | None = None,
                 cache: DecodedCache | None = None) -> BatchLoader:
    """An iterable of `(images, labels)` batches of `split` of `pack`.

    images: N x 3 x S x S, channels_last, normalized by `spec` (or raw pixels when
    `dtype` is torch.uint8), on `device`; labels: int64 on `device`. The loader has an
    exact `len()` (batches this rank yields per epoch) and `set_epoch(epoch)`. Train
    mode reshuffles each epoch and drops the last partial batch unless `drop_last` is
    False; eval mode yields every sample of the split exactly once across ranks.
    `spec` overrides `image_size` (a checkpoint's spec, say). With `cache` (a
    `cache.DecodedCache` holding the split) batches come from its pixels through the torch
    path, whatever `backend` says (`cached_backend`). A request that cannot be served raises
    `LoaderError` naming the pack.
    """
    reader = pack if isinstance(pack, PackReader) else PackReader(Path(pack))
    device = torch.device(device) if device is not None else torch.device("cpu")
    try:
        request = LoaderRequest(reader.split_indices(split), spec or PipelineSpec(image_size=image_size), train=train,
                                batch_size=batch_size, device=device, dtype=dtype,
                                num_workers=default_workers() if num_workers is None else num_workers, seed=seed,
                                rank=rank, world_size=world_size, drop_last=drop_last, split=split)
    except LoaderError as exc:
        raise LoaderError(f"{reader.path}: {exc}") from None
    if cache is not None:
        return importlib.import_module(CACHED_BACKEND).make_loader(reader, request, cache)
    name, note = choose_backend(backend, device)
    if note:
        # DEBUG: a caller building several loaders says the choice once (trainer run does, from rank 0).
        log.debug(note)
    return importlib.import_module(BACKENDS[name]).make_loader(reader, request)

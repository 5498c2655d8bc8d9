"""`build_loader`: pick a backend by name, make the request, return the backend's `BatchLoader`."""
from __future__ import annotations

import importlib
import logging
import os
from pathlib import Path

import torch

from .base import BatchLoader, LoaderError, LoaderRequest
from .pack import PackReader
from .spec import PipelineSpec

log = logging.getLogger("dali_pipes")

# name -> module defining `make_loader(reader: PackReader, request: LoaderRequest) -> BatchLoader`.
# Modules import lazily.
BACKENDS = {
    "dali": "dali_pipes.dali_backend",
    "torch": "dali_pipes.torch_backend",
    "synthetic": "dali_pipes.synthetic_backend",
}
DALI_INSTALL_HINT = "pip install 'nvidia-dali-cuda120' (or: pip install -e '.[dali]')"


def dali_available() -> bool:
    """True when nvidia.dali imports."""
    try:
        importlib.import_module("nvidia.dali")
    except Exception:  # a broken install raises more than ImportError
        return False
    return True


def available_backends() -> list[str]:
    """Backends that can run on this machine."""
    return [name for name in BACKENDS if name != "dali" or dali_available()]


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend for `backend` ("auto": dali on CUDA when it imports, else torch)."""
    if backend not in (*BACKENDS, "auto"):
        raise LoaderError(f"unknown backend {backend!r}; choose from auto, {', '.join(BACKENDS)}")
    if backend == "auto":
        chosen = "dali" if device.type == "cuda" and dali_available() else "torch"
        # DEBUG: a caller building several loaders says the choice once (trainer run does, from rank 0).
        log.debug("backend auto -> %s (device %s, DALI %s)", chosen, device, "available" if dali_available() else "not installed")
        return chosen
    if backend == "dali" and not dali_available():
        raise LoaderError(f"backend 'dali' needs NVIDIA DALI, which is not installed: {DALI_INSTALL_HINT}")
    return backend


def build_loader(pack: str | os.PathLike[str] | PackReader, split: str, *, backend: str = "auto", batch_size: int,
                 train: bool, image_size: int = 224, device: str | torch.device | None = None,
                 dtype: torch.dtype = torch.float32, num_workers: int | None = None, seed: int = 0, rank: int = 0,
                 world_size: int = 1, drop_last: bool | None = None, spec: PipelineSpec | None = None) -> BatchLoader:
    """An iterable of `(images, labels)` batches of `split` of `pack`.

    images: N x 3 x S x S, channels_last, normalized by `spec` (or raw pixels when
    `dtype` is torch.uint8), on `device`; labels: int64 on `device`. The loader has an
    exact `len()` (batches this rank yields per epoch) and `set_epoch(epoch)`. Train
    mode reshuffles each epoch and drops the last partial batch unless `drop_last` is
    False; eval mode yields every sample of the split exactly once across ranks.
    `spec` overrides `image_size` (a checkpoint's spec, say).
    """
    reader = pack if isinstance(pack, PackReader) else PackReader(Path(pack))
    device = torch.device(device) if device is not None else torch.device("cpu")
    split_indices = reader.split_indices(split)
    if len(split_indices) == 0:
        raise LoaderError(f"{reader.path}: split {split!r} is empty")
    request = LoaderRequest(split_indices, spec or PipelineSpec(image_size=image_size), train=train, batch_size=batch_size,
                            device=device, dtype=dtype, num_workers=default_workers() if num_workers is None else num_workers,
                            seed=seed, rank=rank, world_size=world_size, drop_last=drop_last, split=split)
    module = importlib.import_module(BACKENDS[resolve_backend(backend, device)])
    return module.make_loader(reader, request)


def default_workers() -> int:
    """The cores this process may use, shared among the processes on this node, at least 1.

    torchrun sets LOCAL_WORLD_SIZE (processes on this node); each of them would otherwise
    start one worker per core and the node would run nproc times too many.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    try:
        local_world = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        local_world = 1
    return max(1, cores // local_world)

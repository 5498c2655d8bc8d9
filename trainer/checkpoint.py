"""Saving and loading checkpoints, atomically, loadable with `torch.load(weights_only=True)`."""
from __future__ import annotations

import errno
import io
import os
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dali_pipes import atomic_write_bytes  # re-exported: metrics and plots write through it too
from trainer.errors import TrainerError

CHECKPOINT_FORMAT = "dali-trainer-checkpoint"
CHECKPOINT_VERSION = 1


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model under DDP and torch.compile wrappers, so saved keys never carry their prefixes."""
    while True:
        if hasattr(model, "_orig_mod"):  # torch.compile's OptimizedModule
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def rng_state() -> dict[str, Any]:
    """Torch CPU and CUDA generator states (the only global RNGs the trainer uses)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore `rng_state()`."""
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Atomically save `payload` (plain containers and tensors only) as a checkpoint."""
    payload = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **payload}
    # Serialized in memory first: torch's zip writer reports a full disk as an opaque
    # RuntimeError ("unexpected pos"), while a plain write raises the real OSError.
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    try:
        atomic_write_bytes(path, lambda f: f.write(buffer.getbuffer()))
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES):
            raise TrainerError(f"cannot write {path} ({os.strerror(exc.errno)}); the previous checkpoint is intact") from None
        raise


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load and check one of our checkpoints; one-line `TrainerError` for anything else."""
    path = Path(path)
    if not path.is_file():
        raise TrainerError(f"{path}: no such checkpoint")
    if not zipfile.is_zipfile(path):
        raise TrainerError(f"{path}: not a readable checkpoint (truncated, or not a PyTorch file)")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - truncated, not a zip, foreign pickles...
        raise TrainerError(f"{path}: not a readable checkpoint ({str(exc).splitlines()[0][:100]})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise TrainerError(f"{path}: not a dali-trainer checkpoint")
    if ckpt.get("version") != CHECKPOINT_VERSION:
        raise TrainerError(f"{path}: checkpoint version {ckpt.get('version')}, this program reads {CHECKPOINT_VERSION}")
    return ckpt

"""What a checkpoint holds (`make_payload`, `read_payload`), and saving and loading it atomically.

Every tensor of a checkpoint is on the CPU, so checkpoints load with plain
`torch.load(path, weights_only=True)` too, on a machine without a GPU and without `map_location`.
"""
from __future__ import annotations

import errno
import io
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dali_pipes import atomic_write_bytes  # re-exported: metrics and plots write through it too
from trainer.errors import TrainerError, first_line

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
            raise TrainerError(f"cannot write {path} ({os.strerror(exc.errno)}); "
                               "the previous checkpoint is intact") from None
        raise


def model_file_kind(path: Path) -> str:
    """What a model file is, by its contents: "torchscript" or "onnx" (exports), "pytorch" (torch.save), or "other".

    TorchScript archives are zips like torch.save's but hold `code/` and `constants.pkl`;
    an ONNX file is a protobuf, told by its `.onnx` name or its `trainer export` sidecar.
    """
    path = Path(path)
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
        scripted = any("/code/" in name or name.endswith("constants.pkl") for name in names)
        return "torchscript" if scripted else "pytorch"
    if path.suffix.lower() == ".onnx" or path.with_name(path.name + ".json").is_file():
        return "onnx"
    return "other"


EXPORTED_KINDS = {"torchscript": "a TorchScript export", "onnx": "an ONNX export"}


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu", instead: str = "") -> dict[str, Any]:
    """Load and check one of our checkpoints; one-line `TrainerError` for anything else.

    `instead` ends the error for an exported model: what the command takes in its place.
    """
    path = Path(path)
    if not path.is_file():
        raise TrainerError(f"{path}: no such checkpoint")
    kind = model_file_kind(path)
    if kind in EXPORTED_KINDS:
        raise TrainerError(f"{path}: {EXPORTED_KINDS[kind]} (trainer export), not a checkpoint; "
                           + (instead or "give the best.pt or last.pt of the run it came from"))
    if kind != "pytorch":
        raise TrainerError(f"{path}: not a readable checkpoint (truncated, or not a PyTorch file)")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - truncated, not a zip, foreign pickles...
        raise TrainerError(f"{path}: not a readable checkpoint ({first_line(exc, 100)})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise TrainerError(f"{path}: not a dali-trainer checkpoint")
    if ckpt.get("version") != CHECKPOINT_VERSION:
        raise TrainerError(f"{path}: checkpoint version {ckpt.get('version')}, "
                           f"this program reads {CHECKPOINT_VERSION}")
    return ckpt


# What a checkpoint holds. Written by `make_payload`, read by `read_payload`, and nowhere
# else: `trainer run` (save, resume) and the inference commands (rebuild) both go through them.
# Keys are only ever added: a checkpoint written by an older version still loads.
METRICS_EPOCH_BASE = 1  # metrics.jsonl and summary.json count epochs from 1 (before this key: from 0)


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint read back: everything needed to rebuild the model, or to continue training."""

    model: dict[str, Any]
    arch: str
    head: dict[str, Any]  # `models.HeadConfig.to_dict()`
    spec: dict[str, Any]
    classes: list[str]
    config: dict[str, Any]
    epoch: int  # 0-based index of the last completed epoch (-1: none yet)
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]  # name, plateau state, epochs (the schedule's length)
    scaler: dict[str, Any]
    early_stopping: dict[str, Any]
    rng: dict[str, Any]
    metrics: dict[str, Any]
    position: dict[str, Any] | None  # where a mid-epoch checkpoint stopped (read by `trainer.resume.read_position`)
    metrics_epoch_base: int  # how the run's metrics.jsonl counts epochs
    trained_classes: list[str]  # the classes with training images: all of them, unless the pack is split by class
    ema: dict[str, Any] | None = None  # the averaged weights and their update count (`trainer.ema.ModelEma`)
    model_weights: str = "raw"  # what `model` holds: the trained weights ("raw") or their average ("ema")

    @property
    def schedule_epochs(self) -> int:
        """The length the learning-rate schedule was planned for."""
        return int(self.scheduler.get("epochs", self.config.get("epochs", 0)))


def on_cpu(value: Any) -> Any:
    """`value` with every tensor in it (through dicts, lists and tuples) detached and on the CPU."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {key: on_cpu(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(on_cpu(item) for item in value)
    return value


def make_payload(*, model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                 scheduler: dict[str, Any], early_stopping: dict[str, Any], epoch: int, config: dict[str, Any],
                 head: dict[str, Any], classes: list[str], spec: dict[str, Any], metrics: dict[str, Any],
                 position: dict[str, Any] | None = None, trained_classes: list[str] | None = None,
                 ema: dict[str, Any] | None = None, model_weights: str = "raw") -> dict[str, Any]:
    """The checkpoint after epoch index `epoch` completed (and `position` into the next): containers and CPU
    tensors.

    `trained_classes`: the classes the run had training images of (None: all `classes`).
    `ema` is the averaged weights' state (`ModelEma.state_dict`), kept under "ema" to resume
    them; `model_weights` says whether `model` is the trained weights ("raw") or the
    averaged ones ("ema", a best.pt whose average validated better).
    """
    payload = {
        "model": unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": dict(scheduler),
        "scaler": scaler.state_dict(),
        "epoch": epoch,
        "early_stopping": dict(early_stopping),
        "rng": rng_state(),
        "config": dict(config),
        "classes": list(classes),
        "arch": config["arch"],
        "head": dict(head),
        "spec": dict(spec),
        "metrics": dict(metrics),
        "metrics_epoch_base": METRICS_EPOCH_BASE,
        "trained_classes": list(classes if trained_classes is None else trained_classes),
        "model_weights": model_weights,
    }
    if position is not None:
        payload["position"] = dict(position)
    if ema is not None:
        payload["ema"] = dict(ema)
    return on_cpu(payload)


def read_payload(ckpt: dict[str, Any]) -> Checkpoint:
    """`load_checkpoint`'s dict as a `Checkpoint`, filling what older versions did not write."""
    return Checkpoint(
        model=ckpt["model"], arch=ckpt["arch"], head=dict(ckpt["head"]), spec=dict(ckpt["spec"]),
        classes=list(ckpt["classes"]), config=dict(ckpt.get("config", {})), epoch=int(ckpt["epoch"]),
        optimizer=ckpt.get("optimizer", {}), scheduler=dict(ckpt.get("scheduler", {})), scaler=ckpt.get("scaler", {}),
        early_stopping=ckpt.get("early_stopping", {}), rng=ckpt.get("rng", {}), metrics=ckpt.get("metrics", {}),
        position=ckpt.get("position") or None, metrics_epoch_base=int(ckpt.get("metrics_epoch_base", 0)),
        trained_classes=list(ckpt.get("trained_classes", ckpt["classes"])),
        ema=ckpt.get("ema"), model_weights=str(ckpt.get("model_weights", "raw")))


def first_difference(ours: list[str], theirs: list[str]) -> str:
    """The first class that differs between a pack's list and a checkpoint's, in words."""
    for i, (a, b) in enumerate(zip(ours, theirs)):
        if a != b:
            return f"class {i} is {a!r} in the pack, {b!r} in the checkpoint"
    return "one list is longer"

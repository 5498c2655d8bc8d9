"""Models for inference: a checkpoint, an exported ONNX or TorchScript file, and image files made into model inputs.

`eval`, `predict`, `embed`, `verify` and `export` load their models here and nowhere else.
A checkpoint alone rebuilds the model (architecture, head, weights) and its preprocessing;
an ONNX export does with its JSON sidecar (`sidecar_path`), which `trainer.export` writes.
"""
from __future__ import annotations

import contextlib
import io
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch
from torch import nn

from dali_pipes import IMAGE_EXTENSIONS, PipelineSpec, load_rgb, plural, preprocess
from trainer.checkpoint import load_checkpoint, model_file_kind, read_payload
from trainer.errors import TrainerError, first_line
from trainer.extras import require
from trainer.models import HeadConfig, build_model

SIDECAR_FORMAT = "dali-trainer-export"
SIDECAR_VERSION = 2  # 2: "epoch" counts from 1, as every file a user reads (version 1 counted from 0)


@dataclass(frozen=True)
class LoadedModel:
    """A model ready for inference, with what it needs to preprocess and name classes."""

    model: nn.Module
    classes: list[str]
    spec: PipelineSpec
    arch: str
    epoch: int  # the checkpoint's last completed epoch, counted from 1 (as metrics.jsonl and every output)
    trained_classes: list[str]  # the classes it had training images of; its closed-set outputs cover only these
    tta: str = "none"  # the test-time augmentation its run validated and tested with (the inference default)


def closed_set_note(trained: int, classes: int) -> str | None:
    """What to tell a user of a model's class outputs when only `trained` of its `classes` had training images."""
    if trained == classes:
        return None
    return (f"its closed-set outputs cover only the {plural(trained, 'class')} it trained on, of the "
            f"{plural(classes, 'class')} in its head (a pack split by class holds the others out for verification)")


def checkpoint_file(path: Path) -> Path:
    """The file a --checkpoint names: the path itself, or the best.pt of a run folder."""
    path = Path(path)
    if not path.is_dir():
        return path
    if not (path / "best.pt").is_file():
        raise TrainerError(f"--checkpoint {path} is a folder without best.pt; give a checkpoint file (best.pt or "
                           "last.pt of a run)")
    return path / "best.pt"


def load_model(path: Path, device: torch.device, instead: str = "") -> LoadedModel:
    """Rebuild the checkpoint's architecture and head, load its weights, move to `device` in eval mode.

    `path` may be a run folder (its best.pt); `instead` ends the error for an exported model (see `load_checkpoint`).
    """
    path = checkpoint_file(path)
    ckpt = read_payload(load_checkpoint(path, instead=instead))
    model = build_model(ckpt.arch, len(ckpt.classes), weights="none", head=HeadConfig.from_dict(ckpt.head))
    try:
        model.load_state_dict(ckpt.model)
    except RuntimeError as exc:
        raise TrainerError(f"{path}: weights do not fit {ckpt.arch} ({first_line(exc, 100)})") from None
    channels_last = ckpt.config.get("channels_last", True)
    model.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format).eval()
    return LoadedModel(model, ckpt.classes, PipelineSpec.from_dict(ckpt.spec), ckpt.arch, ckpt.epoch + 1,
                       ckpt.trained_classes, str(ckpt.config.get("tta", "none")))


def load_predictor(path: Path, device: torch.device) -> LoadedModel:
    """A checkpoint (or run folder), or an ONNX file from `trainer export` (run by onnxruntime on the CPU)."""
    path = checkpoint_file(path)
    if model_file_kind(path) == "onnx":
        return load_onnx(path)
    return load_model(path, device, instead="predict takes the best.pt it came from, or an ONNX export (.onnx)")


class ClosedSet(nn.Module):
    """`model` with the logits of the classes it never trained on set to -inf: no probability, never in a top-k."""

    def __init__(self, model: nn.Module, classes: list[str], trained_classes: list[str]) -> None:
        super().__init__()
        self.model = model
        trained = set(trained_classes)
        self.register_buffer("untrained", torch.tensor([c not in trained for c in classes]), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.model(images)
        return logits.masked_fill(self.untrained.to(logits.device), float("-inf"))


def closed_set(loaded: LoadedModel, trained_classes: list[str] | None = None) -> nn.Module:
    """`loaded.model`, its outputs limited to `trained_classes` (default: the checkpoint's) when some class is not."""
    trained = loaded.trained_classes if trained_classes is None else trained_classes
    if len(trained) == len(loaded.classes):
        return loaded.model
    return ClosedSet(loaded.model, loaded.classes, trained).eval()


def sidecar_path(model_file: Path) -> Path:
    """Where the sidecar of `model_file` lives: the same name plus `.json` (model.onnx -> model.onnx.json)."""
    model_file = Path(model_file)
    return model_file.with_name(model_file.name + ".json")


class OnnxModel(nn.Module):
    """An ONNX model run by onnxruntime on the CPU, called like the PyTorch model it came from.

    A fixed-batch model is fed in chunks of its batch size (the last one padded), so
    callers may pass any number of images.
    """

    def __init__(self, source: str | bytes) -> None:
        super().__init__()
        ort = require("onnxruntime", "export", "running ONNX models")
        try:
            self.session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - a corrupt or foreign file
            where = source if isinstance(source, str) else "exported model"
            raise TrainerError(f"{where}: onnxruntime cannot load it ({first_line(exc)})") from None
        model_input = self.session.get_inputs()[0]
        self.input_name = model_input.name
        self.fixed_batch = model_input.shape[0] if isinstance(model_input.shape[0], int) else None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        array = np.ascontiguousarray(images.detach().float().cpu().numpy())
        n = len(array)
        chunk = self.fixed_batch or max(n, 1)
        outputs = []
        for start in range(0, n, chunk):
            part = array[start : start + chunk]
            if len(part) < chunk:
                part = np.concatenate([part, np.repeat(part[-1:], chunk - len(part), axis=0)])
            outputs.append(self.session.run(None, {self.input_name: part})[0][: min(chunk, n - start)])
        return torch.from_numpy(np.concatenate(outputs)).to(images.device)


def load_onnx(path: Path) -> LoadedModel:
    """An exported ONNX file and its sidecar, as `trainer predict` uses a checkpoint (runs on the CPU)."""
    path = Path(path)
    if not path.is_file():
        raise TrainerError(f"{path}: no such ONNX file")
    side = sidecar_path(path)
    if not side.is_file():
        raise TrainerError(f"{path}: its sidecar {side.name} is missing (trainer export writes it next to the model)")
    try:
        meta = json.loads(side.read_text())
        spec = PipelineSpec.from_dict(meta["spec"])
        classes = [str(c) for c in meta["classes"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise TrainerError(f"{side}: not a dali-trainer export sidecar ({first_line(exc)})") from None
    if meta.get("format") != SIDECAR_FORMAT:
        raise TrainerError(f"{side}: not a dali-trainer export sidecar")
    if meta.get("output") != "logits":
        raise TrainerError(f"{path}: exported with --embedding; predict needs a model exported with logits")
    model = OnnxModel(str(path)).eval()
    epoch = int(meta.get("epoch", 0)) + (1 if int(meta.get("version", 1)) < 2 else 0)  # version 1 counted from 0
    return LoadedModel(model, classes, spec, str(meta.get("arch", "onnx")), epoch,
                       [str(c) for c in meta.get("trained_classes", classes)])


@contextlib.contextmanager
def quiet_jit() -> Iterator[None]:
    """Silence torch.jit's deprecation warnings: TorchScript files are still what TorchScript servers load."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        yield


def load_torchscript(data: bytes) -> torch.jit.ScriptModule:
    """A TorchScript module from the bytes `torch.jit.save` wrote, on the CPU."""
    with quiet_jit():
        return torch.jit.load(io.BytesIO(data), map_location="cpu")


def image_batches(inputs: Iterable[Path], spec: PipelineSpec, device: torch.device, batch_size: int,
                  warn: Any = print) -> Iterator[tuple[list[Path], torch.Tensor]]:
    """(paths, model-ready images) batches of the image files in `inputs` (folders walked).

    Unreadable files are reported through `warn` and skipped.
    """
    paths = list(expand_inputs(inputs))
    if not paths:
        raise TrainerError(f"no image files given (folders are searched for {', '.join(sorted(IMAGE_EXTENSIONS))})")
    for start in range(0, len(paths), batch_size):
        batch_paths, pixels = [], []
        for path in paths[start : start + batch_size]:
            try:
                pixels.append(load_rgb(path))
            except ValueError as exc:
                warn(f"skipped: {exc}")
                continue
            batch_paths.append(path)
        if pixels:
            yield batch_paths, preprocess(pixels, spec, device)


def expand_inputs(inputs: Iterable[Path]) -> Iterator[Path]:
    """Each path given, with folders replaced by the image files under them (sorted; hidden files left out)."""
    for path in inputs:
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*")
                              if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("."))
        else:
            yield path

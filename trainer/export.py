"""`trainer export`: a checkpoint to ONNX or TorchScript, checked against PyTorch, with a JSON sidecar.

The exported model takes what the checkpoint's model takes: float32 N x 3 x S x S RGB
images, resized to S x S and normalized with the spec's mean and std. The sidecar
(`<FILE>.json`, e.g. `model.onnx.json`) records that spec, the class names and how the
export was verified, so a server (or `trainer predict`) preprocesses exactly as training
did; `trainer.inference` loads and runs the exported files.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dali_pipes import PipelineSpec, check_output, plural
from trainer.checkpoint import atomic_write_bytes
from trainer.errors import TrainerError, first_line
from trainer.extras import require
from trainer.inference import (
    SIDECAR_FORMAT,
    SIDECAR_VERSION,
    LoadedModel,
    OnnxModel,
    checkpoint_file,
    load_model,
    load_torchscript,
    quiet_jit,
    sidecar_path,
)
from trainer.metrics import write_json
from trainer.models import embedder, takes_labels

FORMATS = ("onnx", "torchscript")
# 18 is the lowest opset torch's torch.export-based exporter (the default since torch 2.9) targets.
ONNX_OPSET = 18
TOLERANCE = 1e-3  # largest accepted |exported - PyTorch| on fp32 outputs
VERIFY_IMAGES = 4
EXAMPLE_BATCH = 2  # batch 1 would let torch.export specialize the batch dimension to a constant


def export_checkpoint(checkpoint: Path, out: Path, *, fmt: str, batch: int | None = None, embedding: bool = False,
                      pack: Path | None = None, force: bool = False) -> dict[str, Any]:
    """Export `checkpoint` to `out` as `fmt` (onnx or torchscript) and write its sidecar; returns the sidecar.

    batch None exports a dynamic batch dimension, an int fixes it. The exported file is
    run on a few images (from `pack` when given, else a seeded random batch) and its
    outputs must match PyTorch's within `TOLERANCE` (an embedding's once L2-normalized), or nothing is written.
    `out` and its sidecar are checked first (`check_output`): existing ones are replaced only with `force`.
    """
    if fmt not in FORMATS:
        raise TrainerError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    for path in (out, sidecar_path(out)):
        check_output(path, force)
    checkpoint = checkpoint_file(checkpoint)
    loaded = load_model(checkpoint, torch.device("cpu"))
    model = _exportable(loaded.model, embedding)
    size = loaded.spec.image_size
    example = torch.zeros(batch or EXAMPLE_BATCH, 3, size, size)
    data = _to_onnx(model, example, dynamic=batch is None) if fmt == "onnx" else _to_torchscript(model, example)
    images, source = verification_batch(loaded.spec, pack, batch or VERIFY_IMAGES)
    with torch.no_grad():
        expected = model(images).float()
    got = (OnnxModel(data)(images) if fmt == "onnx" else _run_torchscript(data, images)).float()
    if embedding:  # compared as used, by direction: its scale follows the last batch norm's statistics, unbounded
        expected, got = F.normalize(expected), F.normalize(got)
    diff = float((got - expected).abs().max())
    if not diff <= TOLERANCE:
        raise TrainerError(f"exported {fmt} model differs from PyTorch by {diff:.2e} (over {TOLERANCE:g}) on {source}; "
                           "nothing written")
    sidecar = _sidecar(loaded, checkpoint, out, fmt, batch, embedding)
    sidecar["verification"] = {"max_abs_diff": diff, "tolerance": TOLERANCE, "inputs": source,
                               "runtime": _runtime_name(fmt), "l2_normalized": embedding}
    atomic_write_bytes(out, lambda f: f.write(data))
    write_json(sidecar_path(out), sidecar)
    return sidecar


def _exportable(model: nn.Module, embedding: bool) -> nn.Module:
    """The module to export: eval mode, plain memory format, the embedding output when asked."""
    model = model.to(memory_format=torch.contiguous_format).eval()
    if not embedding:
        return model
    if not takes_labels(model):  # only margin heads have an embedding of their own
        raise TrainerError("--embedding needs a checkpoint with a margin head (arcface or cosface); "
                           "this model only has logits")
    return embedder(model).eval()  # without the head: the class centres are not exported


def _to_onnx(model: nn.Module, example: torch.Tensor, dynamic: bool) -> bytes:
    """ONNX bytes from torch's torch.export-based exporter (dynamo=True, the default since torch 2.9)."""
    require("onnx", "export", "ONNX export")
    require("onnxscript", "export", "ONNX export")
    dynamic_shapes = ({0: torch.export.Dim("batch", min=1)},) if dynamic else None
    try:
        program = torch.onnx.export(model, (example,), input_names=["images"], output_names=["outputs"],
                                    opset_version=ONNX_OPSET, dynamo=True, external_data=False, verbose=False,
                                    dynamic_shapes=dynamic_shapes)
        return program.model_proto.SerializeToString()
    except (TrainerError, KeyboardInterrupt):
        raise
    except Exception as exc:  # noqa: BLE001 - exporter failures come in many types; the user gets one line
        raise TrainerError(f"ONNX export failed ({type(exc).__name__}: {first_line(exc)}); "
                           "try --format torchscript") from None


def _to_torchscript(model: nn.Module, example: torch.Tensor) -> bytes:
    """A traced TorchScript module's bytes (traced conv nets accept any batch size)."""
    buffer = io.BytesIO()
    with quiet_jit():
        try:
            traced = torch.jit.trace(model, example, check_trace=False)
        except Exception as exc:  # noqa: BLE001
            raise TrainerError(f"TorchScript trace failed ({type(exc).__name__}: {first_line(exc)}); "
                               "try --format onnx") from None
        torch.jit.save(traced, buffer)
    return buffer.getvalue()


def _run_torchscript(data: bytes, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return load_torchscript(data)(images)


def verification_batch(spec: PipelineSpec, pack: Path | None, count: int) -> tuple[torch.Tensor, str]:
    """`count` preprocessed images and where they came from: the first eval batch of `pack`, else seeded noise."""
    if pack is None:
        generator = torch.Generator().manual_seed(0)
        images = torch.randn(count, 3, spec.image_size, spec.image_size, generator=generator)
        return images, f"{count} random inputs (seed 0; pass --pack to check on real images)"
    from dali_pipes import PackReader, build_loader

    reader = PackReader(pack)
    split = next((s for s in ("test", "val", "train") if reader.split_counts()[s] > 0), None)
    if split is None:
        raise TrainerError(f"{pack}: the pack holds no images to verify with")
    loader = build_loader(reader, split, backend="torch", batch_size=count, train=False, device="cpu", num_workers=0,
                          spec=spec, drop_last=False)
    images = next(iter(loader))[0].float().contiguous()
    found = images.shape[0]
    if found < count:  # a fixed batch needs exactly `count`: repeat the few images there are
        images = images.repeat((count + found - 1) // found, 1, 1, 1)[:count]
    return images, f"{plural(found, 'image')} of the {split} split of {pack}"


def _sidecar(loaded: LoadedModel, checkpoint: Path, out: Path, fmt: str, batch: int | None,
             embedding: bool) -> dict[str, Any]:
    size = loaded.spec.image_size
    sidecar: dict[str, Any] = {
        "format": SIDECAR_FORMAT,
        "version": SIDECAR_VERSION,
        "model_file": out.name,
        "model_format": fmt,
        "output": "embedding" if embedding else "logits",
        "input": {"name": "images", "shape": [batch or "batch", 3, size, size], "dtype": "float32", "layout": "NCHW",
                  "channels": "RGB",
                  "values": "pixels / 255, then (x - mean) / std per channel, after resizing the whole image to "
                            "image_size x image_size (aspect ratio not kept)"},
        "spec": loaded.spec.to_dict(),
        "classes": list(loaded.classes),
        "trained_classes": list(loaded.trained_classes),  # what its logits cover (fewer when split by class)
        "arch": loaded.arch,
        "epoch": loaded.epoch,  # counted from 1, as metrics.jsonl and `trainer eval`
        "checkpoint": str(checkpoint),
        "torch": torch.__version__,
    }
    if embedding:
        sidecar["output_note"] = "the margin head's embedding, not L2-normalized: normalize before comparing by cosine"
    if fmt == "onnx":
        sidecar["opset"] = ONNX_OPSET
    return sidecar


def _runtime_name(fmt: str) -> str:
    if fmt == "torchscript":
        return f"torch.jit.load (torch {torch.__version__})"
    return f"onnxruntime {require('onnxruntime', 'export', 'ONNX verification').__version__} (CPU)"

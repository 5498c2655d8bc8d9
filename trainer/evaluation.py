"""`trainer eval` and `trainer predict`: closed-set figures and top-k classes of a model `trainer.inference` loads.

A checkpoint, and nothing else, rebuilds the model and its preprocessing.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from dali_pipes import PackReader, build_loader, choose_backend
from trainer.checkpoint import first_difference
from trainer.errors import TrainerError
from trainer.inference import image_batches, load_model, load_predictor
from trainer.loop import evaluate
from trainer.plots import confusion_matrix, most_confused, plot_confusion
from trainer.tta import with_tta

CONFUSION_PLOT_MAX_CLASSES = 50


def evaluate_checkpoint(checkpoint: Path, pack: Path, *, split: str = "test", topk: int = 5, batch_size: int = 64,
                        backend: str = "auto", device: torch.device, workers: int | None = None,
                        out: Path | None = None, warn: Any = print, tta: str | None = None) -> dict[str, Any]:
    """Loss, top-1..top-k, per-class accuracy of `checkpoint` on `split` of `pack`; plots with `out`.

    `tta` None is the checkpoint's own (its run's --tta), so the figures match its summary.json.
    """
    reader = PackReader(pack)
    loaded = load_model(checkpoint, device)
    tta = tta or loaded.tta
    if list(reader.classes) != loaded.classes:
        raise TrainerError(f"{pack}: its {reader.num_classes} classes differ from the checkpoint's "
                           f"{len(loaded.classes)} ({first_difference(reader.classes, loaded.classes)}); "
                           "evaluate on the pack it was trained for")
    refuse_unseen_classes(reader, split)
    if topk > reader.num_classes:
        warn(f"warning: --topk {topk} is above the {reader.num_classes} classes; using {reader.num_classes}")
        topk = reader.num_classes
    backend, note = choose_backend(backend, device)
    if note:
        warn(note)
    loader = build_loader(reader, split, backend=backend, batch_size=batch_size, train=False, device=device,
                          num_workers=workers, spec=loaded.spec)
    result = evaluate(with_tta(loaded.model, tta), loader, device=device, num_classes=reader.num_classes, topk=topk,
                      keep_predictions=True)
    targets, predictions = result.pop("targets").numpy(), result.pop("predictions").numpy()
    correct, count = result.pop("per_class_correct"), result.pop("per_class_count")
    result["per_class"] = {name: {"top1": correct[i] / count[i] if count[i] else None, "num_samples": count[i]}
                           for i, name in enumerate(reader.classes)}
    result.update(checkpoint=str(checkpoint), pack=str(pack), split=split, topk=topk, arch=loaded.arch,
                  epoch=loaded.epoch + 1, tta=tta)  # epochs count from 1, as in metrics.jsonl
    result["most_confused"] = most_confused(targets, predictions, reader.classes)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        if reader.num_classes <= CONFUSION_PLOT_MAX_CLASSES:
            matrix = confusion_matrix(targets, predictions, reader.num_classes)
            plot_confusion(matrix, reader.classes, out / f"confusion_{split}.png",
                           title=f"{loaded.arch} on {split} ({len(targets)} images)")
            result["confusion_png"] = str(out / f"confusion_{split}.png")
    return result


def refuse_unseen_classes(reader: PackReader, split: str) -> None:
    """Closed-set accuracy is undefined on classes without training images (an identity-disjoint split): say so."""
    trained = np.unique(reader.labels[reader.split_indices("train")])
    unseen = np.setdiff1d(np.unique(reader.labels[reader.split_indices(split)]), trained)
    if len(unseen):
        raise TrainerError(f"{reader.path}: {len(unseen)} classes of the {split} split have no training image (the "
                           "pack is split by class), so closed-set accuracy cannot be measured there; "
                           "use trainer verify")


def format_eval(result: dict[str, Any], max_classes: int = 30) -> list[str]:
    """Human-readable lines for `evaluate_checkpoint`'s result."""
    accs = "  ".join(f"top{k} {result[f'top{k}']:.4f}" for k in range(1, result["topk"] + 1))
    lines = [f"{result['checkpoint']} (epoch {result['epoch']}, {result['arch']}) on {result['split']} of "
             f"{result['pack']}:",
             f"  {result['num_samples']} images  loss {result['loss']:.4f}  {accs}"]
    if result.get("skipped_samples"):
        lines.append(f"  skipped {result['skipped_samples']} unreadable images (the log names them)")
    lines.append("  per class top-1:")
    per_class = sorted(result["per_class"].items(), key=lambda kv: (kv[1]["top1"] is None, kv[1]["top1"] or 0))
    for name, value in per_class[:max_classes]:
        acc = "n/a" if value["top1"] is None else f"{value['top1']:.3f}"
        lines.append(f"    {name}: {acc} ({value['num_samples']} images)")
    if len(per_class) > max_classes:
        lines.append(f"    ... {len(per_class) - max_classes} more (worst first; --json lists all)")
    if result["most_confused"]:
        lines.append("  most confused (true -> predicted):")
        lines += [f"    {p['true']} -> {p['predicted']}: {p['count']}" for p in result["most_confused"][:10]]
    if "confusion_png" in result:
        lines.append(f"  confusion matrix: {result['confusion_png']}")
    return lines


def predict_files(checkpoint: Path, inputs: Iterable[Path], *, topk: int = 5, device: torch.device,
                  batch_size: int = 32, warn: Any = print, tta: str | None = None) -> list[dict[str, Any]]:
    """Top-k classes with probabilities for each image file (folders are walked), with the checkpoint's preprocessing.

    `checkpoint` may also be an exported .onnx file; its sidecar gives preprocessing and classes.
    `tta` None is the checkpoint's own (its run's --tta; none for an ONNX file).

    Unreadable files are reported through `warn` and skipped.
    """
    loaded = load_predictor(checkpoint, device)
    model = with_tta(loaded.model, tta or loaded.tta)
    k = min(topk, len(loaded.classes))
    results: list[dict[str, Any]] = []
    for batch_paths, images in image_batches(inputs, loaded.spec, device, batch_size, warn):
        with torch.no_grad():
            probs = torch.softmax(model(images).float(), dim=1)
        top_p, top_i = probs.topk(k, dim=1)
        for path, p_row, i_row in zip(batch_paths, top_p.tolist(), top_i.tolist()):
            top = [{"class": loaded.classes[i], "probability": p} for p, i in zip(p_row, i_row)]
            results.append({"path": str(path), "top": top})
    return results

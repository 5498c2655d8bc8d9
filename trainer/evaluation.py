"""`trainer eval` and `trainer predict`: closed-set figures and top-k classes of a model `trainer.inference` loads.

A checkpoint, and nothing else, rebuilds the model and its preprocessing. A model trained
on a pack split by class had training images of some of its classes only: its closed-set
outputs cover those (`inference.closed_set`), and both commands say so.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from dali_pipes import PackReader, build_loader, check_output, check_output_folder, choose_backend, plural
from trainer.checkpoint import first_difference
from trainer.errors import TrainerError
from trainer.inference import checkpoint_file, closed_set, closed_set_note, image_batches, load_model, load_predictor
from trainer.metrics import SYNTHETIC_NOTE
from trainer.plots import confusion_matrix, most_confused, plot_confusion
from trainer.scoring import evaluate
from trainer.tta import with_tta

CONFUSION_PLOT_MAX_CLASSES = 50


@dataclass(frozen=True)
class ConfusionPlot:
    """The confusion matrix `trainer eval --out` draws, written after the figures are printed (`write`)."""

    matrix: np.ndarray
    classes: list[str]
    path: Path
    title: str

    def write(self) -> None:
        """The PNG at `path`."""
        plot_confusion(self.matrix, self.classes, self.path, title=self.title)


def evaluate_checkpoint(checkpoint: Path, pack: Path, *, split: str = "test", topk: int = 5, batch_size: int = 64,
                        backend: str = "auto", device: torch.device, workers: int | None = None,
                        out: Path | None = None, force: bool = False, warn: Any = print,
                        tta: str | None = None) -> tuple[dict[str, Any], ConfusionPlot | None]:
    """Loss, top-1..top-k, per-class accuracy of `checkpoint` on `split` of `pack`, and the plot for `out`.

    `out`'s folder and plot are checked before any work (an existing plot is replaced only
    with `force`); the caller writes the plot after it has shown the figures. `tta` None is
    the checkpoint's own (its run's --tta), so the figures match its summary.json.
    """
    reader = PackReader(pack)
    plot_path = _plot_path(out, split, reader.num_classes, force)
    checkpoint = checkpoint_file(checkpoint)
    loaded = load_model(checkpoint, device)
    tta = tta or loaded.tta
    if list(reader.classes) != loaded.classes:
        raise TrainerError(f"{pack}: its {plural(reader.num_classes, 'class')} differ from the checkpoint's "
                           f"{len(loaded.classes)} ({first_difference(reader.classes, loaded.classes)}); "
                           "evaluate on the pack it was trained for")
    refuse_unseen_classes(reader, split)
    trained = reader.classes_in("train")
    if topk > len(trained):
        warn(f"warning: --topk {topk} is above the {plural(len(trained), 'class')} it can predict; "
             f"using {len(trained)}")
        topk = len(trained)
    backend, note = choose_backend(backend, device)
    if note:
        warn(note)
    loader = build_loader(reader, split, backend=backend, batch_size=batch_size, train=False, device=device,
                          num_workers=workers, spec=loaded.spec)
    result = evaluate(with_tta(closed_set(loaded, trained), tta), loader, device=device, num_classes=reader.num_classes,
                      topk=topk,
                      keep_predictions=True)
    targets, predictions = result.pop("targets").numpy(), result.pop("predictions").numpy()
    correct, count = result.pop("per_class_correct"), result.pop("per_class_count")
    listed = set(trained)
    result["per_class"] = {name: {"top1": correct[i] / count[i] if count[i] else None, "num_samples": count[i]}
                           for i, name in enumerate(reader.classes) if name in listed}
    result.update(checkpoint=str(checkpoint), pack=str(pack), split=split, topk=topk, arch=loaded.arch,
                  epoch=loaded.epoch, num_classes=reader.num_classes, closed_set_classes=len(trained), backend=backend,
                  synthetic_data=backend == "synthetic", tta=tta)  # synthetic: random images, the figures measure speed
    result["most_confused"] = most_confused(targets, predictions, reader.classes)
    if plot_path is None:
        return result, None
    result["confusion_png"] = str(plot_path)
    plot = ConfusionPlot(confusion_matrix(targets, predictions, reader.num_classes), list(reader.classes), plot_path,
                         f"{loaded.arch} on {split} ({plural(len(targets), 'image')})")
    return result, plot


def _plot_path(out: Path | None, split: str, num_classes: int, force: bool) -> Path | None:
    """Where `eval --out` draws the confusion matrix (None: nothing to draw), checked before any work."""
    if out is None:
        return None
    check_output_folder(out)
    if num_classes > CONFUSION_PLOT_MAX_CLASSES:
        return None
    return check_output(out / f"confusion_{split}.png", force)


def refuse_unseen_classes(reader: PackReader, split: str) -> None:
    """Closed-set accuracy is undefined on classes without training images (an identity-disjoint split): say so."""
    unseen = set(reader.classes_in(split)) - set(reader.classes_in("train"))
    if unseen:
        raise TrainerError(f"{reader.path}: {plural(len(unseen), 'class')} of the {split} split "
                           f"{'has' if len(unseen) == 1 else 'have'} no training image (the pack is split by class), "
                           "so closed-set accuracy cannot be measured there; use trainer verify")


def format_eval(result: dict[str, Any], max_classes: int = 30) -> list[str]:
    """Human-readable lines for `evaluate_checkpoint`'s result."""
    accs = "  ".join(f"top{k} {result[f'top{k}']:.4f}" for k in range(1, result["topk"] + 1))
    synthetic = f"{SYNTHETIC_NOTE}: " if result.get("synthetic_data") else ""
    lines = [f"{synthetic}{result['checkpoint']} (epoch {result['epoch']}, {result['arch']}) on {result['split']} of "
             f"{result['pack']}:",
             f"  {plural(result['num_samples'], 'image')}  loss {result['loss']:.4f}  {accs}"]
    note = closed_set_note(result["closed_set_classes"], result["num_classes"])
    if note:
        lines.append(f"  {note}")
    if result.get("skipped_samples"):
        lines.append(f"  skipped {plural(result['skipped_samples'], 'unreadable image')} (the log names them)")
    lines.append("  per class top-1:")
    per_class = sorted(result["per_class"].items(), key=lambda kv: (kv[1]["top1"] is None, kv[1]["top1"] or 0))
    for name, value in per_class[:max_classes]:
        acc = "n/a" if value["top1"] is None else f"{value['top1']:.3f}"
        lines.append(f"    {name}: {acc} ({plural(value['num_samples'], 'image')})")
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

    `checkpoint` may also be a run folder (its best.pt) or an exported .onnx file, whose
    sidecar gives preprocessing and classes. Probabilities are over the classes the model
    trained on (all of them, unless its pack was split by class: then it says so through `warn`).
    `tta` None is the checkpoint's own (its run's --tta; none for an ONNX file).
    Unreadable files, and files the packer would reject as too small, are reported through `warn` and skipped.
    """
    loaded = load_predictor(checkpoint, device)
    note = closed_set_note(len(loaded.trained_classes), len(loaded.classes))
    if note:
        warn(f"note: {checkpoint}: {note}; predictions are among those")
    model = with_tta(closed_set(loaded), tta or loaded.tta)
    k = min(topk, len(loaded.trained_classes))
    results: list[dict[str, Any]] = []
    for batch_paths, images in image_batches(inputs, loaded.spec, device, batch_size, warn):
        with torch.no_grad():
            probs = torch.softmax(model(images).float(), dim=1)
        top_p, top_i = probs.topk(k, dim=1)
        for path, p_row, i_row in zip(batch_paths, top_p.tolist(), top_i.tolist()):
            top = [{"class": loaded.classes[i], "probability": p} for p, i in zip(p_row, i_row)]
            results.append({"path": str(path), "top": top})
    return results

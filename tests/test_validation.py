"""The validation seam: one object per run says what to measure, print and plot; curves.png draws what it says."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import trainer.plots as plots
from trainer.distributed import DistContext
from trainer.errors import TrainerError
from trainer.plots import BEST_MARKER, plot_curves
from trainer.validation import ClosedSetValidation, VerificationValidation

CPU = torch.device("cpu")


class FakeReader:
    """What a validation reads of a pack: split sizes, indices and the class count."""

    def __init__(self, labels: dict[str, np.ndarray], num_classes: int) -> None:
        self.labels_of, self.num_classes, self.path = labels, num_classes, Path("fake.h5")

    def split_counts(self) -> dict[str, int]:
        return {split: len(self.labels_of.get(split, ())) for split in ("train", "val", "test")}

    def split_indices(self, split: str) -> np.ndarray:
        return np.arange(len(self.labels_of[split]))


class FakeLoader:
    """An eval loader of fixed images (one feature per class, plus noise), in batches of 4."""

    def __init__(self, labels: np.ndarray, num_classes: int) -> None:
        generator = torch.Generator().manual_seed(0)
        self.labels = torch.as_tensor(labels)
        self.images = nn.functional.one_hot(self.labels, num_classes).float() * 3 + torch.randn(
            len(labels), num_classes, generator=generator)
        self.epochs: list[int] = []

    def set_epoch(self, epoch: int) -> None:
        self.epochs.append(epoch)

    def __iter__(self) -> Any:
        for start in range(0, len(self.labels), 4):
            yield self.images[start:start + 4], self.labels[start:start + 4]


class Tiny(nn.Module):
    """A classifier whose penultimate features are its input (what `models.embed` takes from `fc`)."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(num_classes, num_classes)
        with torch.no_grad():
            self.fc.weight.copy_(torch.eye(num_classes))
            self.fc.bias.zero_()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.fc(images)


def _validation(kind: type, labels: dict[str, np.ndarray], num_classes: int, built: list[str], topk: int = 1) -> Any:
    def eval_loader(split: str) -> FakeLoader:
        built.append(split)
        return FakeLoader(labels[split], num_classes)

    return kind(FakeReader(labels, num_classes), eval_loader, ctx=DistContext(), device=CPU, amp_dtype=None, topk=topk,
                seed=0)


def test_closed_set_builds_the_val_loader_once_and_names_its_keys() -> None:
    labels = {"val": np.arange(12) % 3, "test": np.arange(6) % 3}
    built: list[str] = []
    validation = _validation(ClosedSetValidation, labels, 3, built)
    model = Tiny(3)
    first, second = validation.validate(model, 0), validation.validate(model, 1)
    assert built == ["val"] and validation.loader("val").epochs == [0, 1]
    assert first == second and set(first) == {"val_loss"} | {f"val_top{k}" for k in range(1, 6)}
    images = validation.loader("val").images
    expected = nn.functional.cross_entropy(images, torch.as_tensor(labels["val"])).item()  # the model is the identity
    assert first["val_loss"] == pytest.approx(expected, rel=1e-6)
    assert first["val_top3"] == first["val_top5"] == 1.0  # k >= the 3 classes
    assert set(validation.validate(model, 2, suffix="_ema")) == {f"{k}_ema" for k in first}
    test = validation.test(model)
    assert built == ["val", "test"] and validation.test_split == "test" and test["test_samples"] == 6
    line = validation.epoch_line({"epoch": 1, "train_loss": 1.0, "train_top1": 0.5, **first, "lr": 1e-3,
                                  "images_per_second": 10.0, "data_wait_fraction": 0.1, "epoch_seconds": 2.0}, 3, True)
    assert line.startswith("epoch 1/3") and f"val loss {first['val_loss']:.4f}" in line and line.endswith("* best")
    with pytest.raises(TrainerError, match="--monitor val_auc needs a pack split by class"):
        validation.check_monitor(validation.reader, "val_auc")
    validation.check_monitor(validation.reader, "val_top1")


def test_closed_set_without_a_val_split_measures_nothing_and_draws_nothing() -> None:
    built: list[str] = []
    validation = _validation(ClosedSetValidation, {"test": np.arange(6) % 3}, 3, built)
    record = validation.validate(Tiny(3), 0)
    assert not validation.validates and built == [] and all(value is None for value in record.values())
    assert validation.curves() == [] and validation.val_text(record) == "val -"


def test_verification_builds_the_val_loader_once_and_names_its_keys() -> None:
    labels = {"val": np.repeat(np.arange(4), 5), "test": np.repeat(np.arange(4), 3)}
    built: list[str] = []
    validation = _validation(VerificationValidation, labels, 4, built)
    model = Tiny(4)
    first, second = validation.validate(model, 0), validation.validate(model, 1)
    assert built == ["val"] and first == second
    assert set(first) == {"val_auc", "val_accuracy", "val_eer", "val_rank1"}
    assert first["val_auc"] > 0.9  # one feature per identity: genuine pairs score far above impostors
    assert set(validation.validate(model, 2, suffix="_ema")) == {f"{k}_ema" for k in first}
    test = validation.test(model)
    assert built == ["val", "test"] and {"test_auc", "test_accuracy", "test_eer"} <= set(test)
    assert validation.test_line(test).startswith(f"test verification auc {test['test_auc']:.4f}")
    with pytest.raises(TrainerError, match="pass --monitor val_auc"):
        validation.check_monitor(validation.reader, "val_loss")


def _figure(monkeypatch: pytest.MonkeyPatch, records: list[dict], curves: list, tmp_path: Path) -> Any:
    figures = []
    monkeypatch.setattr(plots, "save_figure", lambda fig, path: figures.append(fig))
    plot_curves(records, tmp_path / "curves.png", curves, best_epoch=2)
    return figures[0]


def _legend_entries(figure: Any) -> list[tuple[str, Any]]:
    entries = []
    for ax in figure.axes:
        legend = ax.get_legend()
        labels = [text.get_text() for text in legend.get_texts()]
        lines = {line.get_label(): line for line in ax.get_lines()}
        entries += [(label, lines[label]) for label in labels]
    return entries


def test_curves_of_a_verification_run_have_data_behind_every_legend_entry(monkeypatch: pytest.MonkeyPatch,
                                                                           tmp_path: Path) -> None:
    # metrics.jsonl of a class-split run: verification keys only, no val loss or val top-k.
    records = [{"epoch": e, "train_loss": 2.0 / e, "train_top1": 0.2 * e, "val_auc": 0.6 + 0.1 * e,
                "val_accuracy": 0.55 + 0.1 * e, "val_eer": 0.4 - 0.1 * e, "val_rank1": 0.3, "lr": 1e-3 / e}
               for e in (1, 2, 3)]
    validation = _validation(VerificationValidation, {"val": np.zeros(0)}, 2, [])
    entries = _legend_entries(_figure(monkeypatch, records, validation.curves(), tmp_path))
    labels = [label for label, _ in entries]
    assert "val verification AUC" in labels and "val verification accuracy" in labels
    assert "val" not in labels and "val top-1" not in labels
    for label, line in entries:  # every legend entry draws at least one finite value
        assert np.isfinite(np.asarray(line.get_ydata(), dtype=float)).any(), label
    marker_style = (BEST_MARKER["color"], BEST_MARKER["linestyle"])
    markers = [line for label, line in entries if label.startswith("best")]
    assert len(markers) == 3  # one per panel
    for line in markers:
        assert (line.get_color(), line.get_linestyle()) == (BEST_MARKER["color"], ":")
    for label, line in entries:
        if not label.startswith("best"):
            assert (line.get_color(), line.get_linestyle()) != marker_style, label
            assert line.get_color() != BEST_MARKER["color"], label


def test_curves_of_a_closed_set_run_show_val_top_k(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    records = [{"epoch": e, "train_loss": 1.0 / e, "val_loss": 1.1 / e, "train_top1": 0.1 * e, "val_top1": 0.1 * e,
                **{f"val_top{k}": min(1.0, 0.1 * e * k) for k in range(2, 11)}, "lr": 0.1 / e} for e in (1, 2, 3)]
    validation = _validation(ClosedSetValidation, {"val": np.arange(12) % 3}, 12, [], topk=10)
    entries = dict(_legend_entries(_figure(monkeypatch, records, validation.curves(), tmp_path)))
    assert {"train", "val", "train top-1", "val top-1", "val top-10", "lr (end of epoch)"} <= set(entries)
    assert list(entries["val top-10"].get_ydata()) == [r["val_top10"] for r in records]
    assert not any(math.isnan(v) for v in entries["val"].get_ydata())

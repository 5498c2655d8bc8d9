"""Figures: training curves and confusion matrices (matplotlib, no display needed)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from dali_pipes import atomic_write_bytes


def pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend (imported on use: most commands draw nothing)."""
    import matplotlib

    matplotlib.use("Agg")  # files only; works without a display
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path) -> None:
    """Write `fig` as a PNG, atomically."""

    atomic_write_bytes(path, lambda f: fig.savefig(f, format="png", dpi=110, bbox_inches="tight"))


@dataclass(frozen=True)
class Curve:
    """One series of curves.png: the values of a metrics.jsonl key, drawn on the loss or the accuracy panel."""

    key: str
    label: str
    panel: str  # "loss" or "accuracy"
    color: str
    marker: str = "s"
    linestyle: str = "-"


TRAIN_CURVES = (Curve("train_loss", "train", "loss", "tab:blue", "o"),
                Curve("train_top1", "train top-1", "accuracy", "tab:blue", "o"))
LR_CURVE = Curve("lr", "lr (end of epoch)", "learning rate", "tab:green", "o")
# The best-epoch marker: a colour and a line style no curve uses (validation curves take theirs from CURVE_COLORS).
BEST_MARKER = {"color": "tab:red", "linestyle": ":"}
CURVE_COLORS = ("tab:orange", "tab:purple", "tab:brown", "tab:olive", "tab:cyan", "tab:pink")


def plot_curves(records: Sequence[dict[str, Any]], path: Path, curves: Sequence[Curve] = (), title: str = "",
                best_epoch: int | None = None) -> None:
    """Loss, accuracy and learning rate against epoch (as `records` number them), as one PNG.

    The train curves and the learning rate are always drawn; `curves` adds the run's
    validation curves (its `trainer.validation` object says which). `best_epoch` (same
    numbering) is marked on every panel.
    """
    plt = pyplot()
    epochs = [r["epoch"] for r in records]
    fig, (ax_loss, ax_acc, ax_lr) = plt.subplots(1, 3, figsize=(15, 4), layout="constrained")
    panels = {"loss": ax_loss, "accuracy": ax_acc, "learning rate": ax_lr}
    for curve in (*TRAIN_CURVES, *curves, LR_CURVE):
        values = [np.nan if r.get(curve.key) is None else r[curve.key] for r in records]
        panels[curve.panel].plot(epochs, values, marker=curve.marker, linestyle=curve.linestyle, color=curve.color,
                                 label=curve.label)
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="accuracy", ylim=(0, 1.02))
    ax_lr.set(xlabel="epoch", ylabel="learning rate", title="learning rate")
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))  # 2e-3, not 0.00200 over the next panel
    for ax in panels.values():
        if best_epoch is not None:
            ax.axvline(best_epoch, alpha=0.6, label=f"best (epoch {best_epoch})", **BEST_MARKER)
        ax.grid(alpha=0.3)
        ax.legend()
        ax.xaxis.get_major_locator().set_params(integer=True)
    if title:
        fig.suptitle(title)
    save_figure(fig, path)
    plt.close(fig)


def confusion_matrix(targets: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts [true, predicted]."""
    counts = np.bincount(targets * num_classes + predictions, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def most_confused(targets: np.ndarray, predictions: np.ndarray, classes: Sequence[str],
                  top: int = 20) -> list[dict[str, Any]]:
    """The most frequent (true, predicted) mistakes, without a K x K matrix (fine for 7,000 classes)."""
    wrong = targets != predictions
    if wrong.any():
        pairs, counts = np.unique(np.stack([targets[wrong], predictions[wrong]], 1), axis=0, return_counts=True)
    else:
        pairs, counts = np.zeros((0, 2), int), np.zeros(0, int)
    order = np.argsort(-counts, kind="stable")[:top]
    return [{"true": classes[pairs[i][0]], "predicted": classes[pairs[i][1]], "count": int(counts[i])} for i in order]


def plot_confusion(matrix: np.ndarray, classes: Sequence[str], path: Path, title: str = "") -> None:
    """Row-normalized confusion matrix as a PNG (meant for up to ~50 classes)."""
    plt = pyplot()
    k = len(classes)
    rows = matrix.sum(1, keepdims=True)
    normalized = np.divide(matrix, rows, out=np.zeros_like(matrix, dtype=float), where=rows > 0)
    size = min(4 + 0.35 * k, 20)
    fig, ax = plt.subplots(figsize=(size, size))
    im = ax.imshow(normalized, cmap="Blues", vmin=0, vmax=1)
    ax.set(xticks=range(k), yticks=range(k), xlabel="predicted", ylabel="true",
           title=title or "confusion matrix (row-normalized)")
    ax.set_xticklabels(classes, rotation=90, fontsize=8)
    ax.set_yticklabels(classes, fontsize=8)
    if k <= 20:
        for i in range(k):
            for j in range(k):
                if matrix[i, j]:
                    ax.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if normalized[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046)
    save_figure(fig, path)
    plt.close(fig)


def plot_roc(far: np.ndarray, tar: np.ndarray, path: Path, title: str = "") -> None:
    """Verification ROC: true accept rate against false accept rate, FAR on a log axis."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    far, tar = np.asarray(far), np.asarray(tar)
    shown = far > 0  # log axis: FAR 0 has no place on it
    ax.step(far[shown], tar[shown], where="post")
    ax.set_xscale("log")
    ax.set_xlim(max(far[shown].min(), 1e-5) if shown.any() else 1e-4, 1.0)
    ax.set_ylim(0.0, 1.01)
    ax.set_xlabel("false accept rate (FAR)")
    ax.set_ylabel("true accept rate (TAR)")
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title(title, fontsize=9)
    save_figure(fig, path)
    plt.close(fig)

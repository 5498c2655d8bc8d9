"""How the images of a pack are assigned to train, val and test (the codes of `pack_format.SPLITS`)."""
from __future__ import annotations

import numpy as np

from .words import plural


def stratified_split(labels: np.ndarray, val_ratio: float, test_ratio: float, seed: int) -> np.ndarray:
    """Assign each sample to train (0), val (1) or test (2), stratified by label.

    Per class, val and test get floor(n * ratio) samples, and the remaining whole-set
    quota (round(N * ratio) overall) goes to the classes with the largest fractional
    parts, so both the totals and every class's proportions follow the ratios. Every
    class keeps at least one training sample. Which samples go where is seeded.
    """
    labels = np.asarray(labels)
    _check_ratios(val_ratio, test_ratio)
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    n_val = _apportion(counts, val_ratio, rng)
    n_test = _apportion(counts, test_ratio, rng)
    # Keep one training image per class: take back from test first, then from val.
    for i, n in enumerate(counts):
        while n_val[i] + n_test[i] > n - 1:
            if n_test[i] > 0:
                n_test[i] -= 1
            else:
                n_val[i] -= 1
    splits = np.zeros(len(labels), dtype=np.uint8)
    for i, cls in enumerate(classes):
        members = rng.permutation(np.flatnonzero(labels == cls))
        splits[members[: n_val[i]]] = 1
        splits[members[n_val[i] : n_val[i] + n_test[i]]] = 2
    return splits


def class_split(labels: np.ndarray, val_ratio: float, test_ratio: float, seed: int) -> np.ndarray:
    """Assign whole classes to train (0), val (1) or test (2): identity-disjoint splits.

    val and test get round(K * ratio) of the K classes, at least 2 each when their ratio
    is above 0, and train keeps at least 2. Which classes go where is seeded. Raises
    `ValueError` when there are too few classes for that.
    """
    labels = np.asarray(labels)
    _check_ratios(val_ratio, test_ratio)
    classes = np.unique(labels)
    n_val, n_test = (0 if r == 0 else max(2, int(round(len(classes) * r))) for r in (val_ratio, test_ratio))
    if len(classes) - n_val - n_test < 2:
        raise ValueError(f"splitting by class needs at least 2 classes for train and 2 for each of val and test "
                         f"with a ratio above 0; {plural(len(classes), 'class')} cannot give {n_val} val and {n_test} "
                         "test classes")
    order = np.random.default_rng(seed).permutation(classes)
    splits = np.zeros(len(labels), dtype=np.uint8)
    splits[np.isin(labels, order[:n_val])] = 1
    splits[np.isin(labels, order[n_val : n_val + n_test])] = 2
    return splits


def split_kind(labels: np.ndarray, splits: np.ndarray) -> str:
    """'class' when val and test (not both empty) hold no class that train holds, else 'image'."""
    labels, splits = np.asarray(labels), np.asarray(splits)
    held_out = splits != 0
    if not held_out.any():
        return "image"
    return "class" if not np.isin(labels[held_out], labels[~held_out]).any() else "image"


def _check_ratios(val_ratio: float, test_ratio: float) -> None:
    if val_ratio < 0 or test_ratio < 0 or val_ratio + test_ratio >= 1:
        raise ValueError("need val_ratio >= 0, test_ratio >= 0 and val_ratio + test_ratio < 1")


def _apportion(counts: np.ndarray, ratio: float, rng: np.random.Generator) -> np.ndarray:
    exact = counts * ratio
    base = np.floor(exact).astype(np.int64)
    remaining = int(round(counts.sum() * ratio)) - int(base.sum())
    if remaining > 0:
        # Largest fractional part first; a random key breaks ties without favouring early classes.
        order = np.lexsort((rng.random(len(counts)), -(exact - base)))
        base[order[:remaining]] += 1
    return base

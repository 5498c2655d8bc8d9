"""Face-style evaluation over embeddings: pairs, ROC, AUC, EER, TAR@FAR, k-fold accuracy, rank-k identification.

Pure functions on numpy arrays: no model, no data code. A verification score is the
cosine similarity of two L2-normalized embeddings; a pair is predicted "same" when its
score is at least the threshold.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

FAR_TARGETS = (1e-1, 1e-2, 1e-3, 1e-4)


@dataclass(frozen=True)
class Roc:
    """Points of a ROC curve, from the strictest threshold (+inf: nothing accepted) to the loosest."""

    far: np.ndarray  # false accept rate: impostor pairs scored >= threshold / impostor pairs
    tar: np.ndarray  # true accept rate: genuine pairs scored >= threshold / genuine pairs
    thresholds: np.ndarray
    num_positives: int
    num_negatives: int


@dataclass(frozen=True)
class Pairs:
    """Index pairs into an embedding array, and whether each pair shows one identity."""

    a: np.ndarray
    b: np.ndarray
    same: np.ndarray  # bool

    def __len__(self) -> int:
        return len(self.same)


def _check_scores(scores: np.ndarray, same: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores, same = np.asarray(scores, dtype=np.float64), np.asarray(same, dtype=bool)
    if scores.shape != same.shape or scores.ndim != 1:
        raise ValueError("scores and same must be 1-D arrays of one length")
    if not same.any() or same.all():
        raise ValueError("need at least one genuine and one impostor pair")
    return scores, same


def roc_curve(scores: np.ndarray, same: np.ndarray) -> Roc:
    """ROC over every distinct score used as a threshold (ties move together, so AUC counts them as half)."""
    scores, same = _check_scores(scores, same)
    order = np.argsort(-scores, kind="stable")
    sorted_scores, sorted_same = scores[order], same[order]
    tp = np.cumsum(sorted_same)
    fp = np.cumsum(~sorted_same)
    # Only the last position of each run of equal scores is a threshold.
    last = np.r_[sorted_scores[1:] != sorted_scores[:-1], True]
    n_pos, n_neg = int(same.sum()), int((~same).sum())
    far = np.r_[0.0, fp[last] / n_neg]
    tar = np.r_[0.0, tp[last] / n_pos]
    return Roc(far, tar, np.r_[np.inf, sorted_scores[last]], n_pos, n_neg)


def auc(roc: Roc) -> float:
    """Area under the ROC curve (trapezoids): P(genuine score > impostor score) + half P(equal)."""
    return float(np.sum(np.diff(roc.far) * (roc.tar[1:] + roc.tar[:-1]) / 2.0))


def eer(roc: Roc) -> float:
    """Equal error rate: where FAR equals the false reject rate 1 - TAR, interpolated linearly on the curve."""
    gap = roc.far - (1.0 - roc.tar)  # rises from -1 to +1 along the curve
    j = int(np.argmax(gap >= 0))
    if j == 0 or gap[j] == 0:
        return float(roc.far[j])
    # Between points j-1 and j both FAR and FRR change linearly; solve for the crossing.
    t = -gap[j - 1] / (gap[j] - gap[j - 1])
    return float(roc.far[j - 1] + t * (roc.far[j] - roc.far[j - 1]))


def tar_at_far(roc: Roc, targets: Sequence[float] = FAR_TARGETS) -> dict[str, float]:
    """Highest TAR with FAR <= target, for each target estimable from the impostor pairs (at least 1 / target of them)."""
    result = {}
    for target in targets:
        if roc.num_negatives * target < 1.0 - 1e-9:
            continue
        allowed = roc.far <= target + 1e-12
        result[f"{target:g}"] = float(roc.tar[allowed].max())
    return result


def best_threshold(scores: np.ndarray, same: np.ndarray) -> tuple[float, float]:
    """(threshold, accuracy) maximizing the accuracy of `score >= threshold`; thresholds lie midway between scores."""
    roc = roc_curve(scores, same)
    n = roc.num_positives + roc.num_negatives
    accuracy = (roc.tar * roc.num_positives + (1.0 - roc.far) * roc.num_negatives) / n
    i = int(np.argmax(accuracy))
    distinct = roc.thresholds[1:]  # descending
    # Point i accepts scores >= distinct[i - 1]; any cut between it and the next lower score does the same.
    if i == 0:
        threshold = distinct[0] + 1.0
    elif i == len(distinct):
        threshold = distinct[-1] - 1.0
    else:
        threshold = (distinct[i - 1] + distinct[i]) / 2.0
    return float(threshold), float(accuracy[i])


def kfold_accuracy(scores: np.ndarray, same: np.ndarray, folds: int = 10, seed: int = 0) -> tuple[float, float]:
    """LFW-protocol accuracy: per fold, the threshold best on the other folds is applied to it.

    Pairs are dealt into `folds` folds after a seeded shuffle. Returns (mean accuracy
    over folds, mean of the chosen thresholds).
    """
    scores, same = _check_scores(scores, same)
    folds = max(2, min(folds, len(scores)))
    parts = np.array_split(np.random.default_rng(seed).permutation(len(scores)), folds)
    accuracies, thresholds = [], []
    for k, test in enumerate(parts):
        train = np.concatenate([p for i, p in enumerate(parts) if i != k])
        threshold, _ = best_threshold(scores[train], same[train])
        accuracies.append(float(((scores[test] >= threshold) == same[test]).mean()))
        thresholds.append(threshold)
    return float(np.mean(accuracies)), float(np.mean(thresholds))


def rank_identification(embeddings: np.ndarray, labels: np.ndarray, ks: Sequence[int] = (1, 5)) -> dict[str, float | None]:
    """Rank-k identification: gallery = each identity's first image, probes = the rest.

    A probe counts at rank k when its identity is among the k gallery entries most
    similar to it (cosine; ties broken against it). None where there are no probes.
    """
    embeddings, labels = np.asarray(embeddings, dtype=np.float64), np.asarray(labels)
    identities, first = np.unique(labels, return_index=True)
    probe = np.ones(len(labels), dtype=bool)
    probe[first] = False
    if not probe.any():
        return {f"rank{k}": None for k in ks}
    gallery = _normalize(embeddings[first])
    probes = _normalize(embeddings[probe])
    similarity = probes @ gallery.T
    true_column = np.searchsorted(identities, labels[probe])
    true_score = similarity[np.arange(len(true_column)), true_column]
    # Pessimistic ties: every other entry scoring at least as high ranks above the true one.
    rank = (similarity >= true_score[:, None]).sum(1)
    return {f"rank{k}": float((rank <= k).mean()) for k in ks}


def _normalize(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def cosine_scores(embeddings: np.ndarray, pairs: Pairs) -> np.ndarray:
    """Cosine similarity of each pair's two embeddings."""
    e = _normalize(np.asarray(embeddings, dtype=np.float64))
    return np.einsum("ij,ij->i", e[pairs.a], e[pairs.b])


def draw_pairs(labels: np.ndarray, num_pairs: int, seed: int = 0) -> Pairs:
    """`num_pairs` genuine and `num_pairs` impostor index pairs drawn (seeded, with replacement) from `labels`.

    A genuine pair: a random image of an identity with two or more images and another
    image of it. An impostor pair: two random images of different identities.
    """
    labels = np.asarray(labels)
    classes, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    if len(classes) < 2:
        raise ValueError(f"drawing pairs needs at least 2 identities, found {len(classes)}")
    eligible = np.flatnonzero(counts[inverse] >= 2)
    if len(eligible) == 0:
        raise ValueError("drawing genuine pairs needs an identity with at least 2 images")
    rng = np.random.default_rng(seed)
    members = {c: np.flatnonzero(inverse == c) for c in np.unique(inverse[eligible])}
    pos_a = rng.choice(eligible, num_pairs)
    pos_b = np.empty_like(pos_a)
    for i, a in enumerate(pos_a):
        others = members[inverse[a]]
        j = rng.integers(len(others) - 1)
        pos_b[i] = others[j] if others[j] != a else others[-1]  # uniform over the other images
    neg_a = rng.integers(len(labels), size=num_pairs)
    neg_b = np.empty_like(neg_a)
    for i, a in enumerate(neg_a):
        others = np.flatnonzero(inverse != inverse[a])
        neg_b[i] = others[rng.integers(len(others))]
    same = np.r_[np.ones(num_pairs, dtype=bool), np.zeros(num_pairs, dtype=bool)]
    return Pairs(np.r_[pos_a, neg_a].astype(np.int64), np.r_[pos_b, neg_b].astype(np.int64), same)


def parse_pairs(text: str, source: str = "pairs file") -> list[tuple[str, str, bool]]:
    """Lines `path_a,path_b,same` (same: 1/0 or true/false); blank lines, `#` comments and a header skipped."""
    pairs = []
    truth = {"1": True, "true": True, "0": False, "false": False}
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        fields = [f.strip() for f in line.split(",")]
        if len(fields) != 3 or fields[2].lower() not in truth:
            if number == 1 and len(fields) == 3:
                continue  # a header such as path_a,path_b,same
            raise ValueError(f"{source}, line {number}: expected path_a,path_b,same (same: 1 or 0), got {line[:80]!r}")
        pairs.append((fields[0], fields[1], truth[fields[2].lower()]))
    if not pairs:
        raise ValueError(f"{source}: no pairs found (expected lines path_a,path_b,same)")
    return pairs


def read_pairs(path: Path, known: Sequence[str]) -> Pairs:
    """A pairs file resolved against `known` paths (the i-th embedding's path); unknown paths are an error."""
    index = {p: i for i, p in enumerate(known)}
    rows = parse_pairs(Path(path).read_text(), str(path))
    missing = [p for row in rows for p in row[:2] if p not in index]
    if missing:
        raise ValueError(f"{path}: {len(missing)} paths are not in the split, e.g. {missing[0]!r} (paths are relative to the packed folder)")
    a = np.array([index[r[0]] for r in rows], dtype=np.int64)
    b = np.array([index[r[1]] for r in rows], dtype=np.int64)
    return Pairs(a, b, np.array([r[2] for r in rows], dtype=bool))


def verification_report(embeddings: np.ndarray, labels: np.ndarray, pairs: Pairs, seed: int = 0) -> tuple[dict[str, Any], Roc]:
    """The figures of `trainer verify` (num_pairs, auc, eer, accuracy, threshold, tar_at_far, rank1, rank5) and the ROC."""
    scores = cosine_scores(embeddings, pairs)
    roc = roc_curve(scores, pairs.same)
    accuracy, threshold = kfold_accuracy(scores, pairs.same, seed=seed)
    figures = {"num_pairs": len(pairs), "auc": auc(roc), "eer": eer(roc), "accuracy": accuracy, "threshold": threshold,
               "tar_at_far": tar_at_far(roc), **rank_identification(embeddings, labels)}
    return figures, roc

"""Face-style evaluation over embeddings: ROC, AUC, EER, TAR@FAR, k-fold accuracy, rank-k identification.

Functions on arrays, no model and no data code. A verification score is the cosine
similarity of two L2-normalized embeddings; a pair is predicted "same" when its score is
at least the threshold. Every pair of a split is scored when there are at most
`MAX_ALL_PAIRS`: blocked matrix products on the embeddings' device, counted into fine
histograms of the score rather than kept. Above that, or when asked for a number of
pairs, pairs are drawn without replacement and their scores sorted exactly.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from trainer.pairs import Pairs, check_labels, draw_pairs, pair_counts

FAR_TARGETS = (1e-1, 1e-2, 1e-3, 1e-4)
FOLDS = 10  # the LFW protocol's 10-fold accuracy
MAX_ALL_PAIRS = 10**9  # every pair is scored up to this many (28,000 images hold 392 million)
SAMPLED_PAIRS = 10**6  # of each kind, drawn where a split holds more than MAX_ALL_PAIRS pairs
MAX_SAMPLED_PAIRS = 10**7  # of each kind: sampled scores are sorted in memory
# All-pairs scores are counted in fixed-width bins of [-1, 1] instead of being sorted
# (392 million scores would take 3 GB to sort; the histograms take 42 MB). Binning treats
# two scores in one bin as tied, so the figures differ from those of the exact sorted
# scores only through pairs that share a bin: AUC by at most half the share of
# genuine-impostor combinations sharing a bin, EER, TAR@FAR and accuracy by at most the
# share of one kind's pairs in one bin. A bin is 2 / 2^18 = 7.6e-6 wide, about ten times
# the float32 rounding of a 512-d cosine, so one bin holds under 1e-4 of a kind's pairs
# wherever the score density stays under 13 per unit (a normal of std 0.03; random 512-d
# embeddings have 0.044, trained ones spread wider): the stated tolerance is 1e-4
# (tests/test_verification.py checks it against scores enumerated and sorted).
HISTOGRAM_BINS = 2**18
BLOCK_ELEMENTS = 2**24  # scores per matrix product: 64 MB of float32 plus 128 MB of bin indices


@dataclass(frozen=True)
class Roc:
    """Points of a ROC curve, from the strictest threshold (+inf: nothing accepted) to the loosest."""

    far: np.ndarray  # false accept rate: impostor pairs scored >= threshold / impostor pairs
    tar: np.ndarray  # true accept rate: genuine pairs scored >= threshold / genuine pairs
    thresholds: np.ndarray
    num_positives: int
    num_negatives: int


@dataclass(frozen=True)
class ScoreTable:
    """Pairs counted per score level, levels ascending: one exact score (low == high) or one histogram bin."""

    low: np.ndarray
    high: np.ndarray
    genuine: np.ndarray  # pairs at each level
    impostor: np.ndarray


def table_of_scores(scores: np.ndarray, same: np.ndarray) -> ScoreTable:
    """Each distinct score a level."""
    values, inverse = np.unique(np.asarray(scores, dtype=np.float64), return_inverse=True)
    same = np.asarray(same, dtype=bool)
    return ScoreTable(values, values, np.bincount(inverse[same], minlength=len(values)),
                      np.bincount(inverse[~same], minlength=len(values)))


def bin_edges(bins: int = HISTOGRAM_BINS) -> np.ndarray:
    """The `bins + 1` edges of equal bins of [-1, 1]; bin k holds scores in [edge k, edge k + 1)."""
    return np.linspace(-1.0, 1.0, bins + 1)


def table_of_histogram(counts: np.ndarray) -> ScoreTable:
    """Each non-empty bin of `counts[kind, bin]` (kind 0 impostor, 1 genuine) a level."""
    edges = bin_edges(counts.shape[-1])
    used = np.flatnonzero(counts.sum(0))
    return ScoreTable(edges[used], edges[used + 1], counts[1, used], counts[0, used])


def _check_scores(scores: np.ndarray, same: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores, same = np.asarray(scores, dtype=np.float64), np.asarray(same, dtype=bool)
    if scores.shape != same.shape or scores.ndim != 1:
        raise ValueError("scores and same must be 1-D arrays of one length")
    if not same.any() or same.all():
        raise ValueError("need at least one genuine and one impostor pair")
    return scores, same


def roc_of(table: ScoreTable) -> Roc:
    """ROC with each level's lower bound as a threshold: pairs of one level move together (AUC counts them as half)."""
    tp, fp = np.cumsum(table.genuine[::-1]), np.cumsum(table.impostor[::-1])
    n_pos, n_neg = int(tp[-1]), int(fp[-1])
    return Roc(np.r_[0.0, fp / n_neg], np.r_[0.0, tp / n_pos], np.r_[np.inf, table.low[::-1]], n_pos, n_neg)


def roc_curve(scores: np.ndarray, same: np.ndarray) -> Roc:
    """ROC over every distinct score used as a threshold (ties move together, so AUC counts them as half)."""
    return roc_of(table_of_scores(*_check_scores(scores, same)))


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
    """Highest TAR with FAR <= target, for each target the impostor pairs can estimate (at least 1 / target of them)."""
    result = {}
    for target in targets:
        if roc.num_negatives * target < 1.0 - 1e-9:
            continue
        allowed = roc.far <= target + 1e-12
        result[f"{target:g}"] = float(roc.tar[allowed].max())
    return result


def best_cut(table: ScoreTable) -> tuple[float, float]:
    """(threshold, accuracy) of the most accurate cut between levels (the strictest of equals), midway between them."""
    # Accepting the top i levels: their genuine pairs are right, and so are the impostors of the levels below.
    correct = np.r_[0, np.cumsum(table.genuine[::-1])] + np.r_[np.cumsum(table.impostor)[::-1], 0]
    i = int(np.argmax(correct))  # the cut accepting the top i levels
    low, high = table.low[::-1], table.high[::-1]  # descending
    if i == 0:
        threshold = high[0] + 1.0
    elif i == len(low):
        threshold = low[-1] - 1.0
    else:
        threshold = (low[i - 1] + high[i]) / 2.0
    return float(threshold), float(correct[i] / max(table.genuine.sum() + table.impostor.sum(), 1))


def best_threshold(scores: np.ndarray, same: np.ndarray) -> tuple[float, float]:
    """(threshold, accuracy) maximizing the accuracy of `score >= threshold`; thresholds lie midway between scores."""
    return best_cut(table_of_scores(*_check_scores(scores, same)))


def kfold_accuracy(scores: np.ndarray, same: np.ndarray, folds: int = FOLDS, seed: int = 0) -> tuple[float, float]:
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
        threshold, _ = best_cut(table_of_scores(scores[train], same[train]))
        accuracies.append(float(((scores[test] >= threshold) == same[test]).mean()))
        thresholds.append(threshold)
    return float(np.mean(accuracies)), float(np.mean(thresholds))


def kfold_accuracy_of_histograms(counts: np.ndarray) -> tuple[float, float]:
    """`kfold_accuracy` over `counts[fold, kind, bin]`; a test fold's bin is accepted when its centre reaches the
    threshold chosen on the other folds."""
    edges = bin_edges(counts.shape[-1])
    used = np.flatnonzero(counts.sum((0, 1)))
    counts, low, high = counts[:, :, used], edges[used], edges[used + 1]
    total = counts.sum(0)
    accuracies, thresholds = [], []
    for test in counts:
        train = total - test
        levels = np.flatnonzero(train.sum(0))
        if not test.any() or not len(levels):
            continue
        threshold, _ = best_cut(ScoreTable(low[levels], high[levels], train[1, levels], train[0, levels]))
        accepted = (low + high) / 2.0 >= threshold
        accuracies.append(float((test[1, accepted].sum() + test[0, ~accepted].sum()) / test.sum()))
        thresholds.append(threshold)
    return float(np.mean(accuracies)), float(np.mean(thresholds))


def rank_identification(embeddings: np.ndarray, labels: np.ndarray,
                        ks: Sequence[int] = (1, 5)) -> dict[str, float | None]:
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


def unit_rows(embeddings: np.ndarray | torch.Tensor) -> torch.Tensor:
    """L2-normalized rows as a floating-point tensor, on the device the embeddings are on (numpy: the CPU)."""
    e = torch.as_tensor(embeddings)
    if not e.is_floating_point():
        e = e.float()
    if not bool(torch.isfinite(e).all()):
        raise ValueError("the embeddings hold NaN or infinite values")
    return torch.nn.functional.normalize(e, dim=1)


def cosine_scores(embeddings: np.ndarray | torch.Tensor, pairs: Pairs) -> np.ndarray:
    """Cosine similarity of each pair's two embeddings, computed in chunks on the embeddings' device."""
    e = unit_rows(embeddings)
    a, b = torch.as_tensor(pairs.a, device=e.device), torch.as_tensor(pairs.b, device=e.device)
    step = max(1, BLOCK_ELEMENTS // max(e.shape[1], 1))
    chunks = [(e[a[i : i + step]] * e[b[i : i + step]]).sum(1) for i in range(0, len(a), step)]
    return torch.cat(chunks).double().cpu().numpy() if chunks else np.zeros(0)


def fold_groups(n: int, folds: int, seed: int) -> np.ndarray:
    """Each of `n` images dealt to one of `folds` groups of equal size (within one), seeded.

    Pair (i, j) belongs to fold (group i + group j) mod `folds`: each fold then holds
    about the same number of pairs, and of each kind, whatever the identities' sizes.
    """
    return np.random.default_rng(seed).permutation(n) % folds


def score_histograms(embeddings: np.ndarray | torch.Tensor, labels: np.ndarray, *, seed: int = 0, folds: int = FOLDS,
                     bins: int = HISTOGRAM_BINS, block: int = BLOCK_ELEMENTS) -> np.ndarray:
    """Every pair's cosine score counted as `counts[fold, kind, bin]` (kind 0 impostor, 1 genuine), int64.

    Works on the embeddings' device, a block of rows at a time, with the images ordered
    by `fold_groups` group: between two groups a pair's fold is one number.
    """
    group = fold_groups(len(labels), folds, seed)
    order = np.argsort(group, kind="stable")
    bounds = np.searchsorted(group[order], np.arange(folds + 1))  # group g: rows bounds[g] .. bounds[g + 1]
    e = unit_rows(embeddings)
    device = e.device
    e = e[torch.as_tensor(order, device=device)]
    identity = torch.as_tensor(np.unique(np.asarray(labels), return_inverse=True)[1][order], device=device)
    # One bin per pair: (fold * 2 + kind) * bins + score bin, and a spill bin for the pairs j <= i of a block.
    spill = folds * 2 * bins
    scaled = e * (bins / 2)  # a power of two: exact, and it saves a pass over every block
    counts: torch.Tensor | None = None
    pending: list[torch.Tensor] = []  # small blocks are counted together: each count passes over all the bins
    for g in range(folds):
        for start, stop in _row_blocks(int(bounds[g]), int(bounds[g + 1]), len(e), block):
            # (score + 1) * bins / 2 >= 0 after the clamp, so the cast to integers floors it.
            index = (scaled[start:stop] @ e[start:].T).add_(bins / 2).clamp_(0, bins - 1).long()
            index.add_(identity[start:stop, None] == identity[None, start:], alpha=bins)
            for h in range(g, folds):
                index[:, max(bounds[h], start) - start : bounds[h + 1] - start] += (g + h) % folds * 2 * bins
            rows = stop - start
            index[:, :rows].masked_fill_(torch.ones(rows, rows, dtype=torch.bool, device=device).tril_(), spill)
            pending.append(index.view(-1))
            if sum(len(p) for p in pending) >= block:
                counts = _add_counts(counts, pending, spill + 1)
                pending = []
    if pending or counts is None:
        counts = _add_counts(counts, pending, spill + 1)
    return counts[:-1].reshape(folds, 2, bins).cpu().numpy()


def _add_counts(counts: torch.Tensor | None, indices: list[torch.Tensor], length: int) -> torch.Tensor:
    """`counts` (None: nothing counted yet) plus how often each number below `length` occurs in `indices`."""
    more = torch.bincount(torch.cat(indices) if len(indices) != 1 else indices[0], minlength=length)
    return more if counts is None else counts.add_(more)


def _row_blocks(first: int, last: int, n: int, block: int) -> list[tuple[int, int]]:
    """Rows first .. last in runs whose scores against the columns from their first row onward fit `block`."""
    runs = []
    while first < last:
        stop = min(last, first + max(1, block // (n - first)))
        runs.append((first, stop))
        first = stop
    return runs


def verification_report(embeddings: np.ndarray | torch.Tensor, labels: np.ndarray, pairs: Pairs | None = None, *,
                        num_pairs: int | None = None, seed: int = 0,
                        max_all_pairs: int = MAX_ALL_PAIRS) -> tuple[dict[str, Any], Roc]:
    """The figures of `trainer verify` and the ROC, over one of three sets of pairs (the figures' `pairs`):

    "file": `pairs` as given; "all": every pair of distinct images, when there are at most
    `max_all_pairs` and `num_pairs` does not ask for fewer; "sampled": `num_pairs`
    (default `SAMPLED_PAIRS`) genuine and as many impostor pairs drawn with `seed`,
    without replacement. Scoring runs on the embeddings' device; `seed` also deals the folds.
    """
    labels = np.asarray(labels)
    check_labels(labels)
    genuine, impostor = pair_counts(labels)
    everything = genuine + impostor <= max_all_pairs and (num_pairs is None or num_pairs >= max(genuine, impostor))
    if pairs is None and everything:
        kind = "all"
        counts = score_histograms(embeddings, labels, seed=seed)
        roc = roc_of(table_of_histogram(counts.sum(0)))
        accuracy, threshold = kfold_accuracy_of_histograms(counts)
    else:
        kind = "file" if pairs is not None else "sampled"
        pairs = pairs if pairs is not None else draw_pairs(labels, num_pairs or SAMPLED_PAIRS, seed)
        scores = cosine_scores(embeddings, pairs)
        roc = roc_curve(scores, pairs.same)
        accuracy, threshold = kfold_accuracy(scores, pairs.same, seed=seed)
    host = embeddings.cpu().numpy() if isinstance(embeddings, torch.Tensor) else embeddings
    figures = {"num_pairs": roc.num_positives + roc.num_negatives, "pairs": kind, "num_genuine": roc.num_positives,
               "num_impostor": roc.num_negatives, "auc": auc(roc), "eer": eer(roc), "accuracy": accuracy,
               "threshold": threshold, "tar_at_far": tar_at_far(roc), **rank_identification(host, labels)}
    return figures, roc

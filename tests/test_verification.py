"""Verification metrics against hand computations on small, made-up similarity sets, and against every pair
enumerated by brute force."""
from __future__ import annotations

import collections
import itertools
from typing import Any

import numpy as np
import pytest

from tools.bench_verification import bench
from trainer.pairs import draw_pairs, parse_pairs
from trainer.verification import (
    FAR_TARGETS,
    Pairs,
    auc,
    best_threshold,
    cosine_scores,
    eer,
    fold_groups,
    kfold_accuracy,
    rank_identification,
    roc_curve,
    score_histograms,
    tar_at_far,
    verification_report,
)


def _scores(pos: list[float], neg: list[float]) -> tuple[np.ndarray, np.ndarray]:
    return np.array(pos + neg), np.array([True] * len(pos) + [False] * len(neg))


def test_perfect_separator() -> None:
    rng = np.random.default_rng(0)
    scores, same = _scores(list(rng.uniform(0.6, 1.0, 20)), list(rng.uniform(0.0, 0.4, 20)))
    roc = roc_curve(scores, same)
    assert auc(roc) == 1.0
    assert eer(roc) == 0.0
    assert kfold_accuracy(scores, same)[0] == 1.0
    threshold, accuracy = best_threshold(scores, same)
    assert accuracy == 1.0 and scores[~same].max() < threshold <= scores[same].min()


def test_random_scores_have_auc_near_half() -> None:
    rng = np.random.default_rng(1)
    scores, same = rng.normal(size=4000), rng.random(4000) < 0.5
    roc = roc_curve(scores, same)
    assert abs(auc(roc) - 0.5) < 0.03
    assert abs(eer(roc) - 0.5) < 0.03
    assert abs(kfold_accuracy(scores, same)[0] - 0.5) < 0.05


def test_constant_scores_count_ties_as_half() -> None:
    roc = roc_curve(np.full(6, 0.3), np.array([1, 1, 1, 0, 0, 0], dtype=bool))
    assert auc(roc) == 0.5
    assert eer(roc) == 0.5


def test_known_auc_and_eer() -> None:
    # Sorted: .9P .8P .7P .6N .3P .2N .1N .05N. Genuine beats impostor in 3*4 + 1*3 = 15 of 16 pairings.
    # At a threshold between .6 and .3: FAR 1/4, FRR 1/4, so EER = 0.25.
    scores, same = _scores([0.9, 0.8, 0.7, 0.3], [0.6, 0.2, 0.1, 0.05])
    roc = roc_curve(scores, same)
    assert auc(roc) == pytest.approx(15 / 16)
    assert eer(roc) == pytest.approx(0.25)


def test_eer_interpolates_between_points() -> None:
    # Points (FAR, TAR): (0,0) (0,.5) (.5,.5) (.5,1) (1,1); FAR - FRR: -1, -.5, 0 -> crossing at the third point.
    roc = roc_curve(*_scores([0.8, 0.4], [0.6, 0.2]))
    assert eer(roc) == pytest.approx(0.5)
    # Points (0,0) (0,1/3) (1/2,1/3) (1/2,2/3) (1/2,1) (1,1): FAR - FRR crosses zero on the vertical step at FAR 1/2.
    roc = roc_curve(*_scores([0.9, 0.5, 0.4], [0.7, 0.1]))
    assert eer(roc) == pytest.approx(0.5)


def test_tar_at_far_only_where_estimable() -> None:
    # 100 impostor scores 0.00 .. 0.99; genuine .995 .985 .905 .5
    scores, same = _scores([0.995, 0.985, 0.905, 0.5], list(np.arange(100) / 100))
    figures = tar_at_far(roc_curve(scores, same))
    assert set(figures) == {"0.1", "0.01"}  # 1e-3 needs 1,000 impostor pairs
    assert figures["0.01"] == pytest.approx(0.5)  # accept >= .985: impostor .99 only
    assert figures["0.1"] == pytest.approx(0.75)  # accept >= .905: impostors .90 .. .99


def test_best_threshold_by_hand() -> None:
    scores, same = _scores([0.9, 0.8, 0.3], [0.5, 0.2, 0.1])
    threshold, accuracy = best_threshold(scores, same)
    assert accuracy == pytest.approx(5 / 6)
    assert threshold == pytest.approx(0.65)  # the first of the two best cuts, midway between .8 and .5


def test_kfold_threshold_comes_from_the_other_folds() -> None:
    # Leave-one-out (10 pairs, 10 folds). Left out .6 (impostor): the other nine cut midway between .7 and .3, at .5,
    # which accepts .6: wrong. Left out .7: cut at (.75 + .6) / 2 = .675, right. Any other: cut at .65, right.
    scores, same = _scores([0.9, 0.85, 0.8, 0.75, 0.7], [0.6, 0.3, 0.2, 0.1, 0.0])
    accuracy, threshold = kfold_accuracy(scores, same, folds=10)
    assert accuracy == pytest.approx(0.9)
    assert threshold == pytest.approx((8 * 0.65 + 0.675 + 0.5) / 10)
    # Overlapping classes: cross-validated accuracy never beats the best threshold chosen on everything.
    rng = np.random.default_rng(3)
    scores, same = rng.normal(size=200) + np.repeat([1.0, 0.0], 100), np.repeat([True, False], 100)
    assert kfold_accuracy(scores, same)[0] <= best_threshold(scores, same)[1]


def test_rank_identification_by_hand() -> None:
    angles = np.deg2rad([0, 90, 180, 10, 170, 185])  # gallery: first of ids 0, 1, 2; probes: the rest
    norms = np.array([[1], [2], [3], [1], [5], [1]])  # ignored
    embeddings = np.stack([np.cos(angles), np.sin(angles)], 1) * norms
    labels = np.array([0, 1, 2, 0, 1, 2])
    result = rank_identification(embeddings, labels, ks=(1, 2, 5))
    # Probe of id 1 at 170 deg is nearest to id 2 (180), then id 1 (90): rank 2.
    assert result == {"rank1": pytest.approx(2 / 3), "rank2": 1.0, "rank5": 1.0}
    assert rank_identification(embeddings[:3], labels[:3]) == {"rank1": None, "rank5": None}


def _pair_set(pairs: Pairs) -> set[frozenset[int]]:
    return {frozenset(p) for p in zip(pairs.a.tolist(), pairs.b.tolist())}


def test_draw_pairs_without_replacement() -> None:
    labels = np.array([0, 0, 0, 1, 1, 2, 3, 3])  # genuine pairs: 3 + 1 + 1 = 5; impostor: 28 - 5 = 23
    pairs = draw_pairs(labels, 4, seed=4)
    assert len(pairs) == 8 and pairs.same.sum() == 4
    assert np.all(pairs.a != pairs.b)
    assert np.all((labels[pairs.a] == labels[pairs.b]) == pairs.same)
    assert len(_pair_set(pairs)) == 8
    again = draw_pairs(labels, 4, seed=4)
    assert np.array_equal(pairs.a, again.a) and np.array_equal(pairs.b, again.b)
    assert _pair_set(pairs) != _pair_set(draw_pairs(labels, 4, seed=5))
    # More than a kind holds: that kind whole, each pair once.
    whole = draw_pairs(labels, 10, seed=0)
    assert whole.same.sum() == 5 and (~whole.same).sum() == 10
    shuffled = np.array([3, 0, 1, 0, 3, 2, 1, 0])
    everything = draw_pairs(shuffled, 100, seed=0)
    assert sorted(map(sorted, zip(everything.a, everything.b))) == list(map(list, itertools.combinations(range(8), 2)))
    assert np.all((shuffled[everything.a] == shuffled[everything.b]) == everything.same)
    with pytest.raises(ValueError, match="2 identities"):
        draw_pairs(np.zeros(5), 3)
    with pytest.raises(ValueError, match="at least 2 images"):
        draw_pairs(np.arange(4), 3)


def test_draw_pairs_at_the_seeds_scale() -> None:
    labels = np.random.default_rng(0).permutation(np.arange(28_000) % 1_400)  # 266,000 genuine pairs of 392 million
    pairs = draw_pairs(labels, 300_000, seed=1)
    assert pairs.same.sum() == 266_000 and (~pairs.same).sum() == 300_000  # genuine whole, impostors sampled
    assert np.all((labels[pairs.a] == labels[pairs.b]) == pairs.same)
    low, high = np.minimum(pairs.a, pairs.b), np.maximum(pairs.a, pairs.b)
    assert np.all(low < high) and len(np.unique(low * 28_000 + high)) == len(pairs)
    genuine = draw_pairs(labels, 1_000, seed=1)
    assert genuine.same.sum() == 1_000 and len(np.unique(genuine.a * 28_000 + genuine.b)) == 2_000


def test_draw_pairs_is_uniform() -> None:
    # 2 identities of 3 images: 6 genuine and 9 impostor pairs; 2 of each drawn 1,000 times.
    labels = np.array([0, 1, 0, 1, 1, 0])
    hits: collections.Counter[frozenset[int]] = collections.Counter()
    for seed in range(1_000):
        pairs = draw_pairs(labels, 2, seed=seed)
        hits.update(_pair_set(pairs))
    genuine = [n for p, n in hits.items() if len({labels[i] for i in p}) == 1]
    impostor = [n for p, n in hits.items() if len({labels[i] for i in p}) == 2]
    assert len(genuine) == 6 and len(impostor) == 9
    # Expected 1,000 * 2/6 = 333 and 1,000 * 2/9 = 222 draws each; 5 standard deviations are 75 and 66.
    assert all(abs(n - 333) < 75 for n in genuine) and all(abs(n - 222) < 66 for n in impostor)


def test_cosine_scores() -> None:
    embeddings = np.array([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    scores = cosine_scores(embeddings, Pairs(np.array([0, 0, 0]), np.array([1, 2, 3]), np.array([True, False, False])))
    assert scores == pytest.approx([1.0, 0.0, 2 ** -0.5])


def test_parse_pairs(tmp_path) -> None:
    text = "path_a,path_b,same\n# comment\n\na/1.jpg, a/2.jpg, 1\na/1.jpg,b/1.jpg,0\nb/1.jpg,b/2.jpg,true\n"
    assert parse_pairs(text) == [("a/1.jpg", "a/2.jpg", True), ("a/1.jpg", "b/1.jpg", False),
                                 ("b/1.jpg", "b/2.jpg", True)]
    with pytest.raises(ValueError, match="line 2"):
        parse_pairs("a,b,1\na,b,maybe\n")
    with pytest.raises(ValueError, match="no pairs"):
        parse_pairs("# nothing\n")


def _brute_force(embeddings: np.ndarray, labels: np.ndarray, seed: int) -> dict[str, Any]:
    """The figures from every pair enumerated one by one, each threshold tried on sorted scores (float64, no bins)."""
    e = np.asarray(embeddings, dtype=np.float64)
    e = e / np.linalg.norm(e, axis=1, keepdims=True)
    pairs = list(itertools.combinations(range(len(labels)), 2))
    scores = np.array([float(e[i] @ e[j]) for i, j in pairs])
    same = np.array([labels[i] == labels[j] for i, j in pairs])
    group = fold_groups(len(labels), 10, seed)
    fold = np.array([(group[i] + group[j]) % 10 for i, j in pairs])
    genuine, impostor = np.sort(scores[same]), np.sort(scores[~same])
    # Accepting score >= t for every distinct t, strictest first: rates from the sorted scores of each kind.
    distinct = np.unique(scores)[::-1]
    tar = np.r_[0.0, 1.0 - np.searchsorted(genuine, distinct) / len(genuine)]
    far = np.r_[0.0, 1.0 - np.searchsorted(impostor, distinct) / len(impostor)]
    frr = 1.0 - tar
    j = int(np.argmax(far >= frr))  # the first point where FAR has caught up with FRR; interpolate before it
    w = (frr[j - 1] - far[j - 1]) / ((far[j] - far[j - 1]) - (frr[j] - frr[j - 1]))
    below = np.searchsorted(impostor, genuine, "left")  # impostors under each genuine score
    ties = np.searchsorted(impostor, genuine, "right") - below
    accuracies = []
    for k in range(10):
        train, test = fold != k, fold == k
        if not test.any():
            continue
        levels = np.unique(scores[train])
        cuts = np.r_[levels[-1] + 1.0, (levels[1:] + levels[:-1])[::-1] / 2.0, levels[0] - 1.0]  # strictest first
        ranked = np.sort(scores[train])
        kinds = same[train][np.argsort(scores[train], kind="stable")]
        rejected = np.searchsorted(ranked, cuts)  # the sorted scores under each cut
        right = (kinds.sum() - np.r_[0, np.cumsum(kinds)][rejected]) + np.r_[0, np.cumsum(~kinds)][rejected]
        cut = cuts[int(np.argmax(right))]
        accuracies.append(((scores[test] >= cut) == same[test]).mean())
    return {"auc": float((below + 0.5 * ties).sum() / (len(genuine) * len(impostor))),
            "eer": float(far[j - 1] + w * (far[j] - far[j - 1])),
            "tar_at_far": {f"{t:g}": float(tar[far <= t].max()) for t in FAR_TARGETS if len(impostor) * t >= 1},
            "accuracy": float(np.mean(accuracies)), "num_genuine": int(same.sum()), "num_impostor": int((~same).sum()),
            "fold_counts": [[int((~same & (fold == k)).sum()), int((same & (fold == k)).sum())] for k in range(10)]}


def test_all_pairs_match_brute_force_with_ties() -> None:
    # Five directions whose cosines (0, .36, .48, .6, .8, 1) repeat exactly, scaled by powers of two (normalizing is
    # then exact): most pairs tie with pairs of the other kind.
    directions = np.array([[1, 0, 0], [0, 1, 0], [0.6, 0.8, 0], [0, 0.6, 0.8], [0, 0, 1]])
    rng = np.random.default_rng(0)
    labels = rng.integers(4, size=40)
    pick = np.where(rng.random(40) < 0.6, labels, rng.integers(5, size=40))
    embeddings = directions[pick] * 2.0 ** rng.integers(-2, 3, size=(40, 1))
    figures, roc = verification_report(embeddings, labels, seed=3)
    expected = _brute_force(embeddings, labels, seed=3)
    assert figures["pairs"] == "all" and figures["num_pairs"] == 40 * 39 // 2
    for key in ("auc", "eer", "accuracy", "num_genuine", "num_impostor"):
        assert figures[key] == pytest.approx(expected[key], abs=1e-12), key
    assert figures["tar_at_far"] == pytest.approx(expected["tar_at_far"], abs=1e-12)
    counts = score_histograms(embeddings, labels, seed=3)
    assert counts.sum(2).tolist() == expected["fold_counts"]  # each pair in its fold and kind, once
    assert len(roc.far) <= 1 + 7  # one ROC point per distinct score (at most 7 here), as with sorted scores


def test_all_pairs_match_brute_force_within_the_binning_tolerance() -> None:
    # Scores spread continuously (no ties): pairs of one bin are the only difference, under the stated 1e-4.
    rng = np.random.default_rng(1)
    labels = rng.integers(12, size=300)
    embeddings = (rng.normal(size=(12, 8))[labels] + 1.2 * rng.normal(size=(300, 8))).astype(np.float32)
    figures, _ = verification_report(embeddings, labels, seed=5)
    expected = _brute_force(embeddings, labels, seed=5)
    assert figures["pairs"] == "all" and figures["num_genuine"] == expected["num_genuine"] > 2_000
    for key in ("auc", "eer", "accuracy"):
        assert figures[key] == pytest.approx(expected[key], abs=1e-4), key
    assert figures["tar_at_far"] == pytest.approx(expected["tar_at_far"], abs=1e-4)
    assert set(figures["tar_at_far"]) == {"0.1", "0.01", "0.001", "0.0001"}  # over 40,000 impostor pairs


def test_dense_scores_stay_within_the_binning_tolerance() -> None:
    # 2,000 random 512-d float32 embeddings: 2 million impostor scores of std 0.044 crowd the bins most (7e-5 of them
    # in one bin); the exact figures come from the float64 scores, sorted.
    rng = np.random.default_rng(2)
    labels = np.arange(2_000) % 50
    centres = 0.2 * rng.normal(size=(50, 512))
    embeddings = (rng.normal(size=(2_000, 512)) + centres[labels]).astype(np.float32)
    figures, _ = verification_report(embeddings, labels)
    e = embeddings.astype(np.float64) / np.linalg.norm(embeddings.astype(np.float64), axis=1, keepdims=True)
    i, j = np.triu_indices(2_000, 1)
    scores, same = (e @ e.T)[i, j], labels[i] == labels[j]
    roc = roc_curve(scores, same)
    assert figures["auc"] == pytest.approx(auc(roc), abs=1e-4) and 0.6 < figures["auc"] < 0.95
    assert figures["eer"] == pytest.approx(eer(roc), abs=1e-4)
    assert figures["tar_at_far"] == pytest.approx(tar_at_far(roc), abs=1e-4)
    assert figures["accuracy"] == pytest.approx(best_threshold(scores, same)[1], abs=1e-3)  # 10-fold vs best on all


def test_which_pairs_and_tar_at_far_keys() -> None:
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], [9, 11])  # 36 + 55 = 91 genuine pairs, 9 x 11 = 99 impostor pairs
    embeddings = rng.normal(size=(20, 4))
    figures, _ = verification_report(embeddings, labels)
    assert figures["pairs"] == "all"
    assert (figures["num_genuine"], figures["num_impostor"], figures["num_pairs"]) == (91, 99, 190)
    assert set(figures["tar_at_far"]) == {"0.1"}  # FAR 0.01 needs 100 impostor pairs
    figures, _ = verification_report(embeddings[:20], np.repeat([0, 1], 10))  # 10 x 10 = 100
    assert set(figures["tar_at_far"]) == {"0.1", "0.01"}
    figures, _ = verification_report(embeddings, labels, num_pairs=99)  # as many as each kind holds: all of them
    assert figures["pairs"] == "all" and figures["num_pairs"] == 190
    figures, _ = verification_report(embeddings, labels, num_pairs=60)
    assert (figures["pairs"], figures["num_genuine"], figures["num_impostor"]) == ("sampled", 60, 60)
    figures, _ = verification_report(embeddings, labels, num_pairs=95)
    assert (figures["pairs"], figures["num_genuine"], figures["num_impostor"]) == ("sampled", 91, 95)
    figures, _ = verification_report(embeddings, labels, max_all_pairs=189)  # over the bound: SAMPLED_PAIRS of each
    assert (figures["pairs"], figures["num_pairs"]) == ("sampled", 190)
    given = Pairs(np.array([0, 0, 1]), np.array([1, 10, 12]), np.array([True, False, False]))
    figures, _ = verification_report(embeddings, labels, given)
    assert (figures["pairs"], figures["num_genuine"], figures["num_impostor"]) == ("file", 1, 2)


def test_report_keys() -> None:
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(5), 4)
    embeddings = np.eye(5)[labels] + 0.1 * rng.normal(size=(20, 5))
    figures, roc = verification_report(embeddings, labels, draw_pairs(labels, 30))
    assert list(figures) == ["num_pairs", "pairs", "num_genuine", "num_impostor", "auc", "eer", "accuracy", "threshold",
                             "tar_at_far", "rank1", "rank5"]
    assert figures["num_pairs"] == 60 and figures["auc"] == pytest.approx(1.0) and figures["rank1"] == 1.0
    assert figures["tar_at_far"] == {"0.1": 1.0}
    with pytest.raises(ValueError, match="NaN"):
        verification_report(np.full((20, 5), np.nan), labels)


def test_bench_tool_runs() -> None:
    result = bench(images=60, identities=6, dim=8, device="cpu")  # 6 identities x 10 images
    assert (result["genuine_pairs"], result["impostor_pairs"]) == (6 * 45, 60 * 59 // 2 - 6 * 45)
    assert result["sampled_pairs"] == 60 * 59 // 2  # SAMPLED_PAIRS of each kind: both whole
    assert {"histogram_seconds", "report_seconds", "sample_seconds"} <= set(result) and 0.0 <= result["auc"] <= 1.0

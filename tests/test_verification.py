"""Verification metrics against hand computations on small, made-up similarity sets."""
from __future__ import annotations

import numpy as np
import pytest

from trainer.verification import (
    Pairs,
    auc,
    best_threshold,
    cosine_scores,
    draw_pairs,
    eer,
    kfold_accuracy,
    parse_pairs,
    rank_identification,
    read_pairs,
    roc_curve,
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
    embeddings = np.stack([np.cos(angles), np.sin(angles)], 1) * np.array([[1], [2], [3], [1], [5], [1]])  # norms ignored
    labels = np.array([0, 1, 2, 0, 1, 2])
    result = rank_identification(embeddings, labels, ks=(1, 2, 5))
    # Probe of id 1 at 170 deg is nearest to id 2 (180), then id 1 (90): rank 2.
    assert result == {"rank1": pytest.approx(2 / 3), "rank2": 1.0, "rank5": 1.0}
    assert rank_identification(embeddings[:3], labels[:3]) == {"rank1": None, "rank5": None}


def test_draw_pairs_is_seeded_and_correct() -> None:
    labels = np.array([0, 0, 0, 1, 1, 2, 3, 3])
    pairs = draw_pairs(labels, 50, seed=4)
    assert len(pairs) == 100 and pairs.same.sum() == 50
    assert np.all(pairs.a != pairs.b)
    assert np.all((labels[pairs.a] == labels[pairs.b]) == pairs.same)
    again = draw_pairs(labels, 50, seed=4)
    assert np.array_equal(pairs.a, again.a) and np.array_equal(pairs.b, again.b)
    assert not np.array_equal(pairs.b, draw_pairs(labels, 50, seed=5).b)
    assert set(labels[pairs.a[pairs.same]]) == {0, 1, 3}  # identity 2 has a single image
    with pytest.raises(ValueError, match="2 identities"):
        draw_pairs(np.zeros(5), 3)
    with pytest.raises(ValueError, match="at least 2 images"):
        draw_pairs(np.arange(4), 3)


def test_cosine_scores() -> None:
    embeddings = np.array([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    scores = cosine_scores(embeddings, Pairs(np.array([0, 0, 0]), np.array([1, 2, 3]), np.array([True, False, False])))
    assert scores == pytest.approx([1.0, 0.0, 2 ** -0.5])


def test_parse_pairs(tmp_path) -> None:
    text = "path_a,path_b,same\n# comment\n\na/1.jpg, a/2.jpg, 1\na/1.jpg,b/1.jpg,0\nb/1.jpg,b/2.jpg,true\n"
    assert parse_pairs(text) == [("a/1.jpg", "a/2.jpg", True), ("a/1.jpg", "b/1.jpg", False), ("b/1.jpg", "b/2.jpg", True)]
    with pytest.raises(ValueError, match="line 2"):
        parse_pairs("a,b,1\na,b,maybe\n")
    with pytest.raises(ValueError, match="no pairs"):
        parse_pairs("# nothing\n")
    (tmp_path / "p.txt").write_text(text)
    pairs = read_pairs(tmp_path / "p.txt", ["b/2.jpg", "a/1.jpg", "a/2.jpg", "b/1.jpg"])
    assert pairs.a.tolist() == [1, 1, 3] and pairs.b.tolist() == [2, 3, 0] and pairs.same.tolist() == [True, False, True]
    with pytest.raises(ValueError, match="not in the split"):
        read_pairs(tmp_path / "p.txt", ["a/1.jpg"])


def test_report_keys() -> None:
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(5), 4)
    embeddings = np.eye(5)[labels] + 0.1 * rng.normal(size=(20, 5))
    figures, roc = verification_report(embeddings, labels, draw_pairs(labels, 30))
    assert list(figures) == ["num_pairs", "auc", "eer", "accuracy", "threshold", "tar_at_far", "rank1", "rank5"]
    assert figures["num_pairs"] == 60 and figures["auc"] == pytest.approx(1.0) and figures["rank1"] == 1.0
    assert figures["tar_at_far"] == {"0.1": 1.0}

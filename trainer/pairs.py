"""Verification pairs: which pairs a split holds, drawing them without replacement, and pairs files.

A pair is two distinct images of a split, by their index into its embeddings; it is
genuine when both show one identity, impostor otherwise. Unordered pairs are numbered
t = j(j-1)/2 + i (i < j), so a uniform draw of distinct numbers is a uniform draw of
distinct pairs, at any scale, without listing them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np


@dataclass(frozen=True)
class Pairs:
    """Index pairs into an embedding array, and whether each pair shows one identity."""

    a: np.ndarray
    b: np.ndarray
    same: np.ndarray  # bool

    def __len__(self) -> int:
        return len(self.same)


def pair_counts(labels: np.ndarray) -> tuple[int, int]:
    """(genuine, impostor): how many unordered pairs of distinct images show one identity, and how many two."""
    counts = np.unique(np.asarray(labels), return_counts=True)[1].astype(np.int64)
    genuine = int((counts * (counts - 1) // 2).sum())
    n = int(counts.sum())
    return genuine, n * (n - 1) // 2 - genuine


def _triangle(t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pair number t -> (i, j), i < j, in the order (0,1) (0,2) (1,2) (0,3) ...: t = j(j-1)/2 + i."""
    j = np.floor((1.0 + np.sqrt(1.0 + 8.0 * t.astype(np.float64))) / 2.0).astype(np.int64)
    j -= j * (j - 1) // 2 > t  # the square root may round up or down by one
    j += (j + 1) * j // 2 <= t
    return t - j * (j - 1) // 2, j


def _distinct(rng: np.random.Generator, population: int, size: int, wanted: int,
              keep: Callable[[np.ndarray], np.ndarray] | None = None) -> np.ndarray:
    """`size` distinct numbers drawn uniformly from those of [0, population) that `keep` accepts (`wanted` of them).

    Rounds of uniform draws are merged until enough distinct accepted numbers are in
    hand; a uniform choice among those is then a uniform choice among all accepted ones.
    """
    chosen = np.zeros(0, dtype=np.int64)
    while len(chosen) < size:
        fresh = (wanted - len(chosen)) / population  # share of a draw that is new and accepted
        draws = rng.integers(population, size=int(1.5 * (size - len(chosen)) / fresh) + 64)
        chosen = np.sort(np.r_[chosen, draws if keep is None else draws[keep(draws)]])
        chosen = chosen[np.r_[True, chosen[1:] != chosen[:-1]]]  # np.union1d hashes, several times slower
    return np.sort(rng.choice(chosen, size, replace=False))


def draw_pairs(labels: np.ndarray, num_pairs: int, seed: int = 0) -> Pairs:
    """`num_pairs` genuine and `num_pairs` impostor pairs of distinct images, drawn (seeded) without replacement.

    Each unordered pair comes at most once; a kind with fewer than `num_pairs` pairs is
    taken whole. Genuine pairs first, each kind in a fixed order.
    """
    labels = np.asarray(labels)
    check_labels(labels)
    rng = np.random.default_rng(seed)
    order = np.argsort(labels, kind="stable")
    starts, sizes = np.unique(labels[order], return_index=True, return_counts=True)[1:]
    offsets = np.r_[0, np.cumsum(sizes * (sizes - 1) // 2)]  # genuine pairs numbered identity by identity
    genuine, impostor = pair_counts(labels)
    if num_pairs >= genuine:
        g = np.arange(genuine)
    else:
        g = _distinct(rng, genuine, num_pairs, genuine)
    c = np.searchsorted(offsets, g, side="right") - 1
    u, v = _triangle(g - offsets[c])
    pos_a, pos_b = order[starts[c] + u], order[starts[c] + v]

    def differ(t: np.ndarray) -> np.ndarray:
        i, j = _triangle(t)
        return labels[i] != labels[j]

    if num_pairs >= impostor:
        neg_a, neg_b = _impostor_pairs(order, starts + sizes, sizes)
    else:
        neg_a, neg_b = _triangle(_distinct(rng, genuine + impostor, num_pairs, impostor, keep=differ))
    same = np.r_[np.ones(len(pos_a), dtype=bool), np.zeros(len(neg_a), dtype=bool)]
    return Pairs(np.r_[pos_a, neg_a].astype(np.int64), np.r_[pos_b, neg_b].astype(np.int64), same)


def _impostor_pairs(order: np.ndarray, ends: np.ndarray, sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every impostor pair: with images `order`ed by identity (identity k ending at `ends[k]`), each image and
    every image of a later identity."""
    later = np.repeat(ends, sizes)  # of each position: where the next identity starts
    counts = len(order) - later
    first = np.repeat(np.cumsum(counts) - counts, counts)
    a = np.repeat(np.arange(len(order)), counts)
    b = np.arange(int(counts.sum())) - first + np.repeat(later, counts)
    return order[a], order[b]


def check_labels(labels: np.ndarray) -> None:
    """Refuse labels that hold no genuine or no impostor pair, in one line (`ValueError`)."""
    identities = len(np.unique(labels))
    if identities < 2:
        raise ValueError(f"verification needs at least 2 identities, found {identities}")
    if pair_counts(labels)[0] == 0:
        raise ValueError("verification needs an identity with at least 2 images")


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

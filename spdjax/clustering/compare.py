"""Comparing clusterings: to a ground truth (adjusted Rand index, purity) and to each other
(a permutation-invariant distance by Hungarian matching of groups)."""

from __future__ import annotations

import numpy as np
import scipy.optimize


def contingency(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Counts `(groups of a, groups of b)` of items in each pair of groups."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"clusterings must be 1-D labels of the same items, got shapes {a.shape} and {b.shape}")
    _, ia = np.unique(a, return_inverse=True)
    _, ib = np.unique(b, return_inverse=True)
    out = np.zeros((ia.max() + 1, ib.max() + 1), np.int64)
    np.add.at(out, (ia, ib), 1)
    return out


def adjusted_rand_index(a: np.ndarray, b: np.ndarray) -> float:
    """Hubert and Arabie's adjusted Rand index (1: identical partitions, ~0: chance)."""
    t = contingency(a, b)
    n = t.sum()
    comb = lambda x: x * (x - 1) / 2.0  # noqa: E731
    index = comb(t).sum()
    sa, sb = comb(t.sum(1)).sum(), comb(t.sum(0)).sum()
    expected = sa * sb / comb(n) if n > 1 else 0.0
    top = (sa + sb) / 2.0
    if top == expected:  # both partitions trivial (all singletons or one group): identical iff equal
        return 1.0 if index == expected else 0.0
    return float((index - expected) / (top - expected))


def purity(pred: np.ndarray, truth: np.ndarray) -> float:
    """Fraction of items in their predicted group's majority true class."""
    t = contingency(pred, truth)
    return float(t.max(1).sum() / t.sum())


def matching_distance(a: np.ndarray, b: np.ndarray) -> float:
    """1 - (items in groups matched one to one by the Hungarian algorithm) / n: 0 for the same
    partition under any relabelling, towards 1 for unrelated ones."""
    t = contingency(a, b)
    rows, cols = scipy.optimize.linear_sum_assignment(-t)
    return float(1.0 - t[rows, cols].sum() / t.sum())

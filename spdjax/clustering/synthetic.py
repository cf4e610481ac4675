"""Synthetic activation matrices with planted groups: the ground truth for the merge."""

from __future__ import annotations

import numpy as np


def planted_groups(
    n_groups: int = 50, n_samples: int = 4000, p: float = 0.05, noise: float = 0.05, max_size: int = 8, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """`(acts (n_samples, n), truth (n,))`: `n_groups` groups of 1..`max_size` members; each group
    fires on a sample with probability `p` and then all its members fire; then a fraction `noise` of
    the set entries is moved: switched off, and as many random entries switched on."""
    if not (0 <= noise < 1 and 0 < p < 1 and n_groups > 0 and max_size > 0):
        raise ValueError("planted_groups: need n_groups, max_size > 0, 0 < p < 1 and 0 <= noise < 1")
    rng = np.random.default_rng(seed)
    truth = np.repeat(np.arange(n_groups), rng.integers(1, max_size + 1, n_groups))
    acts = (rng.random((n_samples, n_groups)) < p)[:, truth]
    on = np.argwhere(acts)
    m = int(noise * len(on))
    off = on[rng.choice(len(on), m, replace=False)]
    acts[off[:, 0], off[:, 1]] = False
    acts[rng.integers(0, n_samples, m), rng.integers(0, truth.size, m)] = True
    return acts, truth

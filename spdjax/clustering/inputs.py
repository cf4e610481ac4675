"""The merge's input: causal importances of every site's subcomponents on a set of inputs, binarised.

Each site's CI `(*lead, C)` (toys: `(batch, C)`; sequence models: `(batch, seq, C)`, one row per token)
is flattened to rows (optionally a few sampled positions per sequence), the sites are put side by side,
binarised at `tau` (active: CI > tau), and the subcomponents active on fewer than a fraction
`freq_floor` of the rows are dropped. A subcomponent is named by `(site, index)`.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Mapping

import numpy as np
from jaxtyping import Bool, Float

from spdjax import metrics


@dataclasses.dataclass(frozen=True)
class Activations:
    """acts: `(N, n)` the kept subcomponents' binary activations; members[j] = (site, index) of column j;
    frequency: `(n,)` fraction of rows where each is active; n_dropped: per site, how many were
    below the floor; tau, freq_floor: the thresholds used."""

    acts: Bool[np.ndarray, "N n"]
    members: tuple[tuple[str, int], ...]
    frequency: Float[np.ndarray, " n"]
    n_dropped: dict[str, int]
    tau: float
    freq_floor: float

    @property
    def n_samples(self) -> int:
        return int(self.acts.shape[0])


def rows(ci: np.ndarray, positions_per_sequence: int | None = None, rng: np.random.Generator | None = None):
    """`(*lead, C) -> (rows, C)`. With `positions_per_sequence` and a `(batch, seq, C)` CI, that many
    distinct positions per sequence (all of a shorter sequence), drawn by `rng`."""
    ci = np.asarray(ci)
    if ci.ndim < 2:
        raise ValueError(f"causal importances must be (..., C), got shape {ci.shape}")
    if positions_per_sequence is not None and ci.ndim == 3:
        batch, seq, _ = ci.shape
        if positions_per_sequence < 1:
            raise ValueError(f"positions_per_sequence must be >= 1, got {positions_per_sequence}")
        positions_per_sequence = min(positions_per_sequence, seq)
        rng = rng or np.random.default_rng(0)
        pos = np.argsort(rng.random((batch, seq)), axis=1)[:, :positions_per_sequence]
        ci = np.take_along_axis(ci, pos[:, :, None], axis=1)
    return ci.reshape(-1, ci.shape[-1])


def binarize(
    ci: Mapping[str, np.ndarray], tau: float = 0.01, freq_floor: float = 0.001, sites: Iterable[str] | None = None
) -> Activations:
    """The `Activations` of `ci` (per site `(N, C)` on the same N rows; `sites`: which and in what
    order, default all in the mapping's order)."""
    if not 0 <= tau < 1:
        raise ValueError(f"clustering tau must be in [0, 1), got {tau}")
    if not 0 <= freq_floor < 1:
        raise ValueError(f"clustering freq_floor must be in [0, 1), got {freq_floor}")
    names = list(ci) if sites is None else list(sites)
    missing = [s for s in names if s not in ci]
    if missing or not names:
        raise ValueError(f"no causal importances for sites {missing or names}; have {sorted(ci)}")
    n_rows = {s: np.shape(ci[s])[0] for s in names}
    if len(set(n_rows.values())) != 1:
        raise ValueError(f"sites' causal importances cover different numbers of rows: {n_rows}")
    cols, members, freqs, dropped = [], [], [], {}
    for s in names:
        active = np.asarray(ci[s]) > tau
        if active.ndim != 2:
            raise ValueError(f"site {s!r}: expected (N, C) causal importances, got shape {active.shape}")
        freq = active.mean(axis=0)
        keep = np.flatnonzero((freq >= freq_floor) & (freq > 0))
        dropped[s] = int(active.shape[1] - keep.size)
        cols.append(active[:, keep])
        members += [(s, int(c)) for c in keep]
        freqs.append(freq[keep])
    return Activations(np.concatenate(cols, axis=1), tuple(members), np.concatenate(freqs), dropped, tau, freq_floor)


def causal_importances(
    params, target, batches: Iterable, sigmoid: str, positions_per_sequence: int | None = None, seed: int = 0,
    max_rows: int | None = None,
) -> dict[str, np.ndarray]:
    """Lower-leaky CI of every site of `target` over `batches`, as `(rows, C)` per site (rows from the
    batches in order; `positions_per_sequence` as in `rows`, the same positions for every site). With
    `max_rows`, batches are drawn until that many rows (`batches` may be endless) and cut to it."""
    out: dict[str, list[np.ndarray]] = {}
    n = 0
    for i, batch in enumerate(batches):
        ci = metrics.batch_ci(params, target, batch, sigmoid)
        for s, v in ci.items():
            rng = np.random.default_rng([seed, i])  # same draw for every site of this batch
            out.setdefault(s, []).append(rows(v, positions_per_sequence, rng))
        n += len(out[next(iter(out))][-1])
        if max_rows is not None and n >= max_rows:
            break
    if not out:
        raise ValueError("causal_importances: no batches")
    return {s: np.concatenate(v)[:max_rows] for s, v in out.items()}

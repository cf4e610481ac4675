"""Greedy stochastic MDL merging (clustering.md): the whole run to one group as one jitted loop.

State per iteration: the n group slots' packed activation bits `(n, words)`, their co-activation
counts `(n, n)` (diagonal: activation counts), ranks and which slots are alive. Each iteration scores
every pair (`mdl.merge_costs`), draws one with the configured sampler, ORs the second group into the
first and recomputes only the merged row of co-activations (a popcount of its bits against every
group's). The clustering is the grouping before the first merge whose dL is positive.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Bool

from spdjax.clustering.mdl import coactivations, description_length, merge_costs, pack_columns

SAMPLERS = ("range", "mcmc", "exp_rank")


@dataclasses.dataclass(frozen=True)
class MergeConfig:
    """alpha: rank penalty. sampler: `range` (uniform among pairs within `range_fraction` of the cost
    range above the minimum), `mcmc` (softmax of -dL / `temperature`) or `exp_rank` (P ~ exp(-`rank_rate`
    rank) over the `top` cheapest pairs; exp(-0.2 * 64) < 3e-6, so the truncation drops < 1e-5 of the
    mass)."""

    alpha: float = 1.0
    sampler: str = "range"
    range_fraction: float = 0.05
    temperature: float = 1.0
    rank_rate: float = 0.2
    top: int = 64

    def validate(self) -> "MergeConfig":
        if self.sampler not in SAMPLERS:
            raise ValueError(f"clustering sampler: unknown {self.sampler!r}; allowed: {list(SAMPLERS)}")
        if self.alpha < 0:
            raise ValueError(f"clustering alpha must be >= 0, got {self.alpha}")
        if not 0 <= self.range_fraction <= 1:
            raise ValueError(f"clustering range_fraction must be in [0, 1], got {self.range_fraction}")
        if self.temperature <= 0 or self.rank_rate <= 0 or self.top < 1:
            raise ValueError("clustering temperature and rank_rate must be > 0 and top >= 1")
        return self


@dataclasses.dataclass(frozen=True)
class MergeHistory:
    """One merge run over n subcomponents.

    `pairs[t] = (i, j)`: at iteration t group slot j was merged into slot i (slots are the initial
    subcomponent indices); `dL[t]` its cost change; `L[t]` the description length before it (`L[-1]`:
    after the last). `stop`: the number of merges of the chosen clustering (the first t with dL > 0;
    all of them if none). `coact`, `alive`: the state after the run (tests and resumption).
    """

    pairs: np.ndarray
    dL: np.ndarray
    L: np.ndarray
    n: int
    stop: int
    coact: np.ndarray
    alive: np.ndarray

    def labels_at(self, t: int) -> np.ndarray:
        """Group of every subcomponent after t merges, numbered 0..k-1 by first member."""
        if not 0 <= t <= len(self.pairs):
            raise ValueError(f"labels_at: t must be in [0, {len(self.pairs)}], got {t}")
        slot = np.arange(self.n)
        for i, j in self.pairs[:t]:
            slot[slot == j] = i
        _, labels = np.unique(slot, return_inverse=True)
        return labels

    def labels(self) -> np.ndarray:
        """The chosen clustering: `labels_at(stop)`."""
        return self.labels_at(self.stop)


def _sample(flat, key, cfg: MergeConfig):
    finite = jnp.isfinite(flat)
    lo = jnp.min(flat)
    if cfg.sampler == "range":
        hi = jnp.max(jnp.where(finite, flat, -jnp.inf))
        cand = flat <= lo + cfg.range_fraction * (hi - lo)
        return jnp.argmax(jnp.where(cand, jax.random.uniform(key, flat.shape), -1.0))
    if cfg.sampler == "mcmc":
        return jax.random.categorical(key, jnp.where(finite, -(flat - lo) / cfg.temperature, -jnp.inf))
    m = min(cfg.top, flat.shape[0])
    neg, idx = jax.lax.top_k(-flat, m)
    logits = jnp.where(jnp.isfinite(neg), -cfg.rank_rate * jnp.arange(m, dtype=flat.dtype), -jnp.inf)
    return idx[jax.random.categorical(key, logits)]


@partial(jax.jit, static_argnames=("cfg", "iterations"))
def _run(bits, coact, key, cfg: MergeConfig, iterations: int):
    n = coact.shape[0]

    def body(t, state):
        G, S, r, alive, pairs, dLs = state
        costs = merge_costs(S, r, alive, cfg.alpha).reshape(-1)
        idx = _sample(costs, jax.random.fold_in(key, t), cfg)
        i, j = idx // n, idx % n
        gi = G[i] | G[j]
        G = G.at[i].set(gi)
        alive = alive.at[j].set(False)
        row = jnp.sum(jax.lax.population_count(G & gi[None, :]), axis=1).astype(S.dtype)
        row = jnp.where(alive, row, 0.0)
        S = S.at[i, :].set(row).at[:, i].set(row).at[j, :].set(0.0).at[:, j].set(0.0)
        r = r.at[i].add(r[j]).at[j].set(0.0)
        return G, S, r, alive, pairs.at[t].set(jnp.stack([i, j])), dLs.at[t].set(costs[idx])

    init = (bits, coact, jnp.ones(n, coact.dtype), jnp.ones(n, bool),
            jnp.zeros((iterations, 2), jnp.int32), jnp.zeros(iterations, coact.dtype))
    _, S, _, alive, pairs, dLs = jax.lax.fori_loop(0, iterations, body, init)
    return pairs, dLs, S, alive


def merge(
    acts: Bool[np.ndarray, "N n"], config: MergeConfig = MergeConfig(), seed: int = 0, iterations: int | None = None
) -> MergeHistory:
    """Merge the n columns of the binary activation matrix `acts` (samples x subcomponents) greedily
    to one group (or for `iterations` merges). Counts are float32 on the device: exact below 2^24
    samples; dL is float32 (its sign decides the stop)."""
    config.validate()
    acts = np.asarray(acts, bool)
    N, n = acts.shape
    if n < 2:
        raise ValueError(f"merge: needs at least 2 subcomponents, got {n}")
    iterations = n - 1 if iterations is None else iterations
    if not 0 < iterations <= n - 1:
        raise ValueError(f"merge: iterations must be in [1, {n - 1}], got {iterations}")
    coact = coactivations(acts)
    pairs, dLs, S, alive = _run(
        jnp.asarray(pack_columns(acts)), jnp.asarray(coact, jnp.float32), jax.random.key(seed), config, iterations
    )
    pairs, dLs = np.asarray(pairs), np.asarray(dLs, np.float64)
    L0 = float(description_length(jnp.asarray(np.diag(coact)), jnp.ones(n), config.alpha))
    L = L0 + np.concatenate([[0.0], np.cumsum(dLs)])
    positive = np.flatnonzero(dLs > 0)
    stop = int(positive[0]) if positive.size else iterations
    return MergeHistory(pairs, dLs, L, n, stop, np.asarray(S, np.float64), np.asarray(alive))

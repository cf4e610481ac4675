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
STOPS = ("first_positive", "min_length")


@dataclasses.dataclass(frozen=True)
class MergeConfig:
    """alpha: rank penalty. sampler: `range` (uniform among pairs within `range_fraction` of the cost
    range above the minimum), `mcmc` (softmax of -dL / `temperature`) or `exp_rank` (P ~ exp(-`rank_rate`
    rank) over the `top` cheapest pairs; exp(-0.2 * 64) < 3e-6, so the truncation drops < 1e-5 of the
    mass). stop: the chosen clustering along the run to one group: `first_positive` (clustering.md: before
    the first merge whose dL > 0) or `min_length` (the iteration with the smallest description length L,
    which a stochastic sampler's occasional costly pick does not end early)."""

    alpha: float = 3.0
    sampler: str = "mcmc"
    range_fraction: float = 0.05
    temperature: float = 1.0
    rank_rate: float = 0.2
    top: int = 64
    stop: str = "first_positive"

    def validate(self) -> "MergeConfig":
        if self.stop not in STOPS:
            raise ValueError(f"clustering stop: unknown {self.stop!r}; allowed: {list(STOPS)}")
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
    after the last). `stop`: the number of merges of the chosen clustering (`MergeConfig.stop`: the first t
    with dL > 0, or the t of the smallest L;
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


_BLOCKS = 32


def _col_reduce(x, op, fill):
    """`op`-reduction of `x: (n, m)` over axis 0 as an elementwise `op` across 32 row blocks, then a
    short reduction: XLA:CPU turns a long reduction into reduce-window trees that ran ~6x slower here."""
    n = x.shape[0]
    if n % _BLOCKS:
        x = jnp.pad(x, ((0, (-n) % _BLOCKS), (0, 0)), constant_values=fill)
    x = x.reshape(_BLOCKS, -1, x.shape[1])
    out = x[0]
    for b in range(1, _BLOCKS):
        out = op(out, x[b])
    return out


def _sample(costs, key, cfg: MergeConfig):
    """Index `i * n + j` of one pair drawn from the `(rows >= n, n)` cost matrix (+inf: not a pair;
    `_run` pads the rows to a multiple of 32 with +inf).

    Every O(n^2) pass is a reduction over axis 0, which XLA:CPU vectorises across columns (a
    reduction along rows ran ~9x slower), and random numbers are drawn per column and per row,
    not per pair: a column j by the total weight of its pairs, then a row within it."""
    rows, n = costs.shape
    kc, kr = jax.random.split(key)
    finite = jnp.isfinite(costs)
    lo = jnp.min(_col_reduce(costs, jnp.minimum, jnp.inf))
    if cfg.sampler == "range":
        hi = jnp.max(_col_reduce(jnp.where(finite, costs, -jnp.inf), jnp.maximum, -jnp.inf))
        cand = costs <= lo + cfg.range_fraction * (hi - lo)
        count = jnp.ones((1, rows), costs.dtype) @ cand.astype(costs.dtype)  # a matvec: exact counts < 2^24
        count = count[0]
        j = jax.random.categorical(kc, jnp.where(count > 0, jnp.log(count.astype(costs.dtype)), -jnp.inf))
        i = jnp.argmax(jnp.where(cand[:, j], jax.random.uniform(kr, (rows,)), -1.0))
        return i * n + j
    if cfg.sampler == "mcmc":
        z = jnp.where(finite, -(costs - lo) / cfg.temperature, -jnp.inf)
        top = jnp.max(_col_reduce(z, jnp.maximum, -jnp.inf), axis=0)
        top = jnp.where(jnp.isfinite(top), top, 0.0)
        col = jnp.log(jnp.ones((1, rows), z.dtype) @ jnp.exp(z - top)) + top  # logsumexp over axis 0
        j = jax.random.categorical(kc, col[0])
        return jax.random.categorical(kr, z[:, j]) * n + j
    flat = costs.reshape(-1)
    m = min(cfg.top, flat.shape[0])
    neg, idx = jax.lax.top_k(-flat, m)
    logits = jnp.where(jnp.isfinite(neg), -cfg.rank_rate * jnp.arange(m, dtype=flat.dtype), -jnp.inf)
    return idx[jax.random.categorical(key, logits)]


@partial(jax.jit, static_argnames=("cfg", "iterations"))
def _run(bits, coact, r, alive, key, t0, cfg: MergeConfig, iterations: int):
    """`iterations` merges from the given state; iteration t draws with `fold_in(key, t0 + t)`."""
    n = coact.shape[0]

    def padded_costs(S, r, alive):  # rows padded to a multiple of 32 with +inf (see `_col_reduce`)
        return jnp.pad(merge_costs(S, r, alive, cfg.alpha), ((0, (-n) % _BLOCKS), (0, 0)), constant_values=jnp.inf)

    def body(t, state):
        # `costs` is carried in the loop state, so XLA writes it once per iteration and the sampler's
        # reductions read it, instead of each recomputing it inside its own fusion.
        G, S, r, alive, costs, pairs, dLs = state
        idx = _sample(costs, jax.random.fold_in(key, t0 + t), cfg)
        i, j = idx // n, idx % n
        dL = costs[i, j]
        gi = G[i] | G[j]
        G = G.at[i].set(gi)
        alive = alive.at[j].set(False)
        row = jnp.sum(jax.lax.population_count(G & gi[None, :]), axis=1).astype(S.dtype)
        row = jnp.where(alive, row, 0.0)
        S = S.at[i, :].set(row).at[:, i].set(row).at[j, :].set(0.0).at[:, j].set(0.0)
        r = r.at[i].add(r[j]).at[j].set(0.0)
        pairs = pairs.at[t].set(jnp.stack([i, j]).astype(jnp.int32))
        return G, S, r, alive, padded_costs(S, r, alive), pairs, dLs.at[t].set(dL)

    init = (bits, coact, r, alive, padded_costs(coact, r, alive),
            jnp.zeros((iterations, 2), jnp.int32), jnp.zeros(iterations, coact.dtype))
    G, S, r, alive, _, pairs, dLs = jax.lax.fori_loop(0, iterations, body, init)
    return pairs, dLs, G, S, r, alive


MIN_COMPACT = 1024  # below this many groups the run finishes without compacting again (each size compiles anew)


def merge(
    acts: Bool[np.ndarray, "N n"], config: MergeConfig = MergeConfig(), seed: int = 0, iterations: int | None = None
) -> MergeHistory:
    """Merge the n columns of the binary activation matrix `acts` (samples x subcomponents) greedily
    to one group (or for `iterations` merges). Counts are float32 on the device: exact below 2^24
    samples; dL is float32 (its sign decides the stop).

    Runs in segments: each halves the number of groups, then the state is compacted to the alive
    groups, so an iteration's O(k^2) cost pass shrinks with k (a run to one group does ~1/3 of the
    work of a run on fixed n x n arrays)."""
    config.validate()
    acts = np.asarray(acts, bool)
    N, n = acts.shape
    if n < 2:
        raise ValueError(f"merge: needs at least 2 subcomponents, got {n}")
    iterations = n - 1 if iterations is None else iterations
    if not 0 < iterations <= n - 1:
        raise ValueError(f"merge: iterations must be in [1, {n - 1}], got {iterations}")
    coact = coactivations(acts)
    key = jax.random.key(seed)
    slots = np.arange(n)  # original slot (first member) of each compact row
    G, S = jnp.asarray(pack_columns(acts)), jnp.asarray(coact, jnp.float32)
    r, alive = jnp.ones(n, jnp.float32), jnp.ones(n, bool)
    all_pairs, all_dL, done = [], [], 0
    while done < iterations:
        m = len(slots)
        seg = iterations - done if m <= MIN_COMPACT else min(iterations - done, m // 2)
        pairs, dLs, G, S, r, alive = _run(G, S, r, alive, key, done, config, seg)
        all_pairs.append(slots[np.asarray(pairs)])
        all_dL.append(np.asarray(dLs, np.float64))
        done += seg
        keep = np.flatnonzero(np.asarray(alive))
        slots = slots[keep]
        k = jnp.asarray(keep)
        G, S, r, alive = G[k], S[k][:, k], r[k], alive[k]
    S_full = np.zeros((n, n))
    S_full[np.ix_(slots, slots)] = np.asarray(S, np.float64)
    alive_full = np.zeros(n, bool)
    alive_full[slots] = True
    pairs, dLs = np.concatenate(all_pairs), np.concatenate(all_dL)
    L0 = float(description_length(jnp.asarray(np.diag(coact)), jnp.ones(n), config.alpha))
    L = L0 + np.concatenate([[0.0], np.cumsum(dLs)])
    if config.stop == "min_length":
        stop = int(np.argmin(L))  # the first of equal minima
    else:
        positive = np.flatnonzero(dLs > 0)
        stop = int(positive[0]) if positive.size else iterations
    return MergeHistory(pairs, dLs, L, n, stop, S_full, alive_full)

"""The description-length cost of a grouping of subcomponents and of merging two groups (clustering.md).

Groups i = 1..k over N binarised samples: `g_i` is active where any member is (OR), `s_i = sum g_i`,
`c_ij = sum g_i g_j` (co-activation), `r_i` = number of rank-one members. The description length is

    L = sum_i s_i (log2 k + alpha r_i).

Merging i and j gives one group with `s_m = s_i + s_j - c_ij` (its OR-activation) and rank
`r_i + r_j`, and changes L by exactly

    dL = (s_sum - s_i - s_j) log2((k-1)/k) + s_m log2(k-1) - (s_i + s_j) log2 k
         + alpha (s_m (r_i + r_j) - s_i r_i - s_j r_j)

with `s_sum = sum_i s_i` before the merge. clustering.md writes this formula with `s_ij`, which it
defines as the co-activation; the formula is L's exact change only with the merged group's
OR-activation `s_m` there (what the reference computes as `s_i + s_j - coact_ij`), so `s_m` is used
(`tests/spdjax/test_clustering.py` checks dL against L recomputed from scratch).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import scipy.sparse
from jaxtyping import Array, Bool, Float

SPARSE_DENSITY = 0.05  # below this fraction of ones, co-activations are a sparse product


def description_length(s: Float[Array, " k"], r: Float[Array, " k"], alpha: float) -> Float[Array, ""]:
    """L = sum_i s_i (log2 k + alpha r_i) over the k groups given."""
    k = s.shape[0]
    return jnp.sum(s * (jnp.log2(jnp.asarray(k, s.dtype)) + alpha * r))


def merge_costs(
    coact: Float[Array, "n n"], r: Float[Array, " n"], alive: Bool[Array, " n"], alpha: float
) -> Float[Array, "n n"]:
    """dL of merging every pair (i, j) of alive groups, i < j; +inf elsewhere.

    `coact`: co-activation counts with `s_i` on the diagonal (rows of dead groups are ignored);
    `r`: ranks; `alive`: which of the n slots hold a group (k = their count).
    """
    s = jnp.where(alive, jnp.diagonal(coact), 0.0)
    k = jnp.sum(alive).astype(coact.dtype)
    s_sum = jnp.sum(s)
    log_k, log_k1 = jnp.log2(k), jnp.log2(k - 1.0)
    si, sj = s[:, None], s[None, :]
    ri, rj = r[:, None], r[None, :]
    s_m = si + sj - coact
    dL = (
        (s_sum - si - sj) * (log_k1 - log_k)
        + s_m * log_k1
        - (si + sj) * log_k
        + alpha * (s_m * (ri + rj) - si * ri - sj * rj)
    )
    n = coact.shape[0]
    valid = alive[:, None] & alive[None, :] & (jnp.arange(n)[:, None] < jnp.arange(n)[None, :])
    return jnp.where(valid, dL, jnp.inf)


def coactivations(acts: Bool[np.ndarray, "N n"]) -> np.ndarray:
    """`acts^T acts` as float64 counts `(n, n)` (diagonal: activation counts): a sparse product when
    fewer than `SPARSE_DENSITY` of the entries are set, else a dense float32 matmul (exact: 0/1
    products summed in float32 are exact below 2^24 samples)."""
    acts = np.asarray(acts, bool)
    if acts.ndim != 2:
        raise ValueError(f"coactivations: acts must be (samples, subcomponents), got shape {acts.shape}")
    if acts.shape[0] >= 1 << 24:
        raise ValueError(f"coactivations: {acts.shape[0]} samples; counts are exact only below 2^24")
    if acts.mean() < SPARSE_DENSITY:
        a = scipy.sparse.csc_matrix(acts, dtype=np.float32)
        return np.asarray((a.T @ a).toarray(), np.float64)
    a = jnp.asarray(acts, jnp.float32)
    return np.asarray(a.T @ a, np.float64)


def pack_columns(acts: Bool[np.ndarray, "N n"]) -> np.ndarray:
    """Column j of `acts` as bits: `(n, ceil(N / 32))` uint32, sample t in word t // 32, bit t % 32."""
    acts = np.asarray(acts, bool)
    N = acts.shape[0]
    pad = (-N) % 32
    bits = np.packbits(np.pad(acts, ((0, pad), (0, 0))).T, axis=1, bitorder="little")
    return np.ascontiguousarray(bits).view("<u4")

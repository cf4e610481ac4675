"""Top-k selection of components from attributions `(*lead, C)`; no gradient flows through it.

- batch top-k (the paper's): keep the `floor(k * B)` largest entries of the flattened `B x C`
  attribution matrix, `B` = the number of leading positions (batch x positions); a sample may keep 0
  or many components.
- per-sample top-k: keep the `k` largest of every sample's C attributions (`k` a whole number).
Ties: exactly that many entries are kept; among equal values the lower (flat) index wins
(`jax.lax.top_k`'s order). `floor` is taken after rounding `k * B` to 9 decimals, so e.g. k = 0.29,
B = 100 keeps 29 despite 0.29 * 100 = 28.999999999999996 in floating point.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool


def batch_topk_count(k: float, n_positions: int) -> int:
    return int(math.floor(round(k * n_positions, 9)))


def batch_topk_mask(attr: Array, k: float) -> Bool[Array, "*lead C"]:
    attr = jax.lax.stop_gradient(attr)
    n_pos = math.prod(attr.shape[:-1])
    n = min(batch_topk_count(k, n_pos), attr.size)
    flat = attr.reshape(-1)
    if n <= 0:
        return jnp.zeros(attr.shape, bool)
    _, idx = jax.lax.top_k(flat, n)
    return jnp.zeros(flat.shape, bool).at[idx].set(True).reshape(attr.shape)


def sample_topk_mask(attr: Array, k: float) -> Bool[Array, "*lead C"]:
    if float(k) != int(k):
        raise ValueError(f"apd.topk: per-sample top-k needs a whole number k, got {k!r}")
    attr = jax.lax.stop_gradient(attr)
    n = min(int(k), attr.shape[-1])
    if n <= 0:
        return jnp.zeros(attr.shape, bool)
    _, idx = jax.lax.top_k(attr, n)
    return jnp.any(jax.nn.one_hot(idx, attr.shape[-1], dtype=bool), axis=-2)


def topk_mask(attr: Array, k: float, batch_topk: bool = True) -> Bool[Array, "*lead C"]:
    """Boolean `(*lead, C)` mask of the selected components (see the module docstring)."""
    return batch_topk_mask(attr, k) if batch_topk else sample_topk_mask(attr, k)

"""The induction-head task (transformers.md): 62 tokens uniform in 1..128, S at a position p uniform in
[1, 61) and a random token M at p + 1; the sequence is [BOS] + those 62 + [S] (64 tokens), the label M
(cross-entropy on the last position only). Sampled on device, fresh every step."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Int

from experiments.ih.model import BOS, S_TOKEN

BODY = 62


def sample(key: Array, batch_size: int) -> dict[str, Int[Array, "..."]]:
    """`{"tokens": (B, 64) int32, "label": (B,) int32, "m_pos": (B,) int32}`; `m_pos` is M's index in
    `tokens` (where the induction head should look from the final S)."""
    kt, kp, km = jax.random.split(key, 3)
    body = jax.random.randint(kt, (batch_size, BODY), 1, S_TOKEN, dtype=jnp.int32)
    p = jax.random.randint(kp, (batch_size,), 1, BODY - 1, dtype=jnp.int32)
    m = jax.random.randint(km, (batch_size,), 1, S_TOKEN, dtype=jnp.int32)
    rows = jnp.arange(batch_size)
    body = body.at[rows, p].set(S_TOKEN).at[rows, p + 1].set(m)
    tokens = jnp.concatenate(
        [jnp.full((batch_size, 1), BOS, jnp.int32), body, jnp.full((batch_size, 1), S_TOKEN, jnp.int32)], axis=1
    )
    return {"tokens": tokens, "label": m, "m_pos": p + 2}

"""The induction-head toy target (transformers.md): a 2-layer, 1-head, attention-only transformer.

d_model 16, no MLP, no LayerNorm, no biases; token embedding of 130 rows (BOS 0, tokens 1..128, S 129);
sinusoidal ("Shortformer") position encodings added to the inputs of Q and K only, never to the residual
stream; causal attention; untied unembedding without bias. Sites: `blocks.<l>.attn.{q,k,v,o}`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float, Int

VOCAB = 130
BOS, S_TOKEN = 0, 129


def sinusoidal(T: int, d: int) -> Float[Array, "T d"]:
    pos = np.arange(T)[:, None]
    i = np.arange(d // 2)[None]
    ang = pos / 10000.0 ** (2 * i / d)
    return jnp.asarray(np.concatenate([np.sin(ang), np.cos(ang)], axis=1), jnp.float32)


class Attention(nnx.Module):
    """One causal head; Q and K see `x + pos`, V sees `x`."""

    def __init__(self, d: int, rngs: nnx.Rngs):
        self.q, self.k, self.v, self.o = (nnx.Linear(d, d, use_bias=False, rngs=rngs) for _ in range(4))

    def pattern(self, x: Float[Array, "*B T d"], pos: Float[Array, "T d"]) -> Float[Array, "*B T T"]:
        q, k = self.q(x + pos), self.k(x + pos)
        scores = jnp.einsum("...td,...sd->...ts", q, k) / math.sqrt(q.shape[-1])
        T = x.shape[-2]
        causal = jnp.tril(jnp.ones((T, T), bool))
        return jax.nn.softmax(jnp.where(causal, scores, -1e30), axis=-1)

    def __call__(self, x, pos):
        attn = self.pattern(x, pos)
        return self.o(jnp.einsum("...ts,...sd->...td", attn, self.v(x))), attn


class Block(nnx.Module):
    def __init__(self, d: int, rngs: nnx.Rngs):
        self.attn = Attention(d, rngs)


class InductionTransformer(nnx.Module):
    """`tokens (B, T) -> logits (B, T, VOCAB)`; `patterns(tokens)` gives each layer's attention `(B, T, T)`."""

    def __init__(self, d_model: int = 16, n_layers: int = 2, *, rngs: nnx.Rngs):
        self.d_model = d_model
        self.embed = nnx.Embed(VOCAB, d_model, rngs=rngs)
        self.blocks = nnx.List([Block(d_model, rngs) for _ in range(n_layers)])
        self.unembed = nnx.Linear(d_model, VOCAB, use_bias=False, rngs=rngs)

    def run(self, tokens: Int[Array, "B T"]):
        x = self.embed(tokens)
        pos = sinusoidal(tokens.shape[-1], self.d_model)
        patterns = []
        for block in self.blocks:
            y, attn = block.attn(x, pos)
            x = x + y
            patterns.append(attn)
        return self.unembed(x), patterns

    def __call__(self, tokens):
        return self.run(tokens)[0]

    def patterns(self, tokens):
        return self.run(tokens)[1]


def attention_scores(patterns, m_pos: Int[Array, " B"]) -> dict[str, Array]:
    """From `patterns[l]: (B, T, T)`: `prev_token_score` (layer 0, mean attention to the previous token over
    positions 1..T-1), `prev_at_m` (layer 0, M -> S) and `induction` (layer 1, final -> M)."""
    a0, a1 = patterns[0], patterns[1]
    B, T = a0.shape[0], a0.shape[-1]
    rows = jnp.arange(B)
    return {
        "prev_token_score": jnp.mean(a0[:, jnp.arange(1, T), jnp.arange(0, T - 1)]),
        "prev_at_m": jnp.mean(a0[rows, m_pos, m_pos - 1]),
        "induction": jnp.mean(a1[rows, T - 1, m_pos]),
    }

"""The LM target (transformers.md): a Llama-style decoder ("LlamaSimpleMLP") in Flax NNX.

Pre-norm blocks `x + attn(rms(x))`, `x + mlp(rms(x))`; causal attention with rotary position encodings
on q and k and grouped key/value heads; GELU MLP `c_fc` (d_model -> d_mlp) and `down_proj` back; a final
RMSNorm and an untied unembedding. No biases. Sites: `blocks.<l>.attn.{q,k,v,o}`,
`blocks.<l>.mlp.{c_fc,down_proj}` (all `nnx.Linear`, whole matrices with heads flattened).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int


@dataclasses.dataclass(frozen=True)
class LMShape:
    vocab_size: int = 4096
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    d_mlp: int = 512
    rope_base: float = 10_000.0

    def __post_init__(self):
        if self.d_model % self.n_heads or self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"target: d_model {self.d_model} must divide by n_heads {self.n_heads}, and n_heads by "
                f"n_kv_heads {self.n_kv_heads}"
            )

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


def rope(x: Float[Array, "*B T H D"], base: float) -> Float[Array, "*B T H D"]:
    """Rotary encoding of the last axis (pairs (i, i + D/2)) by position along axis -3."""
    T, D = x.shape[-3], x.shape[-1]
    inv = base ** (-jnp.arange(0, D // 2, dtype=jnp.float32) * 2 / D)
    ang = jnp.arange(T, dtype=jnp.float32)[:, None] * inv[None]  # (T, D/2)
    cos, sin = jnp.cos(ang)[:, None, :], jnp.sin(ang)[:, None, :]
    x1, x2 = x[..., : D // 2], x[..., D // 2 :]
    return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1).astype(x.dtype)


class Attention(nnx.Module):
    def __init__(self, s: LMShape, rngs: nnx.Rngs):
        self.s = s
        kv = s.n_kv_heads * s.head_dim
        self.q = nnx.Linear(s.d_model, s.d_model, use_bias=False, rngs=rngs)
        self.k = nnx.Linear(s.d_model, kv, use_bias=False, rngs=rngs)
        self.v = nnx.Linear(s.d_model, kv, use_bias=False, rngs=rngs)
        self.o = nnx.Linear(s.d_model, s.d_model, use_bias=False, rngs=rngs)

    def __call__(self, x: Float[Array, "B T d"]) -> Float[Array, "B T d"]:
        return self.run(x)[0]

    def run(self, x: Float[Array, "B T d"]) -> tuple[Float[Array, "B T d"], Float[Array, "B H T T"]]:
        """The output and the attention pattern, heads in order (kv group major)."""
        s = self.s
        B, T, _ = x.shape
        q = rope(self.q(x).reshape(B, T, s.n_heads, s.head_dim), s.rope_base)
        k = rope(self.k(x).reshape(B, T, s.n_kv_heads, s.head_dim), s.rope_base)
        v = self.v(x).reshape(B, T, s.n_kv_heads, s.head_dim)
        g = s.n_heads // s.n_kv_heads
        q = q.reshape(B, T, s.n_kv_heads, g, s.head_dim)
        scores = jnp.einsum("btkgd,bskd->bkgts", q, k) / math.sqrt(s.head_dim)
        causal = jnp.tril(jnp.ones((T, T), bool))
        attn = jax.nn.softmax(jnp.where(causal, scores, jnp.finfo(scores.dtype).min), axis=-1)
        out = jnp.einsum("bkgts,bskd->btkgd", attn, v).reshape(B, T, s.d_model)
        return self.o(out), attn.reshape(B, s.n_heads, T, T)


class MLP(nnx.Module):
    def __init__(self, s: LMShape, rngs: nnx.Rngs):
        self.c_fc = nnx.Linear(s.d_model, s.d_mlp, use_bias=False, rngs=rngs)
        self.down_proj = nnx.Linear(s.d_mlp, s.d_model, use_bias=False, rngs=rngs)

    def __call__(self, x):
        return self.down_proj(jax.nn.gelu(self.c_fc(x)))


class Block(nnx.Module):
    def __init__(self, s: LMShape, rngs: nnx.Rngs):
        self.attn_norm = nnx.RMSNorm(s.d_model, rngs=rngs)
        self.attn = Attention(s, rngs)
        self.mlp_norm = nnx.RMSNorm(s.d_model, rngs=rngs)
        self.mlp = MLP(s, rngs)

    def __call__(self, x):
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class LlamaLM(nnx.Module):
    """`tokens (B, T) int -> logits (B, T, vocab)`."""

    def __init__(self, s: LMShape, *, rngs: nnx.Rngs):
        self.shape = s
        self.embed = nnx.Embed(s.vocab_size, s.d_model, rngs=rngs)
        self.blocks = nnx.List([Block(s, rngs) for _ in range(s.n_layers)])
        self.norm = nnx.RMSNorm(s.d_model, rngs=rngs)
        self.unembed = nnx.Linear(s.d_model, s.vocab_size, use_bias=False, rngs=rngs)

    def __call__(self, tokens: Int[Array, "B T"]) -> Float[Array, "B T V"]:
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.unembed(self.norm(x))

    def patterns(self, tokens: Int[Array, "B T"]) -> list[Float[Array, "B H T T"]]:
        """Each block's attention pattern on `tokens`."""
        x, out = self.embed(tokens), []
        for block in self.blocks:
            y, attn = block.attn.run(block.attn_norm(x))
            x = x + y
            x = x + block.mlp(block.mlp_norm(x))
            out.append(attn)
        return out


def next_token_ce(logits: Float[Array, "B T V"], tokens: Int[Array, "B T"]) -> Float[Array, ""]:
    """Mean cross-entropy (nats) of predicting tokens[:, 1:] from logits[:, :-1]."""
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), -1)
    return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], -1))

"""The LM target against float64 NumPy references: RoPE, grouped-query causal attention, the block."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments.lm.model import LlamaLM, LMShape, next_token_ce, rope

SMALL = LMShape(vocab_size=64, d_model=16, n_layers=2, n_heads=4, n_kv_heads=2, d_mlp=32)


def _np_rope(x, base):
    T, H, D = x.shape
    out = np.empty_like(x, dtype=np.float64)
    for t in range(T):
        for i in range(D // 2):
            a = t * base ** (-2 * i / D)
            c, s = math.cos(a), math.sin(a)
            out[t, :, i] = x[t, :, i] * c - x[t, :, i + D // 2] * s
            out[t, :, i + D // 2] = x[t, :, i] * s + x[t, :, i + D // 2] * c
    return out


def test_rope_matches_numpy_and_depends_on_offset_only():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(7, 3, 8))
    np.testing.assert_allclose(np.asarray(rope(jnp.asarray(x, jnp.float32), 100.0)), _np_rope(x, 100.0), atol=1e-5)
    q, k = rng.normal(size=8), rng.normal(size=8)
    rot = lambda v, t: np.asarray(rope(jnp.asarray(np.tile(v, (t + 1, 1, 1)), jnp.float32), 100.0))[t, 0]
    assert rot(q, 5) @ rot(k, 3) == pytest.approx(rot(q, 4) @ rot(k, 2), rel=1e-4)


def _np_forward(model, tokens):
    """Plain NumPy float64 forward of `LlamaLM` (loops over heads)."""
    s = model.shape
    P = lambda a: np.asarray(a[...], np.float64)
    rms = lambda x, scale: x / np.sqrt(np.mean(x**2, -1, keepdims=True) + 1e-6) * P(scale)
    gelu = lambda x: 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    x = P(model.embed.embedding)[tokens]
    B, T, _ = x.shape
    for blk in model.blocks:
        h = rms(x, blk.attn_norm.scale)
        q = h @ P(blk.attn.q.kernel)
        k = h @ P(blk.attn.k.kernel)
        v = h @ P(blk.attn.v.kernel)
        out = np.zeros((B, T, s.d_model))
        for b in range(B):
            for hd in range(s.n_heads):
                kv = hd // (s.n_heads // s.n_kv_heads)
                qs = _np_rope(q[b, :, None, hd * s.head_dim:(hd + 1) * s.head_dim], s.rope_base)[:, 0]
                ks = _np_rope(k[b, :, None, kv * s.head_dim:(kv + 1) * s.head_dim], s.rope_base)[:, 0]
                sc = qs @ ks.T / math.sqrt(s.head_dim)
                sc = np.where(np.tril(np.ones((T, T), bool)), sc, -np.inf)
                a = np.exp(sc - sc.max(-1, keepdims=True))
                a /= a.sum(-1, keepdims=True)
                out[b, :, hd * s.head_dim:(hd + 1) * s.head_dim] = a @ v[b, :, kv * s.head_dim:(kv + 1) * s.head_dim]
        x = x + out @ P(blk.attn.o.kernel)
        h = rms(x, blk.mlp_norm.scale)
        x = x + gelu(h @ P(blk.mlp.c_fc.kernel)) @ P(blk.mlp.down_proj.kernel)
    return rms(x, model.norm.scale) @ P(model.unembed.kernel)


def test_forward_matches_numpy_and_is_causal():
    model = LlamaLM(SMALL, rngs=nnx.Rngs(0))
    tokens = np.asarray(jax.random.randint(jax.random.key(1), (2, 9), 0, 64))
    logits = np.asarray(model(jnp.asarray(tokens)))
    np.testing.assert_allclose(logits, _np_forward(model, tokens), atol=2e-4, rtol=2e-4)
    changed = tokens.copy()
    changed[:, 5:] = (changed[:, 5:] + 1) % 64
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(changed)))[:, :5], logits[:, :5], atol=1e-5)
    lp = logits[:, :-1] - np.log(np.exp(logits[:, :-1]).sum(-1, keepdims=True))
    ce = -np.mean(np.take_along_axis(lp, tokens[:, 1:, None], -1))
    assert float(next_token_ce(jnp.asarray(logits), jnp.asarray(tokens))) == pytest.approx(ce, rel=1e-5)


def test_all_six_matrices_of_every_layer_are_sites():
    """(Exact reconstruction through the sites is tests/spdjax/targets/test_transformer.py's.)"""
    import spdjax

    model = LlamaLM(SMALL, rngs=nnx.Rngs(0))
    target = spdjax.from_nnx(model, sites={"blocks.*.attn.*": 16, "blocks.*.mlp.*": 16})
    shapes = {s.name: (s.d_in, s.d_out) for s in target.sites}
    kv = SMALL.n_kv_heads * SMALL.head_dim
    for l in range(2):
        assert shapes[f"blocks.{l}.attn.q"] == (16, 16) and shapes[f"blocks.{l}.attn.k"] == (16, kv)
        assert shapes[f"blocks.{l}.attn.v"] == (16, kv) and shapes[f"blocks.{l}.attn.o"] == (16, 16)
        assert shapes[f"blocks.{l}.mlp.c_fc"] == (16, 32) and shapes[f"blocks.{l}.mlp.down_proj"] == (32, 16)
    assert len(shapes) == 12


def test_unigram_ce_matches_a_direct_count():
    from experiments.lm.train_target import unigram_ce

    train, held = np.array([0, 1, 1, 2, 2, 2]), np.array([2, 1, 3])
    p = (np.array([1, 2, 3, 0]) + 1) / 10
    assert unigram_ce(train, held, 4) == pytest.approx(-np.mean(np.log(p[[2, 1, 3]])))


def test_target_trains_caches_and_beats_unigram(tmp_path):
    """A tiny target on two plays: held-out CE falls below the unigram CE; the second call loads it."""
    from experiments.lm.train_target import LMTargetConfig, load_or_train

    cfg = LMTargetConfig(vocab_size=256, d_model=32, n_heads=2, n_kv_heads=1, d_mlp=64, seq_len=32, batch_size=16,
                         steps=150, lr=1e-2, warmup_steps=10, eval_every=150, eval_windows=32, held_out_every=2, n_docs=2)
    model, info, corpus = load_or_train(cfg, tmp_path, progress=False)
    assert not info["cached"] and info["ce"] < info["unigram_ce"] and info["ce"] < info["zero_ablation_ce"]
    again, info2, _ = load_or_train(cfg, tmp_path, progress=False)
    assert info2["cached"] and info2["ce"] == info["ce"]
    tokens = jnp.asarray(corpus.held_out[:32][None].astype(np.int32))
    np.testing.assert_array_equal(again(tokens), model(tokens))

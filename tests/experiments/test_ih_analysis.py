"""The induction-head analysis's pieces against float64 NumPy references and plain loops."""

import math

import jax
import jax.numpy as jnp
import numpy as np

from experiments.ih.analysis import ablation_masks, attention_kl, last_token_stats, qk_offset_scores, token_positions
from experiments.ih.model import attention_scores, sinusoidal


def test_last_token_stats_match_numpy():
    rng = np.random.default_rng(0)
    logits, labels = rng.normal(size=(32, 130)), rng.integers(0, 130, 32)
    s = last_token_stats(jnp.asarray(logits, jnp.float32), jnp.asarray(labels))
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    np.testing.assert_allclose(float(s["ce"]), -logp[np.arange(32), labels].mean(), rtol=1e-5)
    assert float(s["accuracy"]) == np.mean(logits.argmax(-1) == labels)


def test_attention_kl_matches_numpy_on_causal_rows():
    rng = np.random.default_rng(1)
    T = 6
    causal = np.tril(np.ones((T, T), bool))

    def rows():
        x = np.where(causal, rng.normal(size=(3, T, T)), -np.inf)
        e = np.exp(x - x.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    p, q = rows(), rows()
    ref = np.mean([[sum(p[b, t, s] * math.log(p[b, t, s] / q[b, t, s]) for s in range(t + 1)) for t in range(T)]
                   for b in range(3)])
    np.testing.assert_allclose(float(attention_kl(jnp.asarray(p, jnp.float32), jnp.asarray(q, jnp.float32))), ref, rtol=1e-4)
    assert float(attention_kl(jnp.asarray(p), jnp.asarray(p))) == 0.0


def test_attention_scores_pick_the_circuit_entries():
    B, T = 3, 8
    m_pos = jnp.array([3, 5, 6])
    a0 = jnp.zeros((B, T, T)).at[jnp.arange(B), m_pos, m_pos - 1].set(0.7)
    a1 = jnp.zeros((B, T, T)).at[jnp.arange(B), -1, m_pos].set(0.9)
    s = attention_scores([a0, a1], m_pos)
    np.testing.assert_allclose(float(s["prev_at_m"]), 0.7)
    np.testing.assert_allclose(float(s["induction"]), 0.9)
    np.testing.assert_allclose(float(s["prev_token_score"]), 3 * 0.7 / (B * (T - 1)), rtol=1e-6)


def test_qk_offset_scores_against_a_loop_and_the_target():
    rng = np.random.default_rng(2)
    d, C, T = 4, 5, 10
    Vq, Uq, Vk, Uk = (rng.normal(size=s) for s in ((d, C), (C, d), (d, C), (C, d)))
    pos = np.asarray(sinusoidal(T, d), np.float64)
    F = np.asarray(qk_offset_scores(*(jnp.asarray(a, jnp.float32) for a in (Vq, Uq, Vk, Uk)), jnp.asarray(pos, jnp.float32)))
    ref = np.zeros((C, C, T))
    for c in range(C):
        for e in range(C):
            for D in range(T):
                vals = [(pos[t] @ Vq[:, c]) * (Uq[c] @ Uk[e]) * (pos[t - D] @ Vk[:, e]) for t in range(D, T)]
                ref[c, e, D] = np.mean(vals) / math.sqrt(d)
    np.testing.assert_allclose(F, ref, rtol=1e-4, atol=1e-5)
    # summed over pairs: the target's positional score pos_t Wq Wk^T pos_s^T / sqrt(d) with Wq = Vq Uq
    Wq, Wk = Vq @ Uq, Vk @ Uk
    target = [np.mean([pos[t] @ Wq @ Wk.T @ pos[t - D] for t in range(D, T)]) / math.sqrt(d) for D in range(T)]
    np.testing.assert_allclose(F.sum((0, 1)), target, rtol=1e-4, atol=1e-4)


def test_ablation_masks_zero_the_active_set_or_as_many_inactive_ones():
    B, T, C = 16, 8, 10
    g = jax.random.uniform(jax.random.key(0), (B, T, C))
    ci = {"a": g, "b": jnp.full((B, T, 3), 0.5)}
    pos = token_positions(jnp.full((B,), 4), T)["M"]
    masks, n = ablation_masks(ci, "a", pos, 0.6, None)
    active = np.asarray(g)[np.arange(B), 4] > 0.6
    m = np.asarray(masks["a"].mask)
    np.testing.assert_array_equal(m[:, 4], (~active).astype(np.float32))
    assert (np.delete(m, 4, axis=1) == 1).all() and (np.asarray(masks["b"].mask) == 1).all()
    np.testing.assert_allclose(float(n), active.sum(-1).mean())
    masks, n_ctrl = ablation_masks(ci, "a", pos, 0.6, jax.random.key(1))
    dropped = np.asarray(masks["a"].mask)[:, 4] == 0
    assert not (dropped & active).any()  # only inactive ones
    np.testing.assert_array_equal(dropped.sum(-1), np.minimum(active.sum(-1), C - active.sum(-1)))
    np.testing.assert_allclose(float(n_ctrl), dropped.sum(-1).mean())

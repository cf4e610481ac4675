"""experiments.lm.evaluation against float64 NumPy: the next-token KL and CE, `ce_unrecovered`, CI-L0 per
site and layer, and the alive counts over every held-out token (read in uneven chunks) against one pass
over all of them."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import spdjax
from experiments.lm.evaluation import MEAN_CI_ALIVE, make_analyze, next_token_kl
from experiments.lm.model import LlamaLM, LMShape
from experiments.lm.train_target import zero_ablated
from spdjax import metrics
from spdjax.losses import LossConfig


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _ce(logits, tokens):
    lp = _log_softmax(np.asarray(logits, np.float64))[:, :-1]
    return -np.mean(np.take_along_axis(lp, np.asarray(tokens)[:, 1:, None], -1))


def test_next_token_kl_matches_numpy():
    rng = np.random.default_rng(0)
    t, q = rng.normal(size=(3, 6, 11)), rng.normal(size=(3, 6, 11))
    lt, lq = _log_softmax(t)[:, :-1], _log_softmax(q)[:, :-1]
    want = np.mean(np.sum(np.exp(lt) * (lt - lq), -1))
    np.testing.assert_allclose(next_token_kl(jnp.asarray(t, jnp.float32), jnp.asarray(q, jnp.float32)), want, rtol=1e-5)


@pytest.fixture(scope="module")
def case():
    model = LlamaLM(LMShape(32, 16, 2, 2, 1, 32), rngs=nnx.Rngs(0))
    target = spdjax.from_nnx(model, sites={"blocks.*.attn.*": 6, "blocks.*.mlp.*": 6}, call=lambda m, b: m(b["tokens"]))
    params = spdjax.init_decomposition(jax.random.key(1), target, ci_type="shared_mlp", ci_hidden=(8,))
    rng = np.random.default_rng(2)
    held = np.zeros((4, 8), np.int32)  # the target's greedy continuations: it beats its zero ablation there
    held[:, 0] = rng.integers(0, 32, size=4)
    for t in range(7):
        held[:, t + 1] = np.argmax(np.asarray(model(jnp.asarray(held)))[:, t], -1)
    all_held = rng.integers(0, 32, size=(10, 8)).astype(np.int32)
    loss = LossConfig(terms=(("importance_minimality", {"coeff": 1.0}),), ci_l0_threshold=0.3)
    analyze = make_analyze({"tokens": held}, 0, all_held=all_held, chunk_tokens=24)  # chunks of 3 windows: 3+3+3+1
    return model, target, params, held, all_held, loss, analyze(params, target, None, loss)


def test_ce_and_ce_unrecovered(case):
    model, target, params, held, _, _, out = case
    ce_t = _ce(model(jnp.asarray(held)), held)
    ce_zero = _ce(zero_ablated(model)(jnp.asarray(held)), held)
    np.testing.assert_allclose(out["target_ce"], ce_t, rtol=1e-5)
    np.testing.assert_allclose(out["ce/zero"], ce_zero, rtol=1e-5)
    assert ce_zero > ce_t + 0.1
    assert out["kl/zero"] > 0
    for m in ("unmasked", "ci", "rounded", "stochastic", "random", "zero"):
        np.testing.assert_allclose(out[f"ce_unrecovered/{m}"], (out[f"ce/{m}"] - ce_t) / (ce_zero - ce_t), rtol=1e-4)


def test_ci_l0_and_alive_counts(case):
    _, target, params, held, all_held, loss, out = case
    ci = metrics.batch_ci(params, target, {"tokens": held}, loss.sigmoid)
    every = metrics.batch_ci(params, target, {"tokens": all_held}, loss.sigmoid)  # one pass over all windows
    assert out["n_mean_ci_tokens"] == all_held.size
    per_layer = {"0": 0.0, "1": 0.0}
    for n, g in ci.items():
        l0 = np.mean(np.sum(np.asarray(g, np.float64) > 0.3, -1))
        np.testing.assert_allclose(out[f"ci_l0/{n}"], l0, rtol=1e-6)
        per_layer[n.split(".")[1]] += l0
        flat = np.asarray(every[n], np.float64).reshape(-1, g.shape[-1])
        assert out[f"n_alive_mean_ci/{n}"] == np.sum(flat.mean(0) > MEAN_CI_ALIVE)
        assert out[f"n_alive_max_ci/{n}"] == np.sum(flat.max(0) > 0.3)
    for layer, v in per_layer.items():
        np.testing.assert_allclose(out[f"ci_l0_layer/{layer}"], v, rtol=1e-6)
    assert 0 < out["n_alive_max_ci"] <= out["n_alive_mean_ci"] <= 12 * 6

"""spdjax.lowrank and `loss.low_rank_outputs`: factored site outputs give the same losses and gradients
as the dense ones (float64), on a 2-layer ResidMLP whose masked `mlp_out` outputs stay factored through
the residual stream into the next layer's sites and the unembedding. Also `sites.matmul`, the other
reformulated product of the factored forward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import spdjax
from experiments.resid_mlp.model import ResidMLP
from spdjax.losses import LossConfig, loss_fn
from spdjax.lowrank import LowRankSum, dense


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


def test_low_rank_sum_against_dense(x64):
    rng = np.random.default_rng(0)
    r = lambda *s: jnp.asarray(rng.normal(size=s))  # noqa: E731
    a = LowRankSum(r(5, 7), ((r(5, 3), r(3, 7)),))
    b = LowRankSum(None, ((r(5, 2), r(2, 7)), (r(5, 1), r(1, 7))))
    bias = r(7)
    want_a = a.base + a.terms[0][0] @ a.terms[0][1]
    want_b = sum(left @ right for left, right in b.terms)
    np.testing.assert_allclose(a.dense(), want_a, rtol=1e-12)
    np.testing.assert_allclose(dense(b), want_b, rtol=1e-12)
    s = (a + b) + bias
    t = bias + (b + a)
    assert isinstance(s, LowRankSum) and s.shape == (5, 7) and s.dtype == jnp.float64 and s.ndim == 2
    np.testing.assert_allclose(s.dense(), want_a + want_b + bias, rtol=1e-12)
    np.testing.assert_allclose(t.dense(), want_a + want_b + bias, rtol=1e-12)
    w = r(7, 4)
    np.testing.assert_allclose(s @ w, (want_a + want_b + bias) @ w, rtol=1e-10)
    # an array on the left defers to LowRankSum (no silent densifying)
    assert isinstance(r(5, 7) + b, LowRankSum)
    with pytest.raises(TypeError):
        jax.nn.relu(b)


def _resid_target(seed=0):
    rng = np.random.default_rng(seed)
    W_E = rng.normal(size=(6, 24))
    model = ResidMLP(W_E / np.linalg.norm(W_E, axis=1, keepdims=True), d_mlp=4, n_layers=2, rngs=nnx.Rngs(seed))
    # C = 5, d_in 4 (delta term): rank 9 < d_embed 24 for mlp_out; mlp_in (d_out 4) stays dense
    return spdjax.from_nnx(model, {"layers.*.mlp_in": 5, "layers.*.mlp_out": 5})


TERMS = {
    "stochastic_recon": {"coeff": 1.0},
    "stochastic_recon_layerwise": {"coeff": 1.0},
    "stochastic_recon_subset": {"coeff": 1.0},
    "pgd_recon": {"coeff": 1.0, "n_steps": 2},
    "importance_minimality": {"coeff": 1e-3},
}


@pytest.mark.parametrize("use_delta, n_samples", [(True, 1), (False, 1), (True, 2)])
def test_loss_and_grads_match_dense(x64, use_delta, n_samples):
    target = _resid_target()
    target = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), target)
    params = spdjax.init_decomposition(jax.random.key(1), target, dtype=jnp.float64)
    params = jax.tree.map(lambda p: p + 0.3 * jax.random.normal(jax.random.key(2), p.shape, p.dtype), params)
    x = jax.random.uniform(jax.random.key(3), (16, 6), jnp.float64) * (jax.random.uniform(jax.random.key(4), (16, 6)) < 0.3)
    out = {}
    for low_rank in (False, True):
        cfg = LossConfig(terms=TERMS, use_delta_component=use_delta, low_rank_outputs=low_rank, n_mask_samples=n_samples)
        f = jax.value_and_grad(lambda p: loss_fn(p, target, x, jax.random.key(5), cfg, 0.5), has_aux=True)
        (loss, metrics), grads = jax.jit(f)(params)
        flops = jax.jit(f).lower(params).compile().cost_analysis()["flops"]
        out[low_rank] = (loss, metrics, grads, flops)
    (l0, m0, g0, f0), (l1, m1, g1, f1) = out[False], out[True]
    assert f1 < f0  # the factored outputs do less work
    assert float(l0) > 0
    np.testing.assert_allclose(float(l1), float(l0), rtol=1e-10)
    for k in m0:
        np.testing.assert_allclose(np.asarray(m1[k]), np.asarray(m0[k]), rtol=1e-9, atol=1e-12, err_msg=k)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-8, atol=1e-12)


def test_low_rank_outputs_must_be_bool():
    with pytest.raises(ValueError, match="low_rank_outputs must be a bool"):
        LossConfig(low_rank_outputs=1)


@pytest.mark.parametrize("k, n", [(1, 7), (2, 20), (4, 5), (20, 2), (9, 4), (6, 6)])
def test_small_matmul_equals_dot(x64, k, n):
    """`sites.matmul` (multiplies and a sum for a width <= SMALL_DOT) against `@`, values and gradients."""
    from jax.test_util import check_grads

    from spdjax.sites import matmul

    rng = np.random.default_rng(k * 10 + n)
    x, w = jnp.asarray(rng.normal(size=(3, 5, k))), jnp.asarray(rng.normal(size=(k, n)))
    np.testing.assert_allclose(matmul(x, w), x @ w, rtol=1e-12, atol=1e-12)
    check_grads(matmul, (x, w), order=2, modes=("fwd", "rev"))


def test_clean_reads_merge_the_passes_gradient_products(x64, monkeypatch):
    """With `clean_reads`, the passes read layer 1's V through one shared product of the clean embedding
    (one dL/dV product for it instead of one per pass): fewer FLOPs, the same loss and gradients."""
    import spdjax.losses.loss as loss_mod

    target = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), _resid_target(1))
    params = spdjax.init_decomposition(jax.random.key(1), target, dtype=jnp.float64)
    x = jax.random.uniform(jax.random.key(3), (16, 6), jnp.float64)
    cfg = LossConfig(terms=TERMS, low_rank_outputs=True)
    f = jax.jit(jax.value_and_grad(lambda p: loss_fn(p, target, x, jax.random.key(5), cfg, 0.5)[0]))
    (l1, g1), c1 = f(params), f.lower(params).compile().cost_analysis()["flops"]
    monkeypatch.setattr(loss_mod, "clean_reads", lambda *a: {})
    f = jax.jit(jax.value_and_grad(lambda p: loss_fn(p, target, x, jax.random.key(5), cfg, 0.5)[0]))
    (l0, g0), c0 = f(params), f.lower(params).compile().cost_analysis()["flops"]
    assert c1 < c0
    np.testing.assert_allclose(float(l1), float(l0), rtol=1e-10)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-8, atol=1e-12)

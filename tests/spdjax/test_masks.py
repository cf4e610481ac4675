"""spdjax.masks: m = g + (1 - g) r, sampling statistics, delta masks, keying and independence."""

import jax
import jax.numpy as jnp
import numpy as np
import numpy_ref as ref  # tests/ is on sys.path (pytest rootdir-relative import)
import pytest

from spdjax import masks as masks_lib
from spdjax.masks import SiteMask

B, T = 4, 5
S = 64
CS = {"a": 3, "b": 6}

_sample = jax.jit(masks_lib.sample_masks, static_argnums=(2, 3, 4))


def _ci(seed=0, high=0.9):
    """CI values g in [0, high] per site, with some exact zeros; g < 1 so r is recoverable."""
    rng = np.random.default_rng(seed)
    out = {}
    for n, c in CS.items():
        g = rng.uniform(0.0, high, size=(B, T, c))
        g[0, 0] = 0.0
        out[n] = g
    return out


def _recover_r(m, g):
    """r = (m - g) / (1 - g), in float64."""
    g = ref.f64(g)
    return (ref.f64(m) - g) / (1.0 - g)


@pytest.fixture(scope="module")
def continuous():
    g = _ci()
    masks = _sample(jax.random.key(0), {n: jnp.asarray(v, jnp.float32) for n, v in g.items()}, S,
                    "continuous", True)
    return g, masks


def test_shapes_and_dtypes(continuous):
    g, masks = continuous
    assert set(masks) == set(CS)
    for n, c in CS.items():
        m = masks[n]
        assert isinstance(m, SiteMask)
        assert m.mask.shape == (S, B, T, c) and m.mask.dtype == jnp.float32
        assert m.delta.shape == (S, B, T) and m.delta.dtype == jnp.float32


def test_mask_identity_and_uniform_r(continuous):
    """m = g + (1 - g) r with r ~ U(0, 1): recover r, check range and moments."""
    g, masks = continuous
    for n in CS:
        m = ref.f64(masks[n].mask)
        gg = np.broadcast_to(g[n], m.shape)
        # g <= m <= 1 everywhere (m interpolates between g and 1)
        assert np.all(m >= gg - 1e-6) and np.all(m <= 1.0 + 1e-6)
        r = _recover_r(m, gg)
        assert r.min() >= -1e-5 and r.max() < 1.0 + 1e-5
        # U(0, 1): mean 1/2, variance 1/12, quartiles at 1/4, 3/4 (n = S*B*T*C >= 3840 samples)
        assert abs(r.mean() - 0.5) < 0.02, r.mean()
        assert abs(r.var() - 1 / 12) < 0.01, r.var()
        assert abs(np.mean(r < 0.25) - 0.25) < 0.03
        assert abs(np.mean(r < 0.75) - 0.75) < 0.03
        # r does not depend on g: same distribution where g is small and where it is large
        small, large = gg < 0.3, gg > 0.6
        assert abs(r[small].mean() - r[large].mean()) < 0.05


def test_stochastic_mask_function():
    rng = np.random.default_rng(1)
    g, r = rng.uniform(size=(B, 3)), rng.uniform(size=(S, B, 3))
    got = masks_lib.stochastic_mask(jnp.asarray(g, jnp.float32), jnp.asarray(r, jnp.float32))
    np.testing.assert_allclose(np.asarray(got), g + (1 - g) * r, rtol=1e-6, atol=1e-7)


def test_delta_masks_uniform_and_independent(continuous):
    g, masks = continuous
    d_a, d_b = ref.f64(masks["a"].delta), ref.f64(masks["b"].delta)
    for d in (d_a, d_b):
        assert d.min() >= 0.0 and d.max() < 1.0
        assert abs(d.mean() - 0.5) < 0.03 and abs(d.var() - 1 / 12) < 0.012
    # independent of the other site's delta and of the CI masks' r
    assert abs(np.corrcoef(d_a.ravel(), d_b.ravel())[0, 1]) < 0.1
    r_a = _recover_r(masks["a"].mask, g["a"])
    assert abs(np.corrcoef(d_a.ravel(), r_a[..., 0].ravel())[0, 1]) < 0.1
    assert not np.allclose(d_a, d_b)


def test_independence_across_sites_samples_positions(continuous):
    """Same g for two sites must still give different r; samples and positions differ too."""
    g = np.full((B, T, 3), 0.2)
    masks = _sample(jax.random.key(3), {"a": jnp.asarray(g, jnp.float32), "b": jnp.asarray(g, jnp.float32)},
                    S, "continuous", True)
    ra, rb = _recover_r(masks["a"].mask, g), _recover_r(masks["b"].mask, g)
    assert np.mean(np.isclose(ra, rb)) < 0.01
    assert abs(np.corrcoef(ra.ravel(), rb.ravel())[0, 1]) < 0.1
    # across samples, batch rows, positions and subcomponents: all draws distinct
    assert len(np.unique(ra)) > 0.99 * ra.size
    assert abs(np.corrcoef(ra[0].ravel(), ra[1].ravel())[0, 1]) < 0.3


def test_same_key_same_masks_different_key_different(continuous):
    g, masks = continuous
    gj = {n: jnp.asarray(v, jnp.float32) for n, v in g.items()}
    again = _sample(jax.random.key(0), gj, S, "continuous", True)
    other = _sample(jax.random.key(1), gj, S, "continuous", True)
    for n in CS:
        np.testing.assert_array_equal(np.asarray(again[n].mask), np.asarray(masks[n].mask))
        np.testing.assert_array_equal(np.asarray(again[n].delta), np.asarray(masks[n].delta))
        assert not np.allclose(np.asarray(other[n].mask), np.asarray(masks[n].mask))
        assert not np.allclose(np.asarray(other[n].delta), np.asarray(masks[n].delta))


def test_binomial_masks():
    g = _ci(seed=2)
    masks = _sample(jax.random.key(4), {n: jnp.asarray(v, jnp.float32) for n, v in g.items()}, S,
                    "binomial", False)
    for n, c in CS.items():
        assert masks[n].delta is None
        m = ref.f64(masks[n].mask)
        assert m.shape == (S, B, T, c)
        r = _recover_r(m, g[n])
        rr = np.round(r)
        np.testing.assert_allclose(r, rr, atol=1e-5)  # r in {0, 1}
        assert set(np.unique(rr)) == {0.0, 1.0}
        assert abs(rr.mean() - 0.5) < 0.03
        # so m is either g or 1
        gg = np.broadcast_to(g[n], m.shape)
        assert np.all(np.isclose(m, gg, atol=1e-6) | np.isclose(m, 1.0, atol=1e-6))


def test_no_delta_option():
    g = {"a": jnp.full((B, T, 2), 0.5)}
    masks = masks_lib.sample_masks(jax.random.key(0), g, 2, "continuous", use_delta=False)
    assert masks["a"].delta is None and masks["a"].mask.shape == (2, B, T, 2)
    with pytest.raises(ValueError, match="unknown mask type"):
        masks_lib.sample_masks(jax.random.key(0), g, 1, "gaussian")


def test_reparameterisation_gradient():
    """dm/dg = 1 - r: the gradient of sum(m) w.r.t. g is sum_s (1 - r_s)."""
    g = _ci(seed=5)["a"]
    gj = jnp.asarray(g, jnp.float32)
    key = jax.random.key(6)

    def total(g):
        return jnp.sum(masks_lib.sample_masks(key, {"a": g}, 8, "continuous", False)["a"].mask)

    grad = np.asarray(jax.grad(total)(gj))
    m = masks_lib.sample_masks(key, {"a": gj}, 8, "continuous", False)["a"].mask
    r = _recover_r(m, g)
    np.testing.assert_allclose(grad, np.sum(1.0 - r, axis=0), rtol=1e-4, atol=1e-5)


def test_deterministic_ones_and_take_sample():
    rng = np.random.default_rng(7)
    g = {"a": jnp.asarray(rng.uniform(size=(B, T, 3)), jnp.float32)}
    det = masks_lib.deterministic_masks(g)
    np.testing.assert_array_equal(np.asarray(det["a"].mask), np.asarray(g["a"]))
    assert det["a"].delta is None
    ones = masks_lib.ones_masks(g, use_delta=True)
    assert np.all(np.asarray(ones["a"].mask) == 1.0) and ones["a"].mask.shape == (B, T, 3)
    assert np.all(np.asarray(ones["a"].delta) == 1.0) and ones["a"].delta.shape == (B, T)
    assert masks_lib.ones_masks(g)["a"].delta is None
    stacked = {"a": SiteMask(jnp.arange(2 * 3.0).reshape(2, 3), jnp.arange(2.0))}
    s1 = masks_lib.take_sample(stacked, 1)
    np.testing.assert_array_equal(np.asarray(s1["a"].mask), [3.0, 4.0, 5.0])
    assert float(s1["a"].delta) == 1.0

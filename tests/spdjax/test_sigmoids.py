"""spdjax.sigmoids against the NumPy float64 reference (values, gradients, custom VJP)."""

import jax
import jax.numpy as jnp
import numpy as np
import numpy_ref as ref  # tests/ is on sys.path (pytest rootdir-relative import)
import pytest
from jax.test_util import check_grads

from spdjax import sigmoids

RTOL, ATOL = 1e-6, 1e-7

# points below 0, at the kinks, inside (0, 1), above 1
Z = np.array([-3.0, -0.7, -1e-3, 0.0, 1e-3, 0.2, 0.5, 0.9, 1.0, 1.001, 1.5, 4.0], np.float32)
# the same without the kinks at exactly 0 and 1 (for derivative comparisons)
Z_SMOOTH = np.array([-3.0, -0.7, -1e-2, 1e-2, 0.2, 0.5, 0.9, 1.01, 1.5, 4.0], np.float32)

FORWARD = [
    (sigmoids.hard_sigmoid, ref.hard),
    (sigmoids.lower_leaky_hard, ref.lower_leaky_hard),
    (sigmoids.lower_leaky_hard_paper, ref.lower_leaky_hard_paper),
    (sigmoids.upper_leaky_hard, ref.upper_leaky_hard),
    (sigmoids.logistic, ref.logistic),
]


@pytest.mark.parametrize("fn,ref_fn", FORWARD, ids=lambda f: getattr(f, "__name__", ""))
def test_forward_values(fn, ref_fn):
    got = np.asarray(fn(jnp.asarray(Z)))
    np.testing.assert_allclose(got, ref_fn(Z), rtol=RTOL, atol=ATOL)
    # elementwise on any shape
    z2 = Z[:12].reshape(3, 4)
    np.testing.assert_allclose(np.asarray(fn(jnp.asarray(z2))), ref_fn(z2), rtol=RTOL, atol=ATOL)


def test_forward_specific_values():
    """Spot values straight from the spec's definitions (guards the reference itself)."""
    z = jnp.asarray([-2.0, 0.5, 3.0])
    np.testing.assert_allclose(sigmoids.hard_sigmoid(z), [0.0, 0.5, 1.0])
    np.testing.assert_allclose(sigmoids.lower_leaky_hard(z), [0.0, 0.5, 1.0])
    np.testing.assert_allclose(sigmoids.lower_leaky_hard_paper(z), [-0.02, 0.5, 1.0], rtol=1e-6)
    np.testing.assert_allclose(sigmoids.upper_leaky_hard(z), [0.0, 0.5, 1.02], rtol=1e-6)
    np.testing.assert_allclose(sigmoids.logistic(z), [1 / (1 + np.exp(2.0)), 1 / (1 + np.exp(-0.5)),
                                                      1 / (1 + np.exp(-3.0))], rtol=1e-6)


GRADS = [
    (sigmoids.hard_sigmoid, ref.hard_grad),
    (sigmoids.lower_leaky_hard_paper, ref.lower_leaky_hard_paper_grad),
    (sigmoids.upper_leaky_hard, ref.upper_leaky_hard_grad),
    (sigmoids.logistic, ref.logistic_grad),
]


@pytest.mark.parametrize("fn,ref_grad", GRADS, ids=lambda f: getattr(f, "__name__", ""))
def test_gradients_match_analytic(fn, ref_grad):
    z = jnp.asarray(Z_SMOOTH)
    got = jax.vmap(jax.grad(fn))(z)
    np.testing.assert_allclose(np.asarray(got), ref_grad(Z_SMOOTH), rtol=1e-6, atol=1e-7)
    # vjp with a non-trivial cotangent
    ct = np.linspace(-2.0, 3.0, Z_SMOOTH.size).astype(np.float32)
    _, vjp = jax.vjp(fn, z)
    np.testing.assert_allclose(np.asarray(vjp(jnp.asarray(ct))[0]), ct * ref_grad(Z_SMOOTH),
                               rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_lower_leaky_hard_custom_vjp(sign):
    """Reference-main backward: pass on (0, 1], block above 1, 0.01*ct below 0 only for ct < 0."""
    z = jnp.asarray(Z)
    ct = sign * np.linspace(0.5, 2.0, Z.size).astype(np.float32)
    y, vjp = jax.vjp(sigmoids.lower_leaky_hard, z)
    np.testing.assert_allclose(np.asarray(y), ref.hard(Z))
    got = np.asarray(vjp(jnp.asarray(ct))[0])
    want = ref.lower_leaky_hard_vjp(Z, ct)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)
    below = Z <= 0
    if sign > 0:
        assert np.all(got[below] == 0.0)  # a positive gradient cannot push z further down
    else:
        assert np.all(got[below] < 0.0)  # a negative gradient leaks through (pushes z up)
        np.testing.assert_allclose(got[below], 0.01 * ct[below], rtol=1e-6)
    assert np.all(got[Z > 1] == 0.0)
    inside = (Z > 0) & (Z <= 1)
    np.testing.assert_allclose(got[inside], ct[inside], rtol=1e-7)


def test_lower_leaky_hard_mixed_cotangent_signs_and_grad():
    z = jnp.asarray(Z)
    ct = np.where(np.arange(Z.size) % 2 == 0, -1.3, 0.7).astype(np.float32)
    _, vjp = jax.vjp(sigmoids.lower_leaky_hard, z)
    np.testing.assert_allclose(np.asarray(vjp(jnp.asarray(ct))[0]), ref.lower_leaky_hard_vjp(Z, ct),
                               rtol=1e-6)
    # jax.grad of a scalar loss that wants g larger (dL/dg = -1 < 0): leak below 0 is 0.01 * -1
    g = jax.grad(lambda z: -jnp.sum(sigmoids.lower_leaky_hard(z)))(z)
    np.testing.assert_allclose(np.asarray(g), ref.lower_leaky_hard_vjp(Z, -np.ones_like(Z)), rtol=1e-6)
    # ... and under jit and vmap the custom rule still applies
    gj = jax.jit(jax.vmap(jax.grad(lambda z: -sigmoids.lower_leaky_hard(z))))(z)
    np.testing.assert_allclose(np.asarray(gj), np.asarray(g), rtol=1e-7)


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


@pytest.mark.parametrize(
    "fn,points",
    [
        (sigmoids.logistic, [-3.0, -0.4, 0.0, 0.3, 2.5]),
        (sigmoids.hard_sigmoid, [-2.0, -0.3, 0.2, 0.6, 0.9, 1.4]),
        (sigmoids.lower_leaky_hard_paper, [-2.0, -0.3, 0.2, 0.6, 1.4]),
        (sigmoids.upper_leaky_hard, [-2.0, -0.3, 0.2, 0.6, 1.4, 3.0]),
        # the custom VJP equals the true derivative wherever z > 0 (away from the kink at 1)
        (sigmoids.lower_leaky_hard, [0.1, 0.5, 0.95, 1.2, 2.0]),
    ],
    ids=["logistic", "hard", "lower_leaky_hard_paper", "upper_leaky_hard", "lower_leaky_hard_pos"],
)
def test_check_grads_x64(x64, fn, points):
    z = jnp.asarray(points, jnp.float64)
    assert z.dtype == jnp.float64
    check_grads(fn, (z,), order=1, modes=("rev",), eps=1e-6, atol=1e-8, rtol=1e-8)
    # and the x64 values against the float64 reference to 1e-12
    ref_fn = {f: r for f, r in FORWARD}[fn]
    np.testing.assert_allclose(np.asarray(fn(z)), ref_fn(np.asarray(points)), rtol=1e-12, atol=1e-14)


def test_lower_leaky_hard_vjp_differs_from_finite_differences_below_zero(x64):
    """Below 0 the reference-main VJP is deliberately not the derivative of clip (which is 0)."""
    z = jnp.asarray([-0.5, -0.2], jnp.float64)
    f = lambda z: -jnp.sum(sigmoids.lower_leaky_hard(z))  # noqa: E731
    fd = (f(z + 1e-6) - f(z - 1e-6)) / 2e-6
    assert abs(float(fd)) < 1e-9  # the forward pass is flat below 0 ...
    np.testing.assert_allclose(np.asarray(jax.grad(f)(z)), [-0.01, -0.01], rtol=1e-12)  # ... the VJP leaks


def test_sigmoid_pairs():
    """lower makes masks / CI-masked losses; upper feeds the minimality loss."""
    z = jnp.asarray(Z)
    for name, (lo, up) in ref.SIGMOID_PAIRS.items():
        pair = sigmoids.get_sigmoids(name)
        np.testing.assert_allclose(np.asarray(pair.lower(z)), lo(Z), rtol=RTOL, atol=ATOL, err_msg=name)
        np.testing.assert_allclose(np.asarray(pair.upper(z)), up(Z), rtol=RTOL, atol=ATOL, err_msg=name)
    with pytest.raises(ValueError, match="unknown sigmoid"):
        sigmoids.get_sigmoids("nope")

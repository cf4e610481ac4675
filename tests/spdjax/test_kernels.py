"""spdjax.kernels: the CPU kernel of the CI MLP's backward against the float64 reference, the pure-JAX
path, vmap and check_grads; and how it reports a missing or failed build."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import numpy_ref as ref
import pytest
from jax.test_util import check_grads

from spdjax import ci, kernels

pytestmark = pytest.mark.skipif(
    os.environ.get("SPDJAX_NO_CPU_KERNELS") == "1", reason="CPU kernels switched off (SPDJAX_NO_CPU_KERNELS=1)"
)


@pytest.fixture(scope="module")
def loaded():
    if not kernels.load():
        if os.environ.get("SPDJAX_REQUIRE_CPU_KERNELS") == "1":
            pytest.fail(f"CPU kernels: {kernels.status()}")
        pytest.skip(f"CPU kernels: {kernels.status()}")


def _args(N, C, H, seed=0, scale=1.0):
    rng = np.random.default_rng(seed)
    w1, b1, w2 = (jnp.asarray(rng.normal(size=(C, H)) * s, jnp.float32) for s in (1.5 * scale, 0.5, 0.3))
    h = jnp.asarray(rng.normal(size=(N, C)) * 2 * scale, jnp.float32)
    dz = jnp.asarray(rng.normal(size=(N, C)), jnp.float32)
    return w1, b1, w2, h, dz


_kernel = jax.jit(kernels.scalar_mlp_grads)
_jax = jax.jit(ci._scalar_mlp_grads)


# C and H off any vector width; N from one row to enough rows for several threads' pieces;
# scale 8 reaches pre-activations of |x| ~ 100 (the exp and erf tails).
@pytest.mark.parametrize(
    "N, C, H, scale",
    [(1, 1, 1, 1.0), (7, 5, 3, 1.0), (33, 20, 16, 1.0), (4096, 20, 16, 1.0), (300, 37, 33, 1.0), (64, 17, 16, 8.0)],
)
def test_backward_against_float64_reference(loaded, N, C, H, scale):
    args = _args(N, C, H, seed=N + C + H, scale=scale)
    got = _kernel(*args)
    want = ref.scalar_mlp_vjp(*args)
    for name, g, w in zip(("dw1", "db1", "dw2", "dh"), got, want):
        assert g.shape == w.shape and g.dtype == jnp.float32, name
        # float32 sums over N rows: the error scales with the size of the summed terms
        tol = 2e-6 * np.sqrt(N) * max(1.0, float(np.abs(w).max()))
        np.testing.assert_allclose(np.asarray(g), w, atol=tol, rtol=1e-5, err_msg=name)


def test_backward_matches_pure_jax_path(loaded):
    args = _args(2048, 100, 16, seed=3)
    for name, g, w in zip(("dw1", "db1", "dw2", "dh"), _kernel(*args), _jax(*args)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=2e-5, atol=2e-4, err_msg=name)


def test_scalar_mlp_uses_kernel_and_passes_check_grads(loaded):
    w1, b1, w2, h, _ = _args(6, 5, 4, seed=1)
    b2 = jnp.asarray([0.1, -0.2, 0.0, 0.3, 0.05], jnp.float32)
    hlo = jax.jit(jax.grad(lambda *a: ci.scalar_mlp(*a).sum(), argnums=(0, 1, 2, 3, 4))).lower(w1, b1, w2, b2, h)
    assert "spdjax_scalar_mlp_bwd" in hlo.as_text()
    # float32 finite differences: loose tolerances, but a wrong gradient is off by O(1)
    check_grads(ci.scalar_mlp, (w1, b1, w2, b2, h), order=1, modes=("rev",), eps=1e-2, atol=5e-2, rtol=5e-2)


def test_vmap_matches_loop(loaded):
    batch = [_args(9, 6, 5, seed=s) for s in range(3)]
    stacked = [jnp.stack(x) for x in zip(*batch)]
    got = jax.vmap(kernels.scalar_mlp_grads)(*stacked)
    for i, args in enumerate(batch):
        for g, w in zip(got, _kernel(*args)):
            np.testing.assert_array_equal(np.asarray(g[i]), np.asarray(w))


@pytest.fixture
def fresh_state(monkeypatch, tmp_path):
    """kernels.load() as on a fresh process, with an empty cache; the module's state restored after."""
    saved = dict(kernels._state)
    kernels._state.clear()
    monkeypatch.setenv("SPDJAX_KERNEL_CACHE", str(tmp_path))
    monkeypatch.delenv("SPDJAX_NO_CPU_KERNELS", raising=False)
    monkeypatch.delenv("SPDJAX_REQUIRE_CPU_KERNELS", raising=False)
    yield monkeypatch
    kernels._state.clear()
    kernels._state.update(saved)


def test_failed_build_warns_or_raises(fresh_state, tmp_path):
    cxx = tmp_path / "fake-c++"  # answers --version, fails every build
    cxx.write_text('#!/bin/sh\n[ "$1" = --version ] && echo fake 1.0 && exit 0\necho "error: boom" >&2\nexit 1\n')
    cxx.chmod(0o755)
    fresh_state.setenv("CXX", str(cxx))
    with pytest.warns(UserWarning, match="(?s)CPU kernels unavailable.*failed.*boom"):
        assert kernels.load() is False
    assert kernels.status().startswith("unavailable")
    assert [p.name for p in tmp_path.iterdir()] == ["fake-c++"]  # no half-written library left
    kernels._state.clear()
    fresh_state.setenv("SPDJAX_REQUIRE_CPU_KERNELS", "1")
    with pytest.raises(RuntimeError, match="SPDJAX_REQUIRE_CPU_KERNELS"):
        kernels.load()


def test_switched_off(fresh_state):
    fresh_state.setenv("SPDJAX_NO_CPU_KERNELS", "1")
    assert kernels.load() is False
    assert kernels.status() == "off (SPDJAX_NO_CPU_KERNELS=1)"


@pytest.mark.parametrize("n", [0, 1, 7, 1003, 100_003])
def test_threefry_matches_the_xla_op_form(loaded, n):
    """The Threefry kernel against `cpu_tuning.threefry2x32` (itself checked against Random123's known
    answers and NumPy in test_cpu_tuning): scalar keys, per-element keys, one broadcast axis; sizes off
    the vector width and big enough for several threads' pieces."""
    from spdjax import cpu_tuning

    rng = np.random.default_rng(n)
    u32 = lambda *s: jnp.asarray(rng.integers(0, 2**32, s, dtype=np.uint64).astype(np.uint32))  # noqa: E731
    x1, x2 = u32(n), u32(n)
    cases = [(u32(), u32(), x1, x2), (u32(n), u32(n), x1, x2), (u32(), u32(n), x1, u32())]
    if n:
        cases.append((u32(3, 1), u32(), u32(3, n), u32(1, n)))  # broadcast along both axes
    for args in cases:
        got = jax.jit(kernels.threefry2x32)(*args)
        want = jax.jit(cpu_tuning.threefry2x32)(*args)
        for g, w in zip(got, want):
            assert g.shape == w.shape and g.dtype == jnp.uint32
            np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def test_jax_random_lowers_to_the_threefry_kernel(loaded):
    hlo = jax.jit(lambda k: jax.random.uniform(k, (5, 3))).lower(jax.random.key(0)).as_text()
    assert "spdjax_threefry2x32" in hlo

"""spdjax.ci (init_ci / ci_raw) against the NumPy float64 reference."""

import jax
import jax.numpy as jnp
import numpy as np
import numpy_ref as ref  # tests/ is on sys.path (pytest rootdir-relative import)
import pytest
from jax.test_util import check_grads

from spdjax.ci import CIParams, ci_raw, init_ci
from spdjax.components import Components
from spdjax.sites import SiteSpec

KINDS = ("mlp", "vector_mlp", "shared_mlp")
HIDDEN = ((), (4,), (4, 3))
B, T, D_IN, C = 2, 3, 5, 4
SPEC = SiteSpec("site", "linear", (D_IN,), (6,), C, D_IN)


def _ci_shapes(kind, d_in, c, hidden):
    """(weight shape, bias shape) per layer, per the CIParams docstring."""
    first = 1 if kind == "mlp" else d_in
    last = c if kind == "shared_mlp" else 1
    dims = (first, *hidden, last)
    if kind == "shared_mlp":
        return [((fi, fo), (fo,)) for fi, fo in zip(dims[:-1], dims[1:])]
    return [((c, fi, fo), (c, fo)) for fi, fo in zip(dims[:-1], dims[1:])]


def _setup(kind, hidden, dtype=jnp.float32, seed=0, d_in=D_IN):
    """Random CI params (non-zero biases, O(1) weights), input (B, T, d_in) and V (numpy RNG: no compiles)."""
    rng = np.random.default_rng(seed)
    shapes = _ci_shapes(kind, d_in, C, hidden)
    p = CIParams(
        tuple(jnp.asarray(rng.normal(size=w) / np.sqrt(w[-2]), dtype) for w, _ in shapes),
        tuple(jnp.asarray(0.5 * rng.normal(size=b), dtype) for _, b in shapes),
        kind,
    )
    a = jnp.asarray(rng.normal(size=(B, T, d_in)), dtype)
    comp = Components(V=jnp.asarray(rng.normal(size=(d_in, C)), dtype), U=jnp.zeros((C, 6), dtype))
    return p, a, comp


_ci_raw = jax.jit(ci_raw, static_argnums=1)


def _ref(p: CIParams, a, comp):
    return ref.ci_raw(p.kind, [ref.f64(w) for w in p.weights], [ref.f64(b) for b in p.biases],
                      ref.f64(a), ref.f64(comp.V))


@pytest.mark.parametrize("hidden", HIDDEN, ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_ci_raw_values(kind, hidden):
    p, a, comp = _setup(kind, hidden)
    z = _ci_raw(p, SPEC, a, comp)
    assert z.shape == (B, T, C)
    want = _ref(p, a, comp)
    np.testing.assert_allclose(np.asarray(z), want, rtol=1e-5, atol=1e-5)
    # the per-position computation is independent of the batch layout
    z_flat = _ci_raw(p, SPEC, a.reshape(B * T, D_IN), comp)
    np.testing.assert_allclose(np.asarray(z_flat), want.reshape(B * T, C), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_ci_raw_embed_site(kind):
    """Embedding site: mlp reads rows V[id]; vector/shared MLPs read one-hot ids."""
    vocab = 7
    spec = SiteSpec("emb", "embed", (), (3,), C, vocab)
    p, _, comp = _setup(kind, (4,), seed=3, d_in=vocab)
    ids = jnp.asarray(np.random.default_rng(4).integers(0, vocab, (B, T)), jnp.int32)
    z = _ci_raw(p, spec, ids, comp)
    onehot = np.eye(vocab)[np.asarray(ids)]
    np.testing.assert_allclose(np.asarray(z), _ref(p, onehot, comp), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("hidden", HIDDEN, ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_init_shapes_and_zero_biases(kind, hidden):
    p = init_ci(jax.random.key(1), kind, D_IN, C, hidden)
    first = 1 if kind == "mlp" else D_IN
    last = C if kind == "shared_mlp" else 1
    dims = (first, *hidden, last)
    assert p.kind == kind
    assert len(p.weights) == len(p.biases) == len(dims) - 1
    for w, b, fi, fo in zip(p.weights, p.biases, dims[:-1], dims[1:]):
        if kind == "shared_mlp":
            assert w.shape == (fi, fo) and b.shape == (fo,)
        else:
            assert w.shape == (C, fi, fo) and b.shape == (C, fo)
        assert w.dtype == jnp.float32
        assert np.all(np.asarray(b) == 0.0)
        assert np.any(np.asarray(w) != 0.0)


@pytest.mark.parametrize("kind", KINDS)
def test_init_statistics(kind):
    """Hidden weights N(0, 2/fan_in), output weights N(0, 1/fan_in), means ~0."""
    d_in, c, hidden = 48, 24, (40,)
    p = init_ci(jax.random.key(2), kind, d_in, c, hidden)
    first = 1 if kind == "mlp" else d_in
    fans = (first, hidden[0])
    gains = (2.0, 1.0)
    for w, fan_in, gain in zip(p.weights, fans, gains):
        w = ref.f64(w)
        want_std = np.sqrt(gain / fan_in)
        assert abs(w.mean()) < 0.05 * want_std, (kind, w.shape)
        np.testing.assert_allclose(w.std(), want_std, rtol=0.05, err_msg=f"{kind} {w.shape}")


def test_init_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unknown CI function"):
        init_ci(jax.random.key(0), "nope", 3, 2, ())
    with pytest.raises(ValueError, match="positive ints"):
        init_ci(jax.random.key(0), "mlp", 3, 2, (0,))


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


# ("mlp", (4,)) takes the fused one-hidden-layer path with its hand-written VJP
@pytest.mark.parametrize(
    "kind,hidden", [("mlp", (4,)), ("mlp", (4, 3)), ("vector_mlp", (3,)), ("shared_mlp", (4, 3))]
)
def test_ci_raw_check_grads_x64(x64, kind, hidden):
    p, a, comp = _setup(kind, hidden, dtype=jnp.float64, seed=5)
    assert p.weights[0].dtype == jnp.float64 and a.dtype == jnp.float64

    @jax.jit
    def f(p, comp):
        return ci_raw(p, SPEC, a, comp)

    # x64 values against the float64 reference at 1e-10
    np.testing.assert_allclose(np.asarray(f(p, comp)), _ref(p, a, comp), rtol=1e-10, atol=1e-10)
    check_grads(f, (p, comp), order=1, modes=("rev",), eps=1e-6, atol=1e-6, rtol=1e-6)
    if kind == "mlp":
        # gradients reach V through h (not detached); the other kinds do not read V
        gV = jax.grad(lambda c: jnp.sum(f(p, c) ** 2))(comp).V
        assert float(jnp.abs(gV).max()) > 1e-3


@pytest.mark.parametrize("lead", [(7,), (3, 5)])
def test_scalar_mlp_chunked_backward_x64(x64, monkeypatch, lead):
    """The CPU backward's row chunks (with padding) give the all-at-once gradients and pass check_grads."""
    import spdjax.ci as ci_mod

    C, H = 3, 4
    k = jax.random.split(jax.random.key(11), 5)
    w1, b1, w2 = (jax.random.normal(kk, (C, H), jnp.float64) for kk in k[:3])
    b2 = jnp.zeros((C,), jnp.float64)
    h = jax.random.normal(k[3], lead + (C,), jnp.float64)
    dz = jax.random.normal(k[4], lead + (C,), jnp.float64)
    monkeypatch.setattr(ci_mod, "BWD_CHUNK_ELEMS", 16)  # 12 hidden units per row: several padded chunks
    flat = (h.reshape(-1, C), dz.reshape(-1, C))
    want = ci_mod._scalar_mlp_grads(w1, b1, w2, *flat)
    got = ci_mod._scalar_mlp_grads_chunked(w1, b1, w2, *flat)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-12, atol=1e-12)
    # the forward against the float64 reference, the VJP (CPU: chunked) against finite differences
    z = ci_mod.scalar_mlp(w1, b1, w2, b2, h)
    want_z = (ref.gelu(ref.f64(h)[..., None] * ref.f64(w1) + ref.f64(b1)) * ref.f64(w2)).sum(-1)
    np.testing.assert_allclose(np.asarray(z), want_z, rtol=1e-12, atol=1e-12)
    check_grads(ci_mod.scalar_mlp, (w1, b1, w2, b2, h), order=1, modes=("rev",), eps=1e-6, atol=1e-6, rtol=1e-6)

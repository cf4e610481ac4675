"""Masked site maps (spdjax.components) and loss terms (spdjax.losses) against the NumPy reference."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import numpy_ref as ref  # tests/ is on sys.path (pytest rootdir-relative import)
import pytest
from flax import nnx
from jax.test_util import check_grads

import spdjax
from spdjax import losses
from spdjax.ci import CIParams
from spdjax.components import Components, faithfulness_loss, masked_site_output, materialised_kernel
from spdjax.decomposition import SPDParams
from spdjax.masks import SiteMask
from spdjax.sites import SiteSpec

RTOL, ATOL = 1e-5, 1e-6
B, T = 2, 3


def _np(rng, *shape, scale=1.0):
    return scale * rng.normal(size=shape)


def _j(x, dtype=jnp.float32):
    return jnp.asarray(x, dtype)


# ============================================================================= components


D_IN, D_OUT, C = 4, 5, 3
LIN = SiteSpec("lin", "linear", (D_IN,), (D_OUT,), C, D_IN)


def _site_data(seed=0):
    rng = np.random.default_rng(seed)
    return dict(
        a=_np(rng, B, T, D_IN),
        V=_np(rng, D_IN, C),
        U=_np(rng, C, D_OUT),
        K=_np(rng, D_IN, D_OUT),
        b=_np(rng, D_OUT),
        m=rng.uniform(size=(B, T, C)),
        md=rng.uniform(size=(B, T)),
    )


@pytest.mark.parametrize("use_delta", [True, False], ids=["delta", "no_delta"])
@pytest.mark.parametrize("use_bias", [True, False], ids=["bias", "no_bias"])
def test_masked_site_output_linear(use_delta, use_bias):
    d = _site_data()
    comp = Components(V=_j(d["V"]), U=_j(d["U"]))
    md = d["md"] if use_delta else None
    b = d["b"] if use_bias else None
    got = masked_site_output(
        LIN, _j(d["a"]), comp, _j(d["m"]), None if md is None else _j(md), _j(d["K"]),
        None if b is None else _j(b),
    )
    assert got.shape == (B, T, D_OUT)
    want = ref.masked_site_output(d["a"], d["V"], d["U"], d["m"], md, d["K"], b)
    # the reference's folded form equals its materialised form (guards the reference itself)
    np.testing.assert_allclose(
        ref.masked_site_output_factored(d["a"], d["V"], d["U"], d["m"], md, d["K"], b), want, rtol=1e-12,
        atol=1e-12,
    )
    np.testing.assert_allclose(np.asarray(got), want, rtol=RTOL, atol=ATOL)
    # the delta term is really there (or really absent): dropping it changes the answer
    other = ref.masked_site_output(d["a"], d["V"], d["U"], d["m"], None if use_delta else d["md"],
                                   d["K"], b)
    assert np.abs(other - want).max() > 1e-2


def test_materialised_kernel_and_agreement_with_factored_form():
    d = _site_data(1)
    comp = Components(V=_j(d["V"]), U=_j(d["U"]))
    for md in (d["md"], None):
        W = materialised_kernel(comp, _j(d["m"]), None if md is None else _j(md), _j(d["K"]))
        assert W.shape == (B, T, D_IN, D_OUT)
        want = ref.materialised_kernel(d["V"], d["U"], d["m"], md, d["K"])
        np.testing.assert_allclose(np.asarray(W), want, rtol=RTOL, atol=ATOL)
        # spec §4: both forms agree: a W'^T + b == factored masked output
        y_mat = jnp.einsum("...i,...io->...o", _j(d["a"]), W) + _j(d["b"])
        y_fac = masked_site_output(LIN, _j(d["a"]), comp, _j(d["m"]), None if md is None else _j(md),
                                   _j(d["K"]), _j(d["b"]))
        np.testing.assert_allclose(np.asarray(y_mat), np.asarray(y_fac), rtol=RTOL, atol=ATOL)
    with pytest.raises(ValueError, match="needs the target kernel"):
        materialised_kernel(comp, _j(d["m"]), _j(d["md"]), None)


def test_all_ones_masks_with_delta_reproduce_target():
    """Spec §4: with all masks 1 (delta included) the masked site is exactly the target, any U, V."""
    d = _site_data(2)
    comp = Components(V=_j(d["V"]), U=_j(d["U"]))
    y = masked_site_output(LIN, _j(d["a"]), comp, jnp.ones((B, T, C)), jnp.ones((B, T)), _j(d["K"]),
                           _j(d["b"]))
    np.testing.assert_allclose(np.asarray(y), d["a"] @ d["K"] + d["b"], rtol=RTOL, atol=1e-5)


def test_masked_site_output_embed():
    vocab, d_out = 6, 4
    spec = SiteSpec("emb", "embed", (), (d_out,), C, vocab)
    rng = np.random.default_rng(3)
    ids = rng.integers(0, vocab, (B, T))
    V, U, K = _np(rng, vocab, C), _np(rng, C, d_out), _np(rng, vocab, d_out)
    m, md = rng.uniform(size=(B, T, C)), rng.uniform(size=(B, T))
    got = masked_site_output(spec, jnp.asarray(ids, jnp.int32), Components(_j(V), _j(U)), _j(m), _j(md),
                             _j(K), None)
    onehot = np.eye(vocab)[ids]
    want = ref.masked_site_output(onehot, V, U, m, md, K, None)
    np.testing.assert_allclose(np.asarray(got), want, rtol=RTOL, atol=ATOL)


def test_masked_site_output_einsum_site():
    """Multi-axis site: in_shape (2, 3) -> out_shape (2, 2), kernel flattened to (6, 4)."""
    spec = SiteSpec("ein", "einsum", (2, 3), (2, 2), C, 6, einsum_str="...ab,abcd->...cd")
    rng = np.random.default_rng(4)
    a = _np(rng, B, T, 2, 3)
    V, U, K, b = _np(rng, 6, C), _np(rng, C, 4), _np(rng, 6, 4), _np(rng, 2, 2)
    m, md = rng.uniform(size=(B, T, C)), rng.uniform(size=(B, T))
    got = masked_site_output(spec, _j(a), Components(_j(V), _j(U)), _j(m), _j(md), _j(K), _j(b))
    assert got.shape == (B, T, 2, 2)
    want = ref.masked_site_output(a.reshape(B, T, 6), V, U, m, md, K, b.reshape(4)).reshape(B, T, 2, 2)
    np.testing.assert_allclose(np.asarray(got), want, rtol=RTOL, atol=ATOL)


def test_faithfulness_loss_with_tied_site():
    rng = np.random.default_rng(5)
    s1 = SiteSpec("a", "linear", (4,), (3,), 2, 4)
    s2 = SiteSpec("b", "linear", (3,), (5,), 4, 3)
    s3 = SiteSpec("a_T", "linear", (3,), (4,), 2, 3, tied_to="a")  # uses a's components transposed
    Ka, Kb = _np(rng, 4, 3), _np(rng, 3, 5)
    Va, Ua, Vb, Ub = _np(rng, 4, 2), _np(rng, 2, 3), _np(rng, 3, 4), _np(rng, 4, 5)
    comps = {"a": Components(_j(Va), _j(Ua)), "b": Components(_j(Vb), _j(Ub))}
    kernels = {"a": _j(Ka), "b": _j(Kb), "a_T": _j(Ka.T)}
    got = faithfulness_loss(comps, kernels, (s1, s2, s3))
    want = ref.faithfulness([(Ka, Va, Ua), (Kb, Vb, Ub)])  # the tied parameter counted once
    np.testing.assert_allclose(float(got), want, rtol=RTOL)
    got2 = faithfulness_loss(comps, {"a": _j(Ka), "b": _j(Kb)}, (s1, s2))
    np.testing.assert_allclose(float(got2), want, rtol=RTOL)


# ============================================================================= divergences, minimality


def test_divergence_mse_and_kl():
    rng = np.random.default_rng(6)
    pred, target = _np(rng, B, T, 7, scale=2.0), _np(rng, B, T, 7, scale=2.0)
    np.testing.assert_allclose(float(losses.divergence("mse", _j(pred), _j(target))),
                               ref.mse(pred, target), rtol=RTOL)
    got_kl = float(losses.divergence("kl", _j(pred), _j(target)))
    np.testing.assert_allclose(got_kl, ref.kl(pred, target), rtol=RTOL)
    # direction: KL(target || pred), not KL(pred || target)
    assert abs(ref.kl(target, pred) - got_kl) > 1e-3
    # sum over the vocabulary, mean over the B*T positions
    per_pos = [ref.kl(pred[i, j], target[i, j]) for i in range(B) for j in range(T)]
    np.testing.assert_allclose(got_kl, np.mean(per_pos), rtol=RTOL)
    assert float(losses.divergence("kl", _j(target), _j(target))) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="unknown divergence"):
        losses.divergence("l1", _j(pred), _j(target))


@pytest.mark.parametrize("p", [1.0, 2.0, 0.9])
@pytest.mark.parametrize("beta", [0.0, 0.5])
def test_importance_minimality(p, beta):
    rng = np.random.default_rng(7)
    # two sites with different C, a sequence axis, some exact zeros (eps matters for p < 1)
    g1 = rng.uniform(size=(B, T, 3)) * (rng.uniform(size=(B, T, 3)) > 0.3)
    g2 = 1.0 + 0.01 * rng.uniform(size=(B, T, 5))  # upper-leaky values may exceed 1
    got = losses.importance_minimality_loss({"s1": _j(g1), "s2": _j(g2)}, p, beta, 1e-12)
    want = ref.importance_minimality([g1, g2], p, beta, 1e-12)
    np.testing.assert_allclose(float(got), want, rtol=RTOL)


def test_importance_minimality_gradient():
    rng = np.random.default_rng(8)
    g = rng.uniform(0.05, 1.0, size=(B, T, 3))
    p, beta = 0.9, 0.5
    grad = jax.grad(lambda g: losses.importance_minimality_loss({"s": g}, p, beta))(_j(g))
    # analytic: for x = (g + eps)^p, mean = S/N, L = mean (1 + beta log2(1 + S)) per component
    x = (g + 1e-12) ** p
    S = x.reshape(-1, 3).sum(0)
    N = B * T
    dL_dS = (1 + beta * np.log2(1 + S)) / N + (S / N) * beta / ((1 + S) * np.log(2))
    want = dL_dS * p * (g + 1e-12) ** (p - 1)
    np.testing.assert_allclose(np.asarray(grad), want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "p0,p1,start,end",
    [(2.0, 0.5, 0.2, 0.6), (1.0, 0.3, 0.0, 1.0), (1.5, 0.7, 0.5, 0.5)],
)
def test_annealed_p(p0, p1, start, end):
    cfg = losses.LossConfig(pnorm=p0, p_anneal_final_p=p1, p_anneal_start_frac=start, p_anneal_end_frac=end)
    for progress in (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.59, 0.6, 0.8, 1.0):
        got = float(losses.annealed_p(cfg, jnp.asarray(progress)))
        want = ref.annealed_p(progress, p0, p1, start, end)
        np.testing.assert_allclose(got, want, rtol=1e-6, err_msg=f"progress={progress}")


def test_annealed_p_disabled():
    for cfg in (losses.LossConfig(pnorm=1.3),
                losses.LossConfig(pnorm=1.3, p_anneal_final_p=0.5, p_anneal_start_frac=1.0)):
        for progress in (0.0, 0.5, 1.0):
            assert float(losses.annealed_p(cfg, jnp.asarray(progress))) == pytest.approx(1.3, rel=1e-6)


def test_ci_l0():
    rng = np.random.default_rng(9)
    g1, g2 = rng.uniform(size=(B, T, 4)), rng.uniform(size=(B, T, 2)) ** 3
    got = losses.ci_l0({"a": _j(g1), "b": _j(g2)}, 0.3)
    np.testing.assert_allclose(float(got["a"]), ref.ci_l0(g1, 0.3), rtol=1e-6)
    np.testing.assert_allclose(float(got["b"]), ref.ci_l0(g2, 0.3), rtol=1e-6)


# ============================================================================= a 2-layer NNX target


class MLP(nnx.Module):
    def __init__(self, dims, dtype=jnp.float32):
        zeros = nnx.initializers.zeros  # real values are set from numpy below (no RNG compiles)
        kw = dict(rngs=nnx.Rngs(0), param_dtype=dtype, kernel_init=zeros, bias_init=zeros)
        self.fc1 = nnx.Linear(dims[0], dims[1], **kw)
        self.fc2 = nnx.Linear(dims[1], dims[2], **kw)

    def __call__(self, x):
        return self.fc2(jnp.tanh(self.fc1(x)))


def _ci_params(rng, kind, d_in, c, hidden, dtype):
    """CI params per the CIParams layout, N(0, 1/fan_in) weights, zero biases (numpy RNG)."""
    dims = (1 if kind == "mlp" else d_in, *hidden, c if kind == "shared_mlp" else 1)
    ws, bs = [], []
    for fi, fo in zip(dims[:-1], dims[1:]):
        lead = () if kind == "shared_mlp" else (c,)
        ws.append(jnp.asarray(_np(rng, *lead, fi, fo, scale=1 / np.sqrt(fi)), dtype))
        bs.append(jnp.zeros(lead + (fo,), dtype))
    return CIParams(tuple(ws), tuple(bs), kind)


@functools.lru_cache(maxsize=None)  # shared across tests: identical targets hit the jit caches
def _build(dims=(4, 6, 5), Cs=(3, 4), seed=0, dtype=jnp.float32, ci_type="mlp", ci_hidden=(5,)):
    """NNX MLP with random weights and biases, its Target, SPDParams, and numpy copies of the layers.

    Everything random comes from numpy (no JAX RNG compiles); SPDParams follow the reference init.
    """
    rng = np.random.default_rng(seed)
    model = MLP(dims, dtype)
    for layer, (i, o) in zip((model.fc1, model.fc2), zip(dims[:-1], dims[1:])):
        layer.kernel[...] = jnp.asarray(_np(rng, i, o, scale=1 / np.sqrt(i)), dtype)
        layer.bias[...] = jnp.asarray(_np(rng, o, scale=0.5), dtype)
    layers = [(ref.f64(l.kernel[...]), ref.f64(l.bias[...])) for l in (model.fc1, model.fc2)]
    target = spdjax.from_nnx(model, {"fc1": Cs[0], "fc2": Cs[1]})
    comps, ci = {}, {}
    for name, (i, o), c in zip(("fc1", "fc2"), zip(dims[:-1], dims[1:]), Cs):
        comps[name] = Components(V=jnp.asarray(_np(rng, i, c, scale=1 / np.sqrt(i)), dtype),
                                 U=jnp.asarray(_np(rng, c, o, scale=1 / np.sqrt(c)), dtype))
        ci[name] = _ci_params(rng, ci_type, i, c, ci_hidden, dtype)
    params = SPDParams(comps, ci)
    x = jnp.asarray(_np(rng, B, T, dims[0]), dtype)
    return model, target, params, layers, x


def _np_comps(params):
    return [(ref.f64(params.components[n].V), ref.f64(params.components[n].U)) for n in ("fc1", "fc2")]


def _random_masks(rng, S, Cs, use_delta):
    out = []
    for c in Cs:
        m = rng.uniform(size=(S, B, T, c))
        md = rng.uniform(size=(S, B, T)) if use_delta else None
        out.append((m, md))
    return out


_stoch = jax.jit(losses.stochastic_recon_loss, static_argnames="output_loss")
_stoch_lw = jax.jit(losses.stochastic_recon_layerwise_loss, static_argnames="output_loss")


@pytest.mark.parametrize(
    "output_loss,use_delta", [("mse", True), ("mse", False), ("kl", True)], ids=["mse-delta", "mse", "kl-delta"]
)
def test_stochastic_recon_terms_explicit_masks(output_loss, use_delta):
    model, target, params, layers, x = _build()
    rng = np.random.default_rng(11)
    S = 2
    masks_np = _random_masks(rng, S, (3, 4), use_delta)
    site_masks = {
        n: SiteMask(_j(m), None if md is None else _j(md)) for n, (m, md) in zip(("fc1", "fc2"), masks_np)
    }
    out = target(x)
    np.testing.assert_allclose(np.asarray(out), ref.mlp_forward(x, layers), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(np.asarray(model(x)), np.asarray(out), rtol=1e-6, atol=1e-7)
    comps = _np_comps(params)

    got = float(_stoch(params, target, x, out, site_masks, output_loss=output_loss))
    want = ref.stochastic_recon(x, layers, comps, masks_np, output_loss)
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)

    got_lw = float(_stoch_lw(params, target, x, out, site_masks, output_loss=output_loss))
    want_lw = ref.stochastic_recon_layerwise(x, layers, comps, masks_np, output_loss)
    np.testing.assert_allclose(got_lw, want_lw, rtol=RTOL, atol=ATOL)
    assert abs(want - want_lw) > 1e-4  # the two terms are really different quantities


def _np_ci(params, layers, x, sigmoid):
    """Numpy raw / lower / upper CI per site of the MLP target (clean site inputs)."""
    lower_fn, upper_fn = ref.SIGMOID_PAIRS[sigmoid]
    raw = []
    for name, a in zip(("fc1", "fc2"), ref.site_inputs(x, layers)):
        p = params.ci[name]
        raw.append(ref.ci_raw(p.kind, [ref.f64(w) for w in p.weights], [ref.f64(b) for b in p.biases], a,
                              ref.f64(params.components[name].V)))
    return raw, [lower_fn(z) for z in raw], [upper_fn(z) for z in raw]


TERMS = (
    ("faithfulness", 0.5),
    ("importance_minimality", 0.3),
    ("ci_masked_recon", 0.7),
    ("ci_masked_recon_layerwise", 1.1),
    ("unmasked_recon", 0.2),
)


@pytest.mark.parametrize("sigmoid,output_loss,pnorm,beta",
                         [("leaky_hard", "mse", 0.9, 0.5), ("logistic", "kl", 2.0, 0.0)])
def test_loss_fn_deterministic_terms(sigmoid, output_loss, pnorm, beta):
    """Faithfulness, minimality, CI-masked (+ layerwise), unmasked recon, ci_l0 and the weighted total."""
    model, target, params, layers, x = _build()
    # give the CI functions non-zero biases so z covers negative, (0, 1) and > 1 values
    rng = np.random.default_rng(12)
    ci = {n: dataclasses.replace(p, biases=tuple(b + _j(_np(rng, *b.shape, scale=0.5)) for b in p.biases))
          for n, p in params.ci.items()}
    params = SPDParams(params.components, ci)
    cfg = losses.LossConfig(coeffs=TERMS, sigmoid=sigmoid, output_loss=output_loss, pnorm=pnorm,
                            minimality_beta=beta, ci_l0_threshold=0.2)
    total, metrics = jax.jit(losses.loss_fn)(params, target, x, jax.random.key(0), cfg, jnp.asarray(0.3))

    raw, lower, upper = _np_ci(params, layers, x, sigmoid)
    zs = np.concatenate([z.ravel() for z in raw])
    assert (zs < 0).any() and ((zs > 0) & (zs < 1)).any() and (zs > 1).any(), "CI values not spread"
    comps = _np_comps(params)
    out = ref.mlp_forward(x, layers)
    det = [(g, None, V, U) for g, (V, U) in zip(lower, comps)]
    ones = [(np.ones_like(g), None, V, U) for g, (V, U) in zip(lower, comps)]
    want = {
        "faithfulness": ref.faithfulness([(K, V, U) for (K, _), (V, U) in zip(layers, comps)]),
        "importance_minimality": ref.importance_minimality(upper, pnorm, beta, 1e-12),
        "ci_masked_recon": ref.divergence(output_loss, ref.mlp_forward(x, layers, site_masks=dict(enumerate(det))),
                                          out),
        "ci_masked_recon_layerwise": np.mean([
            ref.divergence(output_loss, ref.mlp_forward(x, layers, site_masks={l: det[l]}), out) for l in range(2)
        ]),
        "unmasked_recon": ref.divergence(output_loss, ref.mlp_forward(x, layers, site_masks=dict(enumerate(ones))),
                                         out),
    }
    for name, w in want.items():
        np.testing.assert_allclose(float(metrics[f"loss/{name}"]), w, rtol=RTOL, atol=ATOL, err_msg=name)
    np.testing.assert_allclose(float(total), sum(c * want[n] for n, c in TERMS), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(float(metrics["loss/total"]), float(total), rtol=1e-7)
    for name, g in zip(("fc1", "fc2"), lower):
        np.testing.assert_allclose(float(metrics[f"ci_l0/{name}"]), ref.ci_l0(g, 0.2), rtol=1e-6)
    np.testing.assert_allclose(float(metrics["p"]), pnorm, rtol=1e-6)


# ============================================================================= gradients of loss_fn


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


@pytest.mark.parametrize("use_delta,output_loss", [(True, "kl"), (False, "mse")], ids=["delta-kl", "nodelta-mse"])
def test_loss_fn_check_grads_x64(x64, use_delta, output_loss):
    """Full loss (every term, S=2 continuous masks, fixed key) is smooth in all params with logistic CI."""
    _, target, params, _, x = _build(dims=(3, 4, 3), Cs=(3, 2), seed=4, dtype=jnp.float64, ci_hidden=(3,))
    assert params.components["fc1"].V.dtype == jnp.float64 and x.dtype == jnp.float64
    cfg = losses.LossConfig(
        coeffs=(("faithfulness", 1.0), ("stochastic_recon", 1.0), ("stochastic_recon_layerwise", 1.0),
                ("importance_minimality", 0.1), ("ci_masked_recon", 0.5), ("unmasked_recon", 0.5)),
        n_mask_samples=2, use_delta_component=use_delta, sigmoid="logistic", output_loss=output_loss,
    )
    key = jax.random.key(7)
    f = jax.jit(lambda p: losses.loss_fn(p, target, x, key, cfg)[0])
    assert f(params).dtype == jnp.float64
    check_grads(f, (params,), order=1, modes=("rev",), eps=1e-6, atol=1e-7, rtol=1e-6)


def test_loss_fn_check_grads_components_default_sigmoid_x64(x64):
    """Default (reference-main) recipe: w.r.t. U, V the loss is smooth (vector_mlp CI does not read V)."""
    _, target, params, _, x = _build(dims=(3, 4, 3), Cs=(2, 3), seed=6, dtype=jnp.float64,
                                     ci_type="vector_mlp", ci_hidden=(3,))
    cfg = losses.LossConfig(
        coeffs=(("faithfulness", 1.0), ("stochastic_recon", 1.0), ("stochastic_recon_layerwise", 1.0),
                ("importance_minimality", 3e-3)),
        n_mask_samples=2,
    )
    key = jax.random.key(8)
    f = jax.jit(lambda comps: losses.loss_fn(SPDParams(comps, params.ci), target, x, key, cfg)[0])
    check_grads(f, (params.components,), order=1, modes=("rev",), eps=1e-6, atol=1e-7, rtol=1e-6)

"""Equivalences between the computation paths of the SPD losses.

- all-ones masks with the delta term reproduce the target exactly, whatever U and V are;
- the factored masked forward equals the materialised per-example-kernel forward run by hand;
- the vmapped S-sample stochastic loss and the vmap + per-site (or scan + cond) layerwise loss equal Python loops;
- one sample (S = 1) without `vmap` equals the vmapped form; shared clean inner activations change
  neither the loss nor its gradient, only the FLOPs;
- keys: same key -> same loss, different key -> different loss;
- a jitted train step traces once; `jax.jit(loss_fn)` works as is.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import spdjax
from spdjax import masks as masks_lib
from spdjax.components import Components, materialised_kernel, site_components
from spdjax.decomposition import SPDParams
from spdjax.losses import (
    LossConfig,
    clean_forward,
    compute_ci,
    divergence,
    masked_forward,
    stochastic_recon_layerwise_loss,
    stochastic_recon_loss,
)
from spdjax.masks import SiteMask
from spdjax.spd import SPD
from spdjax.train import init_train_state, make_train_step

B, T = 3, 2


class Block(nnx.Module):
    def __init__(self, d_in, d_hidden, d_out, rngs):
        self.fc_in = nnx.Linear(d_in, d_hidden, rngs=rngs)
        self.fc_out = nnx.Linear(d_hidden, d_out, rngs=rngs)

    def __call__(self, x):
        return self.fc_out(jax.nn.gelu(self.fc_in(x)))


class Net(nnx.Module):
    """(B, T, 6) -> (B, T, 3): a 6 -> 10 -> 4 block, a 4 -> 5 -> 4 residual block, a 4 -> 3 head."""

    def __init__(self, rngs):
        self.blocks = nnx.List([Block(6, 10, 4, rngs), Block(4, 5, 4, rngs)])
        self.head = nnx.Linear(4, 3, rngs=rngs)

    def __call__(self, x):
        x = self.blocks[0](x)
        x = x + self.blocks[1](x)
        return self.head(x)


class TokenNet(nnx.Module):
    """ids (B, T) -> logits (B, T, 7): Embed(7, 6), Einsum '...d,dnh->...nh' (6 -> 2x3), Linear(6, 7)."""

    def __init__(self, rngs):
        self.embed = nnx.Embed(7, 6, rngs=rngs)
        self.proj = nnx.Einsum("...d,dnh->...nh", (6, 2, 3), (2, 3), rngs=rngs)
        self.unembed = nnx.Linear(6, 7, rngs=rngs)

    def __call__(self, ids):
        h = self.embed(ids)
        q = self.proj(h)
        return self.unembed(h + jnp.tanh(q.reshape(*q.shape[:-2], 6)))


class TMS(nnx.Module):
    """x -> relu(x W^T W + b) with dec.kernel = enc.kernel^T."""

    def __init__(self, rngs):
        self.enc = nnx.Linear(5, 2, use_bias=False, rngs=rngs)
        self.dec = nnx.Linear(2, 5, rngs=rngs)
        self.dec.kernel[...] = self.enc.kernel[...].T
        self.dec.bias[...] = jnp.full((5,), -0.1)

    def __call__(self, x):
        return jax.nn.relu(self.dec(self.enc(x)))


# ----------------------------------------------------------------------------- fixtures
# Initialisers are not compiled (that dominates a CPU test run): shapes come from eval_shape and
# values from numpy.


def build(ctor, seed):
    """An NNX model with numpy-random weights (shapes from `nnx.eval_shape`)."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: ctor(nnx.Rngs(0))))
    rng = np.random.default_rng(seed)

    def fill(s):
        scale = 1.0 / np.sqrt(s.shape[0]) if len(s.shape) >= 2 else 0.3
        return jnp.asarray(rng.normal(size=s.shape) * scale, s.dtype)

    return nnx.merge(graphdef, jax.tree.map(fill, state))


def _random_params(target, seed, scale=3.0):
    """Random U, V (deliberately far from the target's weights) and random CI functions."""
    shapes = jax.eval_shape(spdjax.init_decomposition, jax.random.key(0), target)
    rng = np.random.default_rng(seed)
    p = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32), shapes)
    comps = {
        n: Components(V=scale * c.V / np.sqrt(c.V.shape[0]) + 0.5, U=-scale * c.U / np.sqrt(c.U.shape[0]))
        for n, c in p.components.items()
    }
    return jax.tree.map(jnp.asarray, SPDParams(comps, p.ci))


def _maxdiff(a, b):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


def _tms(seed):
    model = build(TMS, seed)
    model.dec.kernel[...] = model.enc.kernel[...].T
    return model


@jax.jit
def _apply(model, x):
    return model(x)


@pytest.fixture(scope="module")
def net_case():
    model = build(Net, 0)
    target = spdjax.from_nnx(
        model, {"blocks.*.fc_*": 3, "head": 2}, identity={"blocks.1.fc_out": 2}
    )
    x = jnp.asarray(np.random.default_rng(1).normal(size=(B, T, 6)), jnp.float32)
    return model, target, x, _random_params(target, 2)


@pytest.fixture(scope="module")
def token_case():
    model = build(TokenNet, 3)
    target = spdjax.from_nnx(model, {"embed": 3, "proj": 4, "unembed": 2})
    ids = jnp.asarray(np.random.default_rng(4).integers(0, 7, size=(B, T)), jnp.int32)
    return model, target, ids, _random_params(target, 5)


@pytest.fixture(scope="module")
def tms_case():
    model = _tms(6)
    target = spdjax.from_nnx(model, {"enc": 3, "dec": 3}, tied={"dec": "enc"})
    x = jnp.asarray(np.random.default_rng(7).uniform(size=(4, 5)), jnp.float32)
    return model, target, x, _random_params(target, 8)


CASES = ["net_case", "token_case", "tms_case"]


def _random_masks(target, key, lead, use_delta):
    out = {}
    for i, s in enumerate(target.sites):
        km, kd = jax.random.split(jax.random.fold_in(key, i))
        m = jax.random.uniform(km, (*lead, s.C), minval=-0.2, maxval=1.2)
        d = jax.random.uniform(kd, lead) if use_delta else None
        out[s.name] = SiteMask(m, d)
    return out


# ----------------------------------------------------------------------------- (a) delta identity


@jax.jit
def _ones_mask_outputs(params, target, x):
    out, inputs = clean_forward(target, x)
    ci = compute_ci(params, target, inputs, "leaky_hard")
    with_delta = masked_forward(params, target, x, masks_lib.ones_masks(ci.lower, use_delta=True))
    no_delta = masked_forward(params, target, x, masks_lib.ones_masks(ci.lower))
    return out, with_delta, no_delta


@pytest.mark.parametrize("case", CASES)
def test_all_ones_masks_with_delta_reproduce_the_target(case, request):
    model, target, x, params = request.getfixturevalue(case)
    want = _apply(model, x)
    out, with_delta, no_delta = _ones_mask_outputs(params, target, x)
    np.testing.assert_allclose(out, want, atol=1e-6)
    np.testing.assert_allclose(with_delta, want, atol=1e-6)
    # the components are far from faithful: without the delta term the output is wrong
    assert _maxdiff(no_delta, want) > 1e-2
    # whatever U, V are: scaling them changes nothing with the delta term
    params2 = _random_params(target, 99, scale=30.0)
    _, with_delta2, _ = _ones_mask_outputs(params2, target, x)
    np.testing.assert_allclose(with_delta2, want, atol=1e-6)


# ----------------------------------------------------------------------------- (b) factored == materialised


def _mk(params, target, kernels, masks, name):
    """Per-example kernel (*lead, d_in, d_out) of a site."""
    spec = target.site(name)
    m = masks[name]
    return materialised_kernel(site_components(params.components, spec), m.mask, m.delta, kernels[name])


def _lin(a, K, bias=None):
    y = jnp.einsum("...i,...io->...o", a, K)
    return y if bias is None else y + bias


def _by_hand(case, model, target, x, params, masks):
    """The model's forward written out with the materialised per-example kernels."""
    K = {n: _mk(params, target, target.kernels(), masks, n) for n in target.site_names}
    if case == "net_case":
        b0, b1 = model.blocks
        h = _lin(x, K["blocks.0.fc_in"], b0.fc_in.bias[...])
        h = _lin(jax.nn.gelu(h), K["blocks.0.fc_out"], b0.fc_out.bias[...])
        g = jax.nn.gelu(_lin(h, K["blocks.1.fc_in"], b1.fc_in.bias[...]))
        g = _lin(g, K["blocks.1.fc_out.pre_identity"])
        h = h + _lin(g, K["blocks.1.fc_out"], b1.fc_out.bias[...])
        return _lin(h, K["head"], model.head.bias[...])
    if case == "token_case":
        onehot = jax.nn.one_hot(x, 7)
        h = _lin(onehot, K["embed"])
        q = _lin(h, K["proj"]).reshape(*h.shape[:-1], 2, 3) + model.proj.bias[...]
        h = h + jnp.tanh(q.reshape(*q.shape[:-2], 6))
        return _lin(h, K["unembed"], model.unembed.bias[...])
    h = _lin(x, K["enc"])
    return jax.nn.relu(_lin(h, K["dec"], model.dec.bias[...]))


@pytest.mark.parametrize("case", CASES)
def test_factored_masked_forward_equals_materialised(case, request):
    model, target, x, params = request.getfixturevalue(case)
    lead = x.shape[:-1] if case != "token_case" else x.shape

    @jax.jit
    def both(params, target, x, key, model):
        res = {}
        for use_delta in (True, False):
            masks = _random_masks(target, key, lead, use_delta)
            res[use_delta] = (
                masked_forward(params, target, x, masks),
                _by_hand(case, model, target, x, params, masks),
            )
        return res

    res = both(params, target, x, jax.random.key(9), model)
    for use_delta, (got, want) in res.items():
        assert got.shape == want.shape == _apply(model, x).shape
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5, err_msg=f"delta={use_delta}")
    # the delta term matters with these (unfaithful) components
    assert _maxdiff(res[True][0], res[False][0]) > 1e-3
    # the masks matter: a different draw gives a different output
    other = both(params, target, x, jax.random.key(10), model)
    assert _maxdiff(other[True][0], res[True][0]) > 1e-3


def test_materialised_kernel_all_ones_delta_is_the_target_kernel(net_case):
    _, target, _, params = net_case

    @jax.jit
    def kernels(params, target):
        out = {}
        for s in target.sites:
            comp = site_components(params.components, s)
            k = target.kernels()[s.name]
            out[s.name] = (
                materialised_kernel(comp, jnp.ones((2, s.C)), jnp.ones((2,)), k),
                materialised_kernel(comp, jnp.ones((s.C,))),
                k,
            )
        return out

    for name, (with_delta, no_delta, k) in kernels(params, target).items():
        c = site_components(params.components, target.site(name))
        np.testing.assert_allclose(with_delta, np.broadcast_to(k, (2, *k.shape)), atol=1e-5)
        np.testing.assert_allclose(no_delta, np.asarray(c.V) @ np.asarray(c.U), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- (c), (d) sample / site loops


def _sampled(params, target, x, S, use_delta, seed=11):
    out, inputs = clean_forward(target, x)
    ci = compute_ci(params, target, inputs, "leaky_hard")
    masks = masks_lib.sample_masks(jax.random.key(seed), ci.lower, S, "continuous", use_delta)
    return out, masks


@pytest.mark.parametrize(
    "case, use_delta, div", [("net_case", True, "mse"), ("token_case", False, "kl"), ("tms_case", True, "mse")]
)
def test_stochastic_recon_vmap_equals_python_loop(case, use_delta, div, request):
    S = 3
    _, target, x, params = request.getfixturevalue(case)

    @jax.jit
    def run(params, target, x):
        out, masks = _sampled(params, target, x, S, use_delta)
        got = stochastic_recon_loss(params, target, x, out, masks, div)
        loop = [
            divergence(div, masked_forward(params, target, x, masks_lib.take_sample(masks, s)), out)
            for s in range(S)
        ]
        return got, jnp.stack(loop), masks

    got, per_sample, masks = run(params, target, x)
    for m in masks.values():
        assert m.mask.shape[0] == S and (m.delta is not None) == use_delta
    np.testing.assert_allclose(got, np.mean(per_sample), rtol=1e-5, atol=1e-7)
    assert np.std(per_sample) > 0  # the samples differ, so the average is a real test


@pytest.mark.parametrize("unroll", [None, 1, 2])
@pytest.mark.parametrize(
    "case, use_delta, div", [("net_case", True, "mse"), ("token_case", True, "kl"), ("tms_case", False, "mse")]
)
def test_stochastic_recon_layerwise_equals_python_loop(case, use_delta, div, unroll, request):
    """Per-site passes (unroll=None) and the scan + cond sweep (int unroll) both equal a plain loop."""
    S = 2
    _, target, x, params = request.getfixturevalue(case)

    @jax.jit
    def run(params, target, x):
        out, masks = _sampled(params, target, x, S, use_delta)
        got = stochastic_recon_layerwise_loss(params, target, x, out, masks, div, unroll)
        terms = []
        for s in range(S):
            sample = masks_lib.take_sample(masks, s)
            for name in target.site_names:
                pred = masked_forward(params, target, x, {name: sample[name]})
                terms.append(divergence(div, pred, out))
        return got, jnp.stack(terms)

    got, terms = run(params, target, x)
    assert terms.shape == (S * len(target.sites),)
    np.testing.assert_allclose(got, np.mean(terms), rtol=1e-5, atol=1e-7)
    assert np.std(terms) > 0


def test_layerwise_paths_same_gradient(net_case):
    """The per-site passes and the scan + cond sweep give the same gradient in the parameters."""
    _, target, x, params = net_case

    def grad(unroll):
        def f(p):
            out, masks = _sampled(p, target, x, 1, True)
            return stochastic_recon_layerwise_loss(p, target, x, out, masks, "mse", unroll)

        return jax.jit(jax.grad(f))(params)

    g_passes, g_scan = grad(None), grad(1)
    leaves = jax.tree.leaves(g_passes)
    assert any(float(jnp.max(jnp.abs(g))) > 0 for g in leaves)
    for a, b in zip(leaves, jax.tree.leaves(g_scan)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_mean_over_samples_single_sample_equals_vmap(net_case):
    """S = 1 runs without `vmap`; its value and gradient equal the vmapped form's."""
    from spdjax.losses.terms import mean_over_samples

    _, target, x, params = net_case

    def loss(p, use_vmap):
        out, masks = _sampled(p, target, x, 1, True)

        def one(sm):
            return divergence("mse", masked_forward(p, target, x, sm), out)

        return jnp.mean(jax.vmap(one)(masks)) if use_vmap else mean_over_samples(one, masks)

    for a, b in zip(
        jax.tree.leaves(jax.jit(jax.value_and_grad(lambda p: loss(p, False)))(params)),
        jax.tree.leaves(jax.jit(jax.value_and_grad(lambda p: loss(p, True)))(params)),
    ):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="leading"):
        mean_over_samples(lambda a, b: 0.0, jnp.zeros((1, 2)), jnp.zeros((2, 2)))


SHARED_TERMS = (
    ("stochastic_recon", 1.0),
    ("stochastic_recon_layerwise", 1.0),
    ("stochastic_recon_subset", 1.0),
    ("pgd_recon", 0.5),
    ("importance_minimality", 3e-3),
)


@pytest.mark.parametrize("case", ["net_case", "tms_case"])
def test_shared_clean_inner_acts_same_loss_and_gradient_fewer_flops(case, request, monkeypatch):
    """`loss_fn` shares each site's clean inner activations a V between the CI function and the masked
    passes whose site input is still clean. The loss and every gradient equal the unshared computation
    (patched out); XLA counts fewer FLOPs for the gradient when a site is shared by several passes."""
    import spdjax.losses.loss as loss_mod

    _, target, x, params = request.getfixturevalue(case)
    config = LossConfig(coeffs=SHARED_TERMS)

    def value_and_grad():
        f = jax.jit(jax.value_and_grad(spdjax.loss_fn, has_aux=True))
        (loss, _), grads = f(params, target, x, jax.random.key(3), config)
        flops = f.lower(params, target, x, jax.random.key(3), config).compile().cost_analysis()["flops"]
        return loss, grads, flops

    shared = value_and_grad()
    monkeypatch.setattr(loss_mod, "clean_inner_acts", lambda *a: None)
    unshared = value_and_grad()
    np.testing.assert_allclose(shared[0], unshared[0], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(shared[1]), jax.tree.leaves(unshared[1])):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6)
    assert any(float(jnp.max(jnp.abs(g))) > 0 for g in jax.tree.leaves(shared[1].components))
    if case == "net_case":  # untied sites used by several passes: one dL/dV matmul instead of several
        assert shared[2] < unshared[2], (shared[2], unshared[2])


# ----------------------------------------------------------------------------- (e), (g) keys and jit


def test_jit_loss_fn_keys(net_case):
    _, target, x, params = net_case
    config = LossConfig(
        coeffs=(
            ("faithfulness", 0.5),
            ("stochastic_recon", 1.0),
            ("stochastic_recon_layerwise", 1.0),
            ("importance_minimality", 3e-3),
        ),
        n_mask_samples=2,
    )
    jitted_loss = jax.jit(spdjax.loss_fn)
    loss1, m1 = jitted_loss(params, target, x, jax.random.key(0), config)
    n = jitted_loss._cache_size()  # jit's cache is shared with other tests' jax.jit(loss_fn) in this process
    loss2, m2 = jitted_loss(params, target, x, jax.random.key(0), config)
    loss3, m3 = jitted_loss(params, target, x, jax.random.key(1), config)
    assert jitted_loss._cache_size() == n  # no retracing for another key
    assert np.isfinite(float(loss1))
    assert float(loss1) == float(loss2)
    assert set(m1) == set(m2) == set(m3)
    for k in m1:
        np.testing.assert_array_equal(m1[k], m2[k], err_msg=k)
    assert float(loss1) != float(loss3)
    assert float(m1["loss/stochastic_recon"]) != float(m3["loss/stochastic_recon"])
    assert float(m1["loss/stochastic_recon_layerwise"]) != float(m3["loss/stochastic_recon_layerwise"])
    assert float(m1["loss/faithfulness"]) == float(m3["loss/faithfulness"])  # deterministic term
    # total = sum coeff * term, and every site reports its L0
    total = sum(c * float(m1[f"loss/{n}"]) for n, c in config.coeffs)
    np.testing.assert_allclose(float(m1["loss/total"]), total, rtol=1e-5)
    np.testing.assert_allclose(float(loss1), total, rtol=1e-5)
    assert {k for k in m1 if k.startswith("ci_l0/")} == {f"ci_l0/{n}" for n in target.site_names}
    # the faithfulness term, by hand in numpy
    kernels = {n: np.asarray(k) for n, k in target.kernels().items()}
    num = sum(
        np.sum((kernels[n] - np.asarray(c.V) @ np.asarray(c.U)) ** 2) for n, c in params.components.items()
    )
    den = sum(kernels[n].size for n in params.components)
    np.testing.assert_allclose(float(m1["loss/faithfulness"]), num / den, rtol=1e-4)


def test_jit_value_and_grad_of_loss_fn_reaches_all_params(tms_case):
    _, target, x, params = tms_case
    config = LossConfig(coeffs=(("stochastic_recon", 1.0), ("importance_minimality", 0.1)))
    f = jax.jit(jax.value_and_grad(spdjax.loss_fn, has_aux=True))
    (loss, metrics), grads = f(params, target, x, jax.random.key(0), config)
    assert np.isfinite(float(loss)) and float(loss) == float(metrics["loss/total"])
    assert set(grads.components) == {"enc"} and set(grads.ci) == {"enc", "dec"}
    assert float(optax.tree.norm(grads.components)) > 0
    for n in ("enc", "dec"):
        assert float(optax.tree.norm(grads.ci[n])) > 0, n


# ----------------------------------------------------------------------------- (f) no retracing


def test_train_step_compiles_once():
    target = spdjax.from_nnx(_tms(12), {"enc": 3, "dec": 3}, tied={"dec": "enc"})
    traces = []

    def batch_fn(key):
        traces.append(1)  # runs only while tracing
        return jax.random.uniform(key, (8, 5))

    optimizer = optax.adam(1e-2)
    config = LossConfig(coeffs=(("stochastic_recon", 1.0), ("importance_minimality", 1e-3)))
    step_fn = make_train_step(SPD.with_loss(config), optimizer, total_steps=5, batch_fn=batch_fn)
    params = _random_params(target, 0, scale=1.0)
    state = init_train_state(params, optimizer, jax.random.key(1))
    losses = []
    for _ in range(4):
        state, metrics = step_fn(state, target)
        losses.append(float(metrics["loss/total"]))
    assert len(traces) == 1
    assert step_fn._cache_size() == 1
    assert int(state.step) == 4
    assert len(set(losses)) == 4  # params and data change between steps

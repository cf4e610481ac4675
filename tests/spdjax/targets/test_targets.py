"""Structural tests of the target adapters: `spdjax.from_nnx` and `spdjax.from_apply`.

Covers path naming through submodules and `nnx.List`, glob site selection with per-pattern C, the
site specs of every supported layer kind (linear, embed, einsum, identity), that wrapping leaves the
model's computation unchanged, every pattern error, tied sites and identity insertion.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import spdjax
from spdjax import targets
from spdjax.components import faithfulness_loss
from spdjax.losses import clean_forward, masked_forward
from spdjax.masks import SiteMask

B, T = 3, 2  # batch, positions


# ----------------------------------------------------------------------------- user-style models


class Block(nnx.Module):
    """fc_in -> gelu -> fc_out -> norm, optionally residual."""

    def __init__(self, d_in: int, d_hidden: int, d_out: int, residual: bool, rngs: nnx.Rngs):
        self.fc_in = nnx.Linear(d_in, d_hidden, rngs=rngs)
        self.fc_out = nnx.Linear(d_hidden, d_out, rngs=rngs)
        self.norm = nnx.LayerNorm(d_out, rngs=rngs)
        self.residual = residual

    def __call__(self, x):
        y = self.norm(self.fc_out(jax.nn.gelu(self.fc_in(x))))
        return x + y if self.residual else y


class Net(nnx.Module):
    """(B, T, 6) -> (B, T, 4): blocks 6->10->3 and 3->5->3 (residual) in an nnx.List, then a head."""

    def __init__(self, rngs: nnx.Rngs):
        self.blocks = nnx.List([Block(6, 10, 3, False, rngs), Block(3, 5, 3, True, rngs)])
        self.head = nnx.Linear(3, 4, rngs=rngs)

    def __call__(self, x):
        for blk in self.blocks:
            x = blk(x)
        return self.head(x)


class TokenNet(nnx.Module):
    """Token ids (B, T) -> logits (B, T, 11) through an Embed, an Einsum '...d,dnh->...nh' and a Linear."""

    def __init__(self, rngs: nnx.Rngs):
        self.embed = nnx.Embed(11, 6, rngs=rngs)
        self.proj = nnx.Einsum("...d,dnh->...nh", (6, 2, 3), (2, 3), rngs=rngs)
        self.unembed = nnx.Linear(6, 11, rngs=rngs)

    def __call__(self, ids):
        h = self.embed(ids)
        q = self.proj(h)
        return self.unembed(h + jnp.tanh(q.reshape(*q.shape[:-2], 6)))


class TMS(nnx.Module):
    """x -> relu(x W^T W + b) with enc.kernel = W^T (5, 2) and dec.kernel = W (2, 5)."""

    def __init__(self, rngs: nnx.Rngs, n_features: int = 5, n_hidden: int = 2):
        self.enc = nnx.Linear(n_features, n_hidden, use_bias=False, rngs=rngs)
        self.dec = nnx.Linear(n_hidden, n_features, rngs=rngs)
        self.dec.kernel[...] = self.enc.kernel[...].T

    def __call__(self, x):
        return jax.nn.relu(self.dec(self.enc(x)))


# Initialisers are not compiled (that dominates a CPU test run): shapes come from nnx.eval_shape,
# values from numpy; forward passes run under jit.


def build(ctor, seed, **kw):
    """`ctor(rngs, **kw)` with numpy-random weights."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: ctor(nnx.Rngs(0), **kw)))
    rng = np.random.default_rng(seed)

    def fill(s):
        scale = 1.0 / np.sqrt(s.shape[0]) if len(s.shape) >= 2 else 0.3
        return jnp.asarray(rng.normal(size=s.shape) * scale, s.dtype)

    return nnx.merge(graphdef, jax.tree.map(fill, state))


def make_tms(seed=0, tie=True):
    model = build(TMS, seed)
    if tie:
        model.dec.kernel[...] = model.enc.kernel[...].T
    return model


def random_params(target, seed=0):
    """SPDParams of the right structure (from eval_shape of init_decomposition), numpy-random values."""
    shapes = jax.eval_shape(spdjax.init_decomposition, jax.random.key(0), target)
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape) * 0.5, s.dtype), shapes)


@jax.jit
def apply(model_or_target, x):
    return model_or_target(x)


def _x(seed=0, shape=(B, T, 6)):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _ids(seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, 11, size=(B, T)), jnp.int32)


@pytest.fixture(scope="module")
def net():
    return build(Net, 0)


# ----------------------------------------------------------------------------- NNX: sites and forward


def test_nnx_glob_sites_specs_and_per_pattern_C(net):
    target = spdjax.from_nnx(net, {"blocks.*.fc_*": 3, "head": 2})
    expected = {
        "blocks.0.fc_in": (6, 10, 3),
        "blocks.0.fc_out": (10, 3, 3),
        "blocks.1.fc_in": (3, 5, 3),
        "blocks.1.fc_out": (5, 3, 3),
        "head": (3, 4, 2),
    }
    assert sorted(target.site_names) == sorted(expected)  # the LayerNorms are not matched by fc_*
    for name, (d_in, d_out, C) in expected.items():
        s = target.site(name)
        assert s.kind == "linear"
        assert (s.d_in, s.d_out, s.C) == (d_in, d_out, C), name
        assert s.in_shape == (d_in,) and s.out_shape == (d_out,)
        assert s.tied_to is None and s.param_name == name
    # the kernels the target reports are the model's own, in the (d_in, d_out) layout
    kernels = target.kernels()
    np.testing.assert_array_equal(kernels["blocks.0.fc_in"], net.blocks[0].fc_in.kernel[...])
    np.testing.assert_array_equal(kernels["blocks.1.fc_out"], net.blocks[1].fc_out.kernel[...])
    np.testing.assert_array_equal(kernels["head"], net.head.kernel[...])


def test_nnx_params_follow_site_specs(net):
    target = spdjax.from_nnx(net, {"blocks.*.fc_in": 3, "blocks.*.fc_out": 5})
    assert {s.name: s.C for s in target.sites} == {
        "blocks.0.fc_in": 3, "blocks.1.fc_in": 3, "blocks.0.fc_out": 5, "blocks.1.fc_out": 5,
    }
    params = jax.eval_shape(spdjax.init_decomposition, jax.random.key(0), target)
    assert set(params.components) == set(target.site_names) == set(params.ci)
    for s in target.sites:
        assert params.components[s.name].V.shape == (s.d_in, s.C)
        assert params.components[s.name].U.shape == (s.C, s.d_out)


def test_nnx_plain_forward_equals_model_and_model_is_untouched(net):
    x = _x()
    want = apply(net, x)
    target = spdjax.from_nnx(net, {"blocks.*.fc_*": 3, "head": 2})
    assert want.shape == (B, T, 4)
    np.testing.assert_allclose(apply(target, x), want, rtol=1e-6, atol=1e-7)
    # the user's model is not edited: its layers are still plain nnx.Linear and compute the same
    assert type(net.blocks[0].fc_in) is nnx.Linear and type(net.head) is nnx.Linear
    np.testing.assert_array_equal(apply(net, x), want)


@jax.jit
def _clean(target, x):
    return clean_forward(target, x)


def test_nnx_clean_forward_records_site_inputs_with_positions(net):
    x = _x()
    target = spdjax.from_nnx(net, {"blocks.*.fc_*": 3, "head": 2})
    out, inputs = _clean(target, x)
    np.testing.assert_allclose(out, apply(net, x), rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(inputs["blocks.0.fc_in"], x)
    h = jax.jit(lambda x: jax.nn.gelu(net.blocks[0].fc_in(x)))(x)
    np.testing.assert_allclose(inputs["blocks.0.fc_out"], h, atol=1e-6)
    assert set(inputs) == set(target.site_names)
    for s in target.sites:
        assert inputs[s.name].shape == (B, T, s.d_in)


def test_nnx_embed_and_einsum_sites():
    model = build(TokenNet, 1)
    ids = _ids()
    target = spdjax.from_nnx(model, {"embed": 4, "proj": 3, "unembed": 2})
    e, p, u = target.site("embed"), target.site("proj"), target.site("unembed")
    assert (e.kind, e.d_in, e.d_out, e.C, e.in_shape, e.out_shape) == ("embed", 11, 6, 4, (), (6,))
    assert (p.kind, p.d_in, p.d_out, p.C, p.in_shape, p.out_shape) == ("einsum", 6, 6, 3, (6,), (2, 3))
    assert p.einsum_str == "...d,dnh->...nh"
    assert (u.kind, u.d_in, u.d_out, u.C) == ("linear", 6, 11, 2)
    np.testing.assert_allclose(apply(target, ids), apply(model, ids), rtol=1e-6, atol=1e-7)
    k = target.kernels()
    np.testing.assert_array_equal(k["embed"], model.embed.embedding[...])
    np.testing.assert_array_equal(k["proj"], model.proj.kernel[...].reshape(6, 6))
    _, inputs = _clean(target, ids)
    np.testing.assert_array_equal(inputs["embed"], ids)  # embed sites see the integer ids
    assert inputs["proj"].shape == (B, T, 6) and inputs["unembed"].shape == (B, T, 6)


def test_nnx_einsum_with_two_contracted_axes():
    class M(nnx.Module):
        def __init__(self, rngs):
            self.o = nnx.Einsum("...nh,nhd->...d", (2, 3, 4), (4,), rngs=rngs)

        def __call__(self, x):
            return self.o(x)

    m = build(M, 0)
    x = _x(shape=(B, T, 2, 3))
    target = spdjax.from_nnx(m, {"o": 2})
    s = target.site("o")
    assert (s.kind, s.in_shape, s.out_shape, s.d_in, s.d_out) == ("einsum", (2, 3), (4,), 6, 4)
    np.testing.assert_allclose(apply(target, x), apply(m, x), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("eq, kshape", [("...d,hd->...h", (4, 6)), ("...nd,dh->...h", (6, 4))])
def test_nnx_unsupported_einsum_is_an_error(eq, kshape):
    class M(nnx.Module):
        def __init__(self, rngs):
            self.mix = nnx.Einsum(eq, kshape, rngs=rngs)

    with pytest.raises(ValueError) as e:
        spdjax.from_nnx(build(M, 0), {"mix": 2})
    msg = str(e.value)
    assert "'mix'" in msg and eq in msg and "not supported" in msg


def test_nnx_call_argument_and_single_input_sites():
    class M(nnx.Module):
        def __init__(self, rngs):
            self.fc = nnx.Linear(6, 3, rngs=rngs)

        def __call__(self, x, scale):
            return scale * self.fc(x)

        def twice(self, x):
            return self.fc(x, 2.0)

    m = build(M, 0)
    x = _x()
    target = spdjax.from_nnx(m, {"fc": 2}, call=lambda mod, batch: mod(batch["x"], batch["scale"]))
    batch = {"x": x, "scale": jnp.float32(3.0)}
    np.testing.assert_allclose(apply(target, batch), jax.jit(lambda x: m(x, 3.0))(x), rtol=1e-6, atol=1e-6)
    # a decomposed layer takes exactly one array: anything else is an error naming the site
    bad = spdjax.from_nnx(m, {"fc": 2}, call=lambda mod, x: mod.twice(x))
    with pytest.raises(TypeError, match="'fc'"):
        bad(x)


# ----------------------------------------------------------------------------- NNX: pattern errors


def test_pattern_matching_nothing_names_the_pattern(net):
    with pytest.raises(ValueError, match=r"'blocks\.\*\.missing'.*matches no"):
        spdjax.from_nnx(net, {"blocks.*.fc_*": 3, "blocks.*.missing": 2})


def test_identity_pattern_matching_nothing_is_an_error(net):
    with pytest.raises(ValueError, match=r"'nothing_here'"):
        spdjax.from_nnx(net, {"head": 2}, identity={"nothing_here": 2})


def test_two_patterns_matching_one_layer_names_both_and_the_path(net):
    with pytest.raises(ValueError) as e:
        spdjax.from_nnx(net, {"blocks.*.fc_in": 3, "blocks.0.fc_*": 2})
    msg = str(e.value)
    assert "'blocks.0.fc_in'" in msg
    assert "'blocks.*.fc_in'" in msg and "'blocks.0.fc_*'" in msg


@pytest.mark.parametrize(
    "pattern, path, typename",
    [
        ("blocks.0.norm", "blocks.0.norm", "LayerNorm"),  # unsupported layer
        ("blocks.1", "blocks.1", "Block"),  # a container module
        ("blocks", "blocks", "List"),  # the nnx.List itself
    ],
)
def test_unsupported_layer_type_names_pattern_path_and_type(net, pattern, path, typename):
    with pytest.raises(ValueError) as e:
        spdjax.from_nnx(net, {pattern: 2})
    msg = str(e.value)
    assert repr(pattern) in msg and repr(path) in msg and typename in msg


def test_conv_is_not_decomposable():
    class M(nnx.Module):
        def __init__(self, rngs):
            self.conv = nnx.Conv(3, 4, kernel_size=(3,), rngs=rngs)
            self.fc = nnx.Linear(4, 2, rngs=rngs)

    with pytest.raises(ValueError, match=r"'conv\*'.*'conv'.*Conv"):
        spdjax.from_nnx(build(M, 0), {"conv*": 2, "fc": 2})


@pytest.mark.parametrize("C", [0, -3])
def test_nonpositive_C_is_an_error(net, C):
    with pytest.raises(ValueError, match=r"'head'.*positive"):
        spdjax.from_nnx(net, {"blocks.*.fc_*": 3, "head": C})
    with pytest.raises(ValueError, match=r"'blocks\.0\.fc_out'.*positive"):
        spdjax.from_nnx(net, {"head": 2}, identity={"blocks.0.fc_out": C})


# ----------------------------------------------------------------------------- tied sites


def test_tied_site_shares_the_primary_parameters_transposed():
    model = make_tms()
    target = spdjax.from_nnx(model, {"enc": 3, "dec": 3}, tied={"dec": "enc"})
    enc, dec = target.site("enc"), target.site("dec")
    assert enc.tied_to is None and dec.tied_to == "enc" and dec.param_name == "enc"
    assert (enc.d_in, enc.d_out, dec.d_in, dec.d_out) == (5, 2, 2, 5)
    assert [s.name for s in target.primary_sites] == ["enc"]
    params = random_params(target)
    assert set(params.components) == {"enc"}  # one parameter, not two copies
    assert set(params.ci) == {"enc", "dec"}  # each site has its own CI function

    x = jnp.asarray(np.random.default_rng(1).uniform(size=(B, 5)), jnp.float32)
    masks = {"enc": SiteMask(jnp.ones((B, 3)), None), "dec": SiteMask(jnp.ones((B, 3)), None)}
    b = model.dec.bias[...]

    def by_hand(comp):
        VU = comp.V @ comp.U  # enc kernel (5, 2); dec uses its transpose
        return jax.nn.relu((x @ VU) @ VU.T + b)

    def via_target(comp):
        return masked_forward(spdjax.SPDParams({"enc": comp}, params.ci), target, x, masks)

    @jax.jit
    def run(comp):
        return (
            via_target(comp), by_hand(comp), target(x), model(x),
            jax.grad(lambda c: jnp.sum(via_target(c) ** 2))(comp),
            jax.grad(lambda c: jnp.sum(by_hand(c) ** 2))(comp),
        )

    comp = params.components["enc"]
    got, want, t_out, m_out, g_t, g_h = run(comp)
    np.testing.assert_allclose(t_out, m_out, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert float(np.max(np.abs(want))) > 0  # not everything clipped away by the relu
    # gradients from both sites reach the single parameter
    np.testing.assert_allclose(g_t.V, g_h.V, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(g_t.U, g_h.U, rtol=1e-4, atol=1e-6)
    # faithfulness counts the shared parameter once
    k = np.asarray(target.kernels()["enc"])
    want = np.sum((k - np.asarray(comp.V) @ np.asarray(comp.U)) ** 2) / k.size
    got = faithfulness_loss(params.components, target.kernels(), target.sites)
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_tied_kernels_must_be_transposes():
    model = make_tms(tie=False)
    with pytest.raises(ValueError) as e:
        spdjax.from_nnx(model, {"enc": 3, "dec": 3}, tied={"dec": "enc"})
    msg = str(e.value)
    assert "'dec'" in msg and "'enc'" in msg and "transpose" in msg


def test_tied_errors_C_mismatch_and_unknown_site():
    model = make_tms()
    with pytest.raises(ValueError, match=r"'dec'.*C=4.*'enc'.*C=3"):
        spdjax.from_nnx(model, {"enc": 3, "dec": 4}, tied={"dec": "enc"})
    with pytest.raises(ValueError, match=r"'dec'"):
        spdjax.from_nnx(model, {"enc": 3}, tied={"dec": "enc"})


# ----------------------------------------------------------------------------- identity insertion


def test_identity_insertion_on_a_site(net):
    x = _x()
    target = spdjax.from_nnx(net, {"blocks.*.fc_*": 3}, identity={"blocks.0.fc_out": 4})
    names = list(target.site_names)
    name = "blocks.0.fc_out.pre_identity"
    assert name in names and names.index(name) + 1 == names.index("blocks.0.fc_out")
    assert len(names) == 5
    s = target.site(name)
    assert (s.kind, s.d_in, s.d_out, s.C) == ("identity", 10, 10, 4)
    assert s.in_shape == s.out_shape == (10,)
    out, inputs = _clean(target, x)
    np.testing.assert_allclose(out, apply(net, x), rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(target.kernels()[name], np.eye(10))
    np.testing.assert_array_equal(inputs[name], inputs["blocks.0.fc_out"])
    params = jax.eval_shape(spdjax.init_decomposition, jax.random.key(0), target)
    assert params.components[name].V.shape == (10, 4)
    assert params.components[name].U.shape == (4, 10)


def test_identity_insertion_before_a_layer_that_is_not_a_site(net):
    x = _x()
    target = spdjax.from_nnx(net, {"head": 2}, identity={"blocks.1.fc_out": 3})
    assert target.site_names == ("blocks.1.fc_out.pre_identity", "head")
    np.testing.assert_allclose(apply(target, x), apply(net, x), rtol=1e-6, atol=1e-7)
    # masking only the identity with ones and no delta replaces I by V U at that point
    params = random_params(target)
    comp = params.components["blocks.1.fc_out.pre_identity"]
    masks = {"blocks.1.fc_out.pre_identity": SiteMask(jnp.ones((B, T, 3)), None)}

    @jax.jit
    def run(params, target, x):
        blk0, blk1 = net.blocks
        h = blk0(x)
        y = blk1.norm(blk1.fc_out(jax.nn.gelu(blk1.fc_in(h)) @ comp.V @ comp.U))
        return masked_forward(params, target, x, masks), net.head(h + y), net(x)

    got, want, plain = run(params, target, x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert float(np.max(np.abs(got - plain))) > 1e-3


# ----------------------------------------------------------------------------- pure-function targets


def _pure_params():
    rng = np.random.default_rng(3)
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    return {
        "layers": [
            {
                "w_in": f32(rng.normal(size=(6, 10)) / 3),
                "b_in": f32(np.linspace(-1, 1, 10)),
                "w_out": f32(rng.normal(size=(10, 3)) / 3),
            }
        ],
        "unembed": f32(rng.normal(size=(3, 4))),
    }


def _pure_apply(params, x):
    p = params["layers"][0]
    h = jax.nn.relu(targets.linear("layers.0.w_in", x, p["w_in"], p["b_in"]))
    h = targets.linear("layers.0.w_out", h, p["w_out"])
    return targets.linear("unembed", h, params["unembed"])


def test_from_apply_sites_and_forward():
    params = _pure_params()
    x = _x()
    target = spdjax.from_apply(_pure_apply, params, {"layers.*.w_*": 3, "unembed": 2})
    assert target.site_names == ("layers.0.w_in", "layers.0.w_out", "unembed")
    s = target.site("layers.0.w_in")
    assert (s.kind, s.d_in, s.d_out, s.C) == ("linear", 6, 10, 3)
    s = target.site("layers.0.w_out")
    assert (s.kind, s.d_in, s.d_out, s.C) == ("linear", 10, 3, 3)
    assert (target.site("unembed").d_in, target.site("unembed").C) == (3, 2)
    p = {k: np.asarray(v) for k, v in params["layers"][0].items()}
    by_hand = np.maximum(np.asarray(x) @ p["w_in"] + p["b_in"], 0) @ p["w_out"] @ np.asarray(params["unembed"])
    # outside a target, linear() is a plain matmul; inside, the target computes the same
    np.testing.assert_allclose(jax.jit(_pure_apply)(params, x), by_hand, rtol=1e-5, atol=1e-5)
    out, inputs = _clean(target, x)
    np.testing.assert_allclose(out, by_hand, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(target.kernels()["layers.0.w_out"], params["layers"][0]["w_out"])
    np.testing.assert_array_equal(inputs["layers.0.w_in"], x)
    assert inputs["layers.0.w_out"].shape == (B, T, 10)


def test_from_apply_pattern_errors_and_identity():
    params = _pure_params()
    with pytest.raises(ValueError, match=r"'layers\.\*\.nope'"):
        spdjax.from_apply(_pure_apply, params, {"layers.*.nope": 2})
    with pytest.raises(ValueError, match=r"'layers\.0\.w_in'.*'layers\.\*'.*'\*w_in'"):
        spdjax.from_apply(_pure_apply, params, {"layers.*": 2, "*w_in": 3})
    with pytest.raises(ValueError, match=r"'unembed'"):
        spdjax.from_apply(_pure_apply, params, {"unembed": 0})
    target = spdjax.from_apply(_pure_apply, params, {"unembed": 2}, identity={"layers.0.w_out": 5})
    assert target.site_names == ("layers.0.w_out.pre_identity", "unembed")
    s = target.site("layers.0.w_out.pre_identity")
    assert (s.kind, s.d_in, s.C) == ("identity", 10, 5)
    x = _x()
    out, inputs = _clean(target, x)
    np.testing.assert_allclose(out, jax.jit(_pure_apply)(params, x), rtol=1e-6, atol=1e-6)
    assert inputs["layers.0.w_out.pre_identity"].shape == (B, T, 10)

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

    def __init__(self, rngs: nnx.Rngs, n_features: int = 5, n_hidden: int = 2, tie: bool = True):
        self.enc = nnx.Linear(n_features, n_hidden, use_bias=False, rngs=rngs)
        self.dec = nnx.Linear(n_hidden, n_features, rngs=rngs)
        if tie:
            self.dec.kernel[...] = self.enc.kernel[...].T
        self.dec.bias[...] = 0.1 * jnp.arange(n_features, dtype=jnp.float32) - 0.2

    def __call__(self, x):
        return jax.nn.relu(self.dec(self.enc(x)))


def _x(key=0, shape=(B, T, 6)):
    return jax.random.normal(jax.random.key(key), shape)


def _ids(key=0):
    return jax.random.randint(jax.random.key(key), (B, T), 0, 11)


@pytest.fixture(scope="module")
def net():
    return Net(nnx.Rngs(0))


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
    assert set(target.site_names) == set(expected)  # the LayerNorms are not matched by fc_*
    assert len(target.site_names) == len(expected)
    for name, (d_in, d_out, C) in expected.items():
        s = target.site(name)
        assert s.kind == "linear"
        assert (s.d_in, s.d_out, s.C) == (d_in, d_out, C), name
        assert s.in_shape == (d_in,) and s.out_shape == (d_out,)
        assert s.tied_to is None and s.param_name == name
    # the kernels the target reports are the model's own, in the (d_in, d_out) layout
    kernels = target.kernels()
    np.testing.assert_array_equal(kernels["blocks.0.fc_in"], net.blocks[0].fc_in.kernel[...])
    np.testing.assert_array_equal(kernels["head"], net.head.kernel[...])


def test_nnx_params_follow_site_specs(net):
    target = spdjax.from_nnx(net, {"blocks.*.fc_in": 3, "blocks.*.fc_out": 5})
    assert {s.name: s.C for s in target.sites} == {
        "blocks.0.fc_in": 3, "blocks.1.fc_in": 3, "blocks.0.fc_out": 5, "blocks.1.fc_out": 5,
    }
    params = spdjax.init_decomposition(jax.random.key(0), target)
    assert set(params.components) == set(target.site_names) == set(params.ci)
    for s in target.sites:
        assert params.components[s.name].V.shape == (s.d_in, s.C)
        assert params.components[s.name].U.shape == (s.C, s.d_out)


def test_nnx_plain_forward_equals_model_and_model_is_untouched(net):
    x = _x()
    want = net(x)
    target = spdjax.from_nnx(net, {"blocks.*.fc_*": 3, "head": 2})
    np.testing.assert_array_equal(target(x), want)
    # under jit, with the target passed as an argument (params as data)
    np.testing.assert_allclose(jax.jit(lambda t, x: t(x))(target, x), want, atol=1e-6)
    # the user's model is not edited: its layers are still plain nnx.Linear and compute the same
    assert type(net.blocks[0].fc_in) is nnx.Linear and type(net.head) is nnx.Linear
    np.testing.assert_array_equal(net(x), want)


def test_nnx_clean_forward_records_site_inputs_with_positions(net):
    x = _x()
    target = spdjax.from_nnx(net, {"blocks.*.fc_*": 3, "head": 2})
    out, inputs = clean_forward(target, x)
    np.testing.assert_array_equal(out, net(x))
    np.testing.assert_array_equal(inputs["blocks.0.fc_in"], x)
    h = jax.nn.gelu(net.blocks[0].fc_in(x))
    np.testing.assert_allclose(inputs["blocks.0.fc_out"], h, atol=1e-6)
    for s in target.sites:
        assert inputs[s.name].shape == (B, T, s.d_in)


def test_nnx_embed_and_einsum_sites():
    model = TokenNet(nnx.Rngs(1))
    ids = _ids()
    target = spdjax.from_nnx(model, {"embed": 4, "proj": 3, "unembed": 2})
    e, p, u = target.site("embed"), target.site("proj"), target.site("unembed")
    assert (e.kind, e.d_in, e.d_out, e.C, e.in_shape, e.out_shape) == ("embed", 11, 6, 4, (), (6,))
    assert (p.kind, p.d_in, p.d_out, p.C, p.in_shape, p.out_shape) == ("einsum", 6, 6, 3, (6,), (2, 3))
    assert p.einsum_str == "...d,dnh->...nh"
    assert (u.kind, u.d_in, u.d_out, u.C) == ("linear", 6, 11, 2)
    np.testing.assert_array_equal(target(ids), model(ids))
    k = target.kernels()
    np.testing.assert_array_equal(k["embed"], model.embed.embedding[...])
    np.testing.assert_array_equal(k["proj"], model.proj.kernel[...].reshape(6, 6))
    _, inputs = clean_forward(target, ids)
    np.testing.assert_array_equal(inputs["embed"], ids)  # embed sites see the integer ids
    assert inputs["proj"].shape == (B, T, 6)


def test_nnx_einsum_with_two_contracted_axes():
    class M(nnx.Module):
        def __init__(self, rngs):
            self.o = nnx.Einsum("...nh,nhd->...d", (2, 3, 4), (4,), rngs=rngs)

        def __call__(self, x):
            return self.o(x)

    m = M(nnx.Rngs(0))
    x = _x(shape=(B, T, 2, 3))
    target = spdjax.from_nnx(m, {"o": 2})
    s = target.site("o")
    assert (s.kind, s.in_shape, s.out_shape, s.d_in, s.d_out) == ("einsum", (2, 3), (4,), 6, 4)
    np.testing.assert_array_equal(target(x), m(x))


@pytest.mark.parametrize("eq, kshape", [("...d,hd->...h", (4, 6)), ("...nd,dh->...h", (6, 4))])
def test_nnx_unsupported_einsum_is_an_error(eq, kshape):
    class M(nnx.Module):
        def __init__(self, rngs):
            self.mix = nnx.Einsum(eq, kshape, rngs=rngs)

    with pytest.raises(ValueError) as e:
        spdjax.from_nnx(M(nnx.Rngs(0)), {"mix": 2})
    msg = str(e.value)
    assert "'mix'" in msg and eq in msg and "not supported" in msg


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
        spdjax.from_nnx(M(nnx.Rngs(0)), {"conv*": 2, "fc": 2})


@pytest.mark.parametrize("C", [0, -3])
def test_nonpositive_C_is_an_error(net, C):
    with pytest.raises(ValueError, match=r"'head'.*positive"):
        spdjax.from_nnx(net, {"blocks.*.fc_*": 3, "head": C})
    with pytest.raises(ValueError, match=r"'blocks\.0\.fc_out'.*positive"):
        spdjax.from_nnx(net, {"head": 2}, identity={"blocks.0.fc_out": C})


# ----------------------------------------------------------------------------- tied sites


def test_tied_site_shares_the_primary_parameters_transposed():
    model = TMS(nnx.Rngs(0))
    target = spdjax.from_nnx(model, {"enc": 3, "dec": 3}, tied={"dec": "enc"})
    enc, dec = target.site("enc"), target.site("dec")
    assert enc.tied_to is None and dec.tied_to == "enc" and dec.param_name == "enc"
    assert (enc.d_in, enc.d_out, dec.d_in, dec.d_out) == (5, 2, 2, 5)
    assert [s.name for s in target.primary_sites] == ["enc"]
    params = spdjax.init_decomposition(jax.random.key(0), target)
    assert set(params.components) == {"enc"}  # one parameter, not two copies
    assert set(params.ci) == {"enc", "dec"}  # each site has its own CI function

    x = jax.random.uniform(jax.random.key(1), (B, 5))
    np.testing.assert_array_equal(target(x), model(x))
    masks = {
        "enc": SiteMask(jnp.ones((B, 3)), None),
        "dec": SiteMask(jnp.ones((B, 3)), None),
    }
    b = model.dec.bias[...]

    def by_hand(comp):
        VU = comp.V @ comp.U  # enc kernel (5, 2); dec uses its transpose
        return jax.nn.relu((x @ VU) @ VU.T + b)

    def via_target(comp):
        p = spdjax.SPDParams({"enc": comp}, params.ci)
        return masked_forward(p, target, x, masks)

    comp = params.components["enc"]
    np.testing.assert_allclose(via_target(comp), by_hand(comp), rtol=1e-5, atol=1e-6)
    # gradients from both sites reach the single parameter
    g_t = jax.grad(lambda c: jnp.sum(via_target(c) ** 2))(comp)
    g_h = jax.grad(lambda c: jnp.sum(by_hand(c) ** 2))(comp)
    np.testing.assert_allclose(g_t.V, g_h.V, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(g_t.U, g_h.U, rtol=1e-4, atol=1e-6)
    # faithfulness counts the shared parameter once
    k = target.kernels()
    want = jnp.sum((k["enc"] - comp.V @ comp.U) ** 2) / k["enc"].size
    np.testing.assert_allclose(
        faithfulness_loss(params.components, k, target.sites), want, rtol=1e-6
    )


def test_tied_kernels_must_be_transposes():
    model = TMS(nnx.Rngs(0), tie=False)
    with pytest.raises(ValueError) as e:
        spdjax.from_nnx(model, {"enc": 3, "dec": 3}, tied={"dec": "enc"})
    msg = str(e.value)
    assert "'dec'" in msg and "'enc'" in msg and "transpose" in msg


def test_tied_errors_C_mismatch_and_unknown_site():
    model = TMS(nnx.Rngs(0))
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
    s = target.site(name)
    assert (s.kind, s.d_in, s.d_out, s.C) == ("identity", 10, 10, 4)
    assert s.in_shape == s.out_shape == (10,)
    np.testing.assert_array_equal(target(x), net(x))
    np.testing.assert_array_equal(target.kernels()[name], jnp.eye(10))
    _, inputs = clean_forward(target, x)
    np.testing.assert_array_equal(inputs[name], inputs["blocks.0.fc_out"])
    params = spdjax.init_decomposition(jax.random.key(0), target)
    assert params.components[name].V.shape == (10, 4)
    assert params.components[name].U.shape == (4, 10)


def test_identity_insertion_before_a_layer_that_is_not_a_site(net):
    x = _x()
    target = spdjax.from_nnx(net, {"head": 2}, identity={"blocks.1.fc_out": 3})
    assert target.site_names == ("blocks.1.fc_out.pre_identity", "head")
    np.testing.assert_array_equal(target(x), net(x))
    # masking only the identity with ones and no delta replaces I by V U at that point
    params = spdjax.init_decomposition(jax.random.key(0), target)
    comp = params.components["blocks.1.fc_out.pre_identity"]
    masks = {"blocks.1.fc_out.pre_identity": SiteMask(jnp.ones((B, T, 3)), None)}
    blk0, blk1 = net.blocks
    h = blk0(x)
    y = blk1.norm(blk1.fc_out(jax.nn.gelu(blk1.fc_in(h)) @ comp.V @ comp.U))
    want = net.head(h + y)
    np.testing.assert_allclose(masked_forward(params, target, x, masks), want, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- pure-function targets


def _pure_params():
    ks = jax.random.split(jax.random.key(3), 3)
    return {
        "layers": [
            {
                "w_in": jax.random.normal(ks[0], (6, 10)) / 3,
                "b_in": jnp.linspace(-1, 1, 10),
                "w_out": jax.random.normal(ks[1], (10, 3)) / 3,
            }
        ],
        "unembed": jax.random.normal(ks[2], (3, 4)),
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
    assert (target.site("unembed").d_in, target.site("unembed").C) == (3, 2)
    want = _pure_apply(params, x)  # outside a target, linear() is a plain matmul
    np.testing.assert_allclose(
        want, jax.nn.relu(x @ params["layers"][0]["w_in"] + params["layers"][0]["b_in"])
        @ params["layers"][0]["w_out"] @ params["unembed"], rtol=1e-5, atol=1e-6,
    )
    np.testing.assert_array_equal(target(x), want)
    np.testing.assert_array_equal(target.kernels()["layers.0.w_out"], params["layers"][0]["w_out"])
    out, inputs = clean_forward(target, x)
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
    np.testing.assert_array_equal(target(x), _pure_apply(params, x))

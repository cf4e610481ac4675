"""A user's own NNX transformer (nnx.MultiHeadAttention with causal masking, sinusoidal positions, an
MLP), written without spdjax in mind, decomposed by path patterns through the public API: attention
q / k / v / out are `linear_general` sites (heads flattened), U V = W with every mask 1 reproduces the
logits, CI is per token, and `jax.jit(jax.grad(loss_fn))` works with the KL output loss."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import spdjax
from spdjax.components import Components
from spdjax.decomposition import SPDParams
from spdjax.losses import LossConfig, clean_forward, compute_ci, masked_forward
from spdjax.masks import SiteMask

VOCAB, D, HEADS, LAYERS, T, B = 11, 16, 2, 2, 7, 3


def sinusoidal(T: int, d: int) -> jnp.ndarray:
    pos = np.arange(T)[:, None]
    i = np.arange(d // 2)[None]
    ang = pos / 10000 ** (2 * i / d)
    return jnp.asarray(np.concatenate([np.sin(ang), np.cos(ang)], axis=1), jnp.float32)


class MLP(nnx.Module):
    def __init__(self, d, rngs):
        self.fc_in, self.fc_out = nnx.Linear(d, 2 * d, rngs=rngs), nnx.Linear(2 * d, d, rngs=rngs)

    def __call__(self, x):
        return self.fc_out(jax.nn.gelu(self.fc_in(x)))


class Block(nnx.Module):
    def __init__(self, d, heads, rngs):
        self.ln1, self.ln2 = nnx.LayerNorm(d, rngs=rngs), nnx.LayerNorm(d, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(num_heads=heads, in_features=d, decode=False, rngs=rngs)
        self.mlp = MLP(d, rngs)

    def __call__(self, x, mask):
        x = x + self.attn(self.ln1(x), mask=mask)
        return x + self.mlp(self.ln2(x))


class Transformer(nnx.Module):
    def __init__(self, rngs):
        self.embed = nnx.Embed(VOCAB, D, rngs=rngs)
        self.blocks = nnx.List([Block(D, HEADS, rngs) for _ in range(LAYERS)])
        self.unembed = nnx.Linear(D, VOCAB, rngs=rngs)

    def __call__(self, tokens):  # (batch, positions) int
        x = self.embed(tokens) + sinusoidal(tokens.shape[-1], D)
        mask = nnx.make_causal_mask(tokens)
        for block in self.blocks:
            x = block(x, mask)
        return self.unembed(x)


@pytest.fixture(scope="module")
def case():
    model = Transformer(nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(1), (B, T), 0, VOCAB)
    target = spdjax.from_nnx(model, sites={"blocks.*.attn.*": 16, "blocks.*.mlp.*": 16})
    return model, target, tokens


def test_attention_sites_found_by_path(case):
    _, target, _ = case
    kinds = {s.name: (s.kind, s.in_shape, s.out_shape) for s in target.sites}
    for l in range(LAYERS):
        for m in ("query", "key", "value"):
            assert kinds[f"blocks.{l}.attn.{m}"] == ("linear_general", (D,), (HEADS, D // HEADS))
        assert kinds[f"blocks.{l}.attn.out"] == ("linear_general", (HEADS, D // HEADS), (D,))
        assert kinds[f"blocks.{l}.mlp.fc_in"][0] == "linear"
    assert len(target.sites) == LAYERS * 6


def test_exact_components_with_all_masks_one_reproduce_the_logits(case):
    model, target, tokens = case
    want = model(tokens)
    out, inputs = clean_forward(target, tokens)
    np.testing.assert_allclose(out, want, rtol=1e-6, atol=1e-6)  # the wrapped model is the model
    comps, masks = {}, {}
    for s in target.sites:  # U V = W exactly (rank <= 16 = C): the SVD factors
        k = np.asarray(target.kernels()[s.name], np.float64)
        u, sv, vt = np.linalg.svd(k, full_matrices=False)
        r = len(sv)
        V = np.zeros((s.d_in, s.C))
        U = np.zeros((s.C, s.d_out))
        V[:, :r], U[:r] = u * sv, vt
        comps[s.name] = Components(V=jnp.asarray(V, jnp.float32), U=jnp.asarray(U, jnp.float32))
        lead = inputs[s.name].shape[: inputs[s.name].ndim - len(s.in_shape)]
        assert lead == (B, T)  # per token
        masks[s.name] = SiteMask(jnp.ones(lead + (s.C,)), None)
    params = SPDParams(comps, spdjax.init_decomposition(jax.random.key(2), target).ci)
    got = masked_forward(params, target, tokens, masks)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    ci = compute_ci(params, target, inputs, "leaky_hard")
    assert all(ci.lower[s.name].shape == (B, T, s.C) for s in target.sites)


def test_jit_grad_of_the_loss(case):
    _, target, tokens = case
    params = spdjax.init_decomposition(jax.random.key(0), target, ci_type="shared_mlp", ci_hidden=(8,))
    config = LossConfig(
        terms=dict(
            stochastic_recon=dict(coeff=1.0), stochastic_recon_layerwise=dict(coeff=1.0),
            pgd_recon_subset=dict(coeff=1.0, n_steps=1), importance_minimality=dict(coeff=1e-3),
        ),
        output_loss="kl",
    )
    chunked = dataclasses.replace(config, vocab_chunk=7)
    f = lambda c: jax.jit(jax.value_and_grad(lambda p, t, x, k: spdjax.loss_fn(p, t, x, k, c)[0]))  # noqa: E731
    (v0, g0), (v1, g1) = (f(c)(params, target, tokens, jax.random.key(3)) for c in (config, chunked))
    leaves = jax.tree.leaves(g0)
    assert leaves and all(bool(jnp.all(jnp.isfinite(x))) for x in leaves)
    assert any(float(jnp.max(jnp.abs(x))) > 0 for x in jax.tree.leaves(g0.components))
    # the KL in vocabulary chunks: the same loss and gradients
    np.testing.assert_allclose(float(v1), float(v0), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_weighted_divergence_matches_numpy():
    from spdjax.losses.forward import divergence, position_weights

    rng = np.random.default_rng(0)
    pred, tgt = rng.normal(size=(2, 5, 7)), rng.normal(size=(2, 5, 7))
    w = (rng.random((2, 5)) < 0.5).astype(np.float64)
    w[0, 0] = 1.0

    def log_softmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    lt, lp = log_softmax(tgt), log_softmax(pred)
    kl = (np.exp(lt) * (lt - lp)).sum(-1)
    mse = ((pred - tgt) ** 2).mean(-1)
    with position_weights(jnp.asarray(w, jnp.float32)):
        got_kl = divergence("kl", jnp.asarray(pred, jnp.float32), jnp.asarray(tgt, jnp.float32))
        got_mse = divergence("mse", jnp.asarray(pred, jnp.float32), jnp.asarray(tgt, jnp.float32))
    np.testing.assert_allclose(got_kl, (kl * w).sum() / w.sum(), rtol=1e-5)
    np.testing.assert_allclose(got_mse, (mse * w).sum() / w.sum(), rtol=1e-5)


def test_loss_mask_selects_the_positions_that_carry_a_loss():
    """A dict batch with `loss_mask` one-hot on the last position gives the same loss terms as a target
    whose output is only the last position (same per-token CI and masks, same key)."""
    model = Transformer(nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(1), (B, T), 0, VOCAB)
    sites = {"blocks.*.attn.*": 8, "blocks.*.mlp.*": 8}
    full = spdjax.from_nnx(model, sites=sites, call=lambda m, b: m(b["tokens"]))
    last = spdjax.from_nnx(model, sites=sites, call=lambda m, b: m(b["tokens"])[:, -1:])
    params = spdjax.init_decomposition(jax.random.key(0), full, ci_type="shared_mlp", ci_hidden=(8,))
    config = LossConfig(
        terms=dict(stochastic_recon=dict(coeff=1.0), stochastic_recon_layerwise=dict(coeff=1.0),
                   importance_minimality=dict(coeff=1e-3)),
        output_loss="kl",
    )
    key = jax.random.key(5)
    mask = jnp.zeros((B, T)).at[:, -1].set(1.0)
    _, m_full = spdjax.loss_fn(params, full, {"tokens": tokens, "loss_mask": mask}, key, config)
    _, m_last = spdjax.loss_fn(params, last, {"tokens": tokens}, key, config)
    _, m_all = spdjax.loss_fn(params, full, {"tokens": tokens}, key, config)
    _, m_ones = spdjax.loss_fn(params, full, {"tokens": tokens, "loss_mask": jnp.ones((B, T))}, key, config)
    for k in ("loss/stochastic_recon", "loss/stochastic_recon_layerwise"):
        np.testing.assert_allclose(m_full[k], m_last[k], rtol=1e-5, err_msg=k)
        np.testing.assert_allclose(m_ones[k], m_all[k], rtol=1e-5, err_msg=k)
        assert not np.isclose(float(m_full[k]), float(m_all[k]), rtol=1e-3)  # the mask matters

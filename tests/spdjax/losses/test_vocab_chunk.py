"""KL computed in vocabulary chunks equals the one-piece KL (float64 NumPy reference, gradients, and the
whole loss with position weights)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from spdjax.losses import LossConfig
from spdjax.losses.forward import divergence, kl_chunked, position_weights, vocab_chunks


def _np_kl(pred, target):
    lt = target - np.log(np.exp(target - target.max(-1, keepdims=True)).sum(-1, keepdims=True)) - target.max(-1, keepdims=True)
    lp = pred - np.log(np.exp(pred - pred.max(-1, keepdims=True)).sum(-1, keepdims=True)) - pred.max(-1, keepdims=True)
    return (np.exp(lt) * (lt - lp)).sum(-1)


@pytest.mark.parametrize("chunk", [1, 3, 7, 10, 64])
def test_kl_chunked_matches_numpy(chunk):
    rng = np.random.default_rng(chunk)
    pred, target = rng.normal(size=(2, 5, 10)) * 3, rng.normal(size=(2, 5, 10)) * 3
    got = kl_chunked(jnp.asarray(pred, jnp.float32), jnp.asarray(target, jnp.float32), chunk)
    np.testing.assert_allclose(np.asarray(got), _np_kl(pred, target), rtol=1e-4, atol=1e-5)


def test_kl_chunked_gradients():
    jax.config.update("jax_enable_x64", True)
    try:
        rng = np.random.default_rng(0)
        pred, target = jnp.asarray(rng.normal(size=(3, 10))), jnp.asarray(rng.normal(size=(3, 10)))
        check_grads(lambda p, t: kl_chunked(p, t, 4), (pred, target), order=2, modes=("rev",))
    finally:
        jax.config.update("jax_enable_x64", False)


def test_divergence_in_chunks_with_position_weights():
    rng = np.random.default_rng(1)
    pred, target = (jnp.asarray(rng.normal(size=(2, 6, 33)), jnp.float32) for _ in range(2))
    w = jnp.asarray(rng.random((2, 6)) > 0.5, jnp.float32)
    with position_weights(w):
        ref = divergence("kl", pred, target)
        with vocab_chunks(8):
            got = divergence("kl", pred, target)
    np.testing.assert_allclose(float(got), float(ref), rtol=1e-5)


def test_vocab_chunk_option_is_checked():
    assert LossConfig(vocab_chunk=512).vocab_chunk == 512
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match="loss.vocab_chunk must be None or an int >= 1"):
            LossConfig(vocab_chunk=bad)

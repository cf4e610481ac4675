"""Export / load round trip of a decomposition (safetensors + JSON)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import spdjax
from spdjax import export


class Tied(nnx.Module):
    def __init__(self, rngs):
        self.enc = nnx.Linear(5, 2, use_bias=False, rngs=rngs)
        self.dec = nnx.Linear(2, 5, rngs=rngs)
        self.dec.kernel[...] = self.enc.kernel[...].T

    def __call__(self, x):
        return jax.nn.relu(self.dec(self.enc(x)))


@pytest.mark.parametrize("ci_type,hidden", [("mlp", (4,)), ("shared_mlp", (3, 2))])
def test_round_trip(tmp_path, ci_type, hidden):
    target = spdjax.from_nnx(Tied(nnx.Rngs(0)), sites={"enc": 6, "dec": 6}, tied={"dec": "enc"},
                             identity={"dec": 3})
    params = spdjax.init_decomposition(jax.random.key(1), target, ci_type, hidden)
    export.save(tmp_path / "d", params, target.sites, ci_type, hidden, extra={"note": "x"})
    meta = json.loads((tmp_path / "d" / export.META).read_text())
    assert meta["format"] == export.FORMAT and meta["spdjax_version"] == spdjax.__version__
    dec = spdjax.load(tmp_path / "d")
    assert dec.sites == target.sites and dec.ci_type == ci_type and dec.ci_hidden == hidden
    assert dec.extra == {"note": "x"}
    assert jax.tree.structure(dec.params) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(dec.params), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    x = jnp.linspace(0, 1, 20).reshape(4, 5)
    l1, _ = spdjax.loss_fn(params, target, x, jax.random.key(0))
    l2, _ = spdjax.loss_fn(dec.params, target, x, jax.random.key(0))
    assert float(l1) == float(l2)


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a saved spdjax decomposition"):
        spdjax.load(tmp_path)
    (tmp_path / export.META).write_text(json.dumps({"format": "other"}))
    (tmp_path / export.TENSORS).write_bytes(b"")
    with pytest.raises(ValueError, match="format"):
        spdjax.load(tmp_path)

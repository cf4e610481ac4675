"""The ResidMLP target (compressed computation) as a Flax NNX model, and its pure forward function.

r0 = x W_E (W_E: (n_features, d_embed), fixed random rows of unit norm, frozen);
each layer l: r <- r + mlp_out_l(ReLU(mlp_in_l(r))) (no biases); output y_hat = r W_E^T (W_U = W_E^T).

Kernel layout as in nnx.Linear (`y = x @ kernel`): `mlp_in` kernel `(d_embed, d_mlp)`, `mlp_out`
kernel `(d_mlp, d_embed)`. Stacked over layers: `W_in (n_layers, d_embed, d_mlp)`,
`W_out (n_layers, d_mlp, d_embed)`. Site paths: `layers.<l>.mlp_in`, `layers.<l>.mlp_out`;
W_E is an `nnx.Variable` (not a Linear), so it is never a decomposition site.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float


def random_embedding(key: Array, n_features: int, d_embed: int) -> Float[Array, "n_features d_embed"]:
    """W_E: standard normal rows scaled to unit norm (deterministic from `key`)."""
    W = jax.random.normal(key, (n_features, d_embed), jnp.float32)
    return W / jnp.linalg.norm(W, axis=1, keepdims=True)


class MLP(nnx.Module):
    """One residual MLP block: `mlp_out(relu(mlp_in(r)))`."""

    def __init__(self, d_embed: int, d_mlp: int, *, rngs: nnx.Rngs):
        self.mlp_in = nnx.Linear(d_embed, d_mlp, use_bias=False, rngs=rngs)
        self.mlp_out = nnx.Linear(d_mlp, d_embed, use_bias=False, rngs=rngs)

    def __call__(self, r):
        return self.mlp_out(jax.nn.relu(self.mlp_in(r)))


class ResidMLP(nnx.Module):
    """`x (..., n_features) -> y_hat (..., n_features)` through a residual stream of width d_embed."""

    def __init__(self, W_E, d_mlp: int, n_layers: int, *, rngs: nnx.Rngs | None = None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        W_E = jnp.asarray(W_E, jnp.float32)
        self.n_features, self.d_embed = W_E.shape
        self.d_mlp, self.n_layers = d_mlp, n_layers
        self.W_E = nnx.Variable(W_E)  # frozen embedding; W_U = W_E^T
        self.layers = nnx.List([MLP(self.d_embed, d_mlp, rngs=rngs) for _ in range(n_layers)])

    def __call__(self, x: Float[Array, "*b n_features"]) -> Float[Array, "*b n_features"]:
        W_E = self.W_E[...]
        r = x @ W_E
        for layer in self.layers:
            r = r + layer(r)
        return r @ W_E.T


def resid_mlp_from_weights(W_E, W_in, W_out) -> ResidMLP:
    """A `ResidMLP` holding `W_E (n_f, d_embed)`, `W_in (L, d_embed, d_mlp)`, `W_out (L, d_mlp, d_embed)`."""
    W_E, W_in, W_out = (jnp.asarray(a, jnp.float32) for a in (W_E, W_in, W_out))
    n_layers, d_embed, d_mlp = W_in.shape
    if W_E.shape[1] != d_embed or W_out.shape != (n_layers, d_mlp, d_embed):
        raise ValueError(
            f"ResidMLP: shapes do not fit: W_E {W_E.shape}, W_in {W_in.shape}, W_out {W_out.shape}"
        )
    model = ResidMLP(W_E, d_mlp, n_layers)
    for l, layer in enumerate(model.layers):
        layer.mlp_in.kernel[...] = W_in[l]
        layer.mlp_out.kernel[...] = W_out[l]
    return model


def resid_mlp_forward(W_E, W_in, W_out, x: Float[Array, "*B f"]) -> Float[Array, "*B f"]:
    """The target as a pure function of its weights (stacked layout, see the module docstring)."""
    r = x @ W_E
    for l in range(W_in.shape[0]):
        r = r + jax.nn.relu(r @ W_in[l]) @ W_out[l]
    return r @ W_E.T


def neuron_contributions(W_E, W_in_l, W_out_l) -> np.ndarray:
    """Target neuron contributions `(n_features, d_mlp)` of one layer (toy_models.md):
    `(W_U[i, :] W_out)_n * (W_in W_E[i, :]^T)_n` = `(W_E W_out_kernel^T)[i, n] * (W_E W_in_kernel)[i, n]`."""
    W_E = np.asarray(W_E, np.float64)
    return (W_E @ np.asarray(W_in_l, np.float64)) * (W_E @ np.asarray(W_out_l, np.float64).T)

"""The TMS target: x_hat = ReLU(W^T W x + b), W: (n_hidden, n_features), as a Flax NNX model.

`linear1` is W (kernel `(n_features, n_hidden)` = W^T, no bias); `linear2` is W^T (kernel
`(n_hidden, n_features)` = W, bias b). The two kernels hold the same numbers (tied), which the SPD
config expresses with `tied=(("linear2", "linear1"),)` so both sites share one set of components.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float


class TMS(nnx.Module):
    """`relu(linear2(linear1(x)))` with `linear2.kernel == linear1.kernel.T`."""

    def __init__(self, n_features: int, n_hidden: int, *, rngs: nnx.Rngs | None = None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.n_features, self.n_hidden = n_features, n_hidden
        self.linear1 = nnx.Linear(n_features, n_hidden, use_bias=False, rngs=rngs)
        self.linear2 = nnx.Linear(n_hidden, n_features, use_bias=True, rngs=rngs)
        self.linear2.kernel[...] = self.linear1.kernel[...].T

    def __call__(self, x: Float[Array, "*b n_features"]) -> Float[Array, "*b n_features"]:
        return jax.nn.relu(self.linear2(self.linear1(x)))


def tms_from_weights(W, b) -> TMS:
    """A `TMS` holding the paper-layout weights `W: (n_hidden, n_features)` and `b: (n_features,)`."""
    W = jnp.asarray(W, jnp.float32)
    b = jnp.asarray(b, jnp.float32)
    n_hidden, n_features = W.shape
    if b.shape != (n_features,):
        raise ValueError(f"TMS: bias shape {b.shape} does not match W {W.shape}")
    model = TMS(n_features, n_hidden)
    model.linear1.kernel[...] = W.T
    model.linear2.kernel[...] = W
    model.linear2.bias[...] = b
    return model


def tms_forward(W: Float[Array, "h f"], b: Float[Array, " f"], x: Float[Array, "*B f"]) -> Array:
    """x_hat = ReLU(W^T W x + b) for a batch of row vectors x (pure function)."""
    return jax.nn.relu((x @ W.T) @ W + b)


def represented_features(W, b, value: float = 0.75, tol: float = 0.1) -> np.ndarray:
    """Bool `(n_features,)`: feature i is represented when x_hat(value * e_i)[i] is within `tol` of `value`."""
    W = np.asarray(W, np.float64)
    b = np.asarray(b, np.float64)
    n = W.shape[1]
    x = value * np.eye(n)
    out = np.maximum((x @ W.T) @ W + b, 0.0)
    return np.abs(np.diag(out) - value) <= tol

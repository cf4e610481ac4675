"""Sigmoids that turn raw causal importances z into importances g in [0, 1].

Every function is elementwise: `Float[Array, "*shape"] -> Float[Array, "*shape"]`.

`lower_leaky_hard` is the reference-main variant (the default): the forward pass is
`clip(z, 0, 1)`; the backward pass passes the incoming gradient on (0, 1], blocks it above 1, and
below 0 passes `LEAK * grad` only when that gradient is negative (so it can only push z up).
`lower_leaky_hard_paper` is the SPD paper's variant with a true 0.01 leak in the forward pass.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

LEAK = 0.01


def hard_sigmoid(z: Float[Array, "*s"]) -> Float[Array, "*s"]:
    """sigma_H(z) = clip(z, 0, 1)."""
    return jnp.clip(z, 0.0, 1.0)


@jax.custom_vjp
def lower_leaky_hard(z: Float[Array, "*s"]) -> Float[Array, "*s"]:
    """Reference-main lower-leaky hard sigmoid: clip forward, one-sided leaky gradient below 0."""
    return jnp.clip(z, 0.0, 1.0)


def _lower_leaky_fwd(z):
    return jnp.clip(z, 0.0, 1.0), z


def _lower_leaky_bwd(z, g):
    inside = (z > 0.0) & (z <= 1.0)
    below = (z <= 0.0) & (g < 0.0)
    return (jnp.where(inside, g, jnp.where(below, LEAK * g, jnp.zeros_like(g))),)


lower_leaky_hard.defvjp(_lower_leaky_fwd, _lower_leaky_bwd)


def lower_leaky_hard_paper(z: Float[Array, "*s"]) -> Float[Array, "*s"]:
    """Paper lower-leaky hard sigmoid: 0.01 z below 0, z on [0, 1], 1 above."""
    return jnp.where(z < 0.0, LEAK * z, jnp.minimum(z, 1.0))


def upper_leaky_hard(z: Float[Array, "*s"]) -> Float[Array, "*s"]:
    """Upper-leaky hard sigmoid (minimality loss only): 0 below 0, z on [0, 1], 1 + 0.01 (z - 1) above."""
    return jnp.where(z > 1.0, 1.0 + LEAK * (z - 1.0), jnp.maximum(z, 0.0))


def logistic(z: Float[Array, "*s"]) -> Float[Array, "*s"]:
    """Plain logistic sigmoid 1 / (1 + exp(-z))."""
    return jax.nn.sigmoid(z)


class SigmoidPair(NamedTuple):
    """`lower` makes the masks and the CI-masked losses; `upper` feeds importance minimality."""

    lower: Callable[[Array], Array]
    upper: Callable[[Array], Array]


SIGMOIDS: dict[str, SigmoidPair] = {
    "leaky_hard": SigmoidPair(lower_leaky_hard, upper_leaky_hard),
    "leaky_hard_paper": SigmoidPair(lower_leaky_hard_paper, upper_leaky_hard),
    "hard": SigmoidPair(hard_sigmoid, hard_sigmoid),
    "logistic": SigmoidPair(logistic, logistic),
}


def get_sigmoids(name: str) -> SigmoidPair:
    """The (lower, upper) sigmoid pair registered under `name`."""
    if name not in SIGMOIDS:
        raise ValueError(f"sigmoid: unknown sigmoid {name!r}; allowed: {sorted(SIGMOIDS)}")
    return SIGMOIDS[name]

"""Site outputs kept in factored form through a target's linear residual stream.

A masked site's output is `((a V) * m) U + m_delta * (a W) + b`: a sum of products of `(*lead, r)` and
`(r, d_out)` matrices with r = C (and d_in for the delta term). Where r < d_out and the target only adds
the output to its residual stream and later reads that stream through matrices (the next sites, an
unembedding), `LowRankSum` carries the factors instead of the `(*lead, d_out)` array: a read
`stream @ W` costs `r d_out k` once plus `N r k` per row instead of `N d_out k`, and the sum is never
built. An unmasked site that widens (d_in < d_out, e.g. a clean `mlp_out` in a layerwise pass) is
carried the same way, as `a W`. On ResidMLP (`loss.low_rank_outputs`) this removes every
`(batch, d_embed)`-sized product of the masked passes (see docs/results.md).

`LowRankSum` supports `+` with arrays and other `LowRankSum`s, `@` with a matrix (giving an array),
`.shape`, `.dtype`, `.ndim` and `dense()`. Anything else (a nonlinearity, a norm, indexing) raises a
TypeError inside JAX: a target that does more with a site's output cannot use `low_rank_outputs`.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jaxtyping import Array, Float


@dataclasses.dataclass(frozen=True)
class LowRankSum:
    """`base + sum_i left_i @ right_i`, a `(*lead, d)` array that is never built.

    base: an array broadcastable to `(*lead, d)`, or None; terms: `(left (*lead, r_i), right (r_i, d))`.
    """

    base: Array | None
    terms: tuple[tuple[Array, Array], ...]

    @property
    def shape(self) -> tuple[int, ...]:
        left, right = self.terms[0]
        shape = (*left.shape[:-1], right.shape[-1])
        return tuple(jnp.broadcast_shapes(shape, jnp.shape(self.base))) if self.base is not None else shape

    @property
    def dtype(self):
        return jnp.result_type(*(x for t in self.terms for x in t), *(() if self.base is None else (self.base,)))

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def dense(self) -> Float[Array, "*lead d"]:
        out = None
        for left, right in self.terms:
            out = left @ right if out is None else out + left @ right
        return out if self.base is None else out + self.base

    def __add__(self, other):
        if isinstance(other, LowRankSum):
            base = other.base if self.base is None else self.base if other.base is None else self.base + other.base
            return LowRankSum(base, self.terms + other.terms)
        return LowRankSum(other if self.base is None else self.base + other, self.terms)

    __radd__ = __add__  # floating-point addition commutes

    def __matmul__(self, w: Float[Array, "d k"]) -> Float[Array, "*lead k"]:
        out = None if self.base is None else self.base @ w
        for left, right in self.terms:
            y = left @ (right @ w)
            out = y if out is None else out + y
        return out


def dense(a: Array | LowRankSum) -> Array:
    """`a` as an array."""
    return a.dense() if isinstance(a, LowRankSum) else a


def carries(spec) -> bool:
    """Whether a site's inputs and outputs may be `LowRankSum`s: a linear site with flat in and out."""
    return spec.kind == "linear" and len(spec.in_shape) == 1 and len(spec.out_shape) == 1


def pays(rank: int, d_out: int) -> bool:
    """Whether a site output of this rank is worth carrying in factored form."""
    return rank < d_out

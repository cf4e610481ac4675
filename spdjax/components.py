"""Subcomponents U, V of each site: init, faithfulness, and the masked site map.

Layout: `V: (d_in, C)`, `U: (C, d_out)`, `kernel ~ V @ U` (kernel = W^T, so W ~ sum_c U_c V_c in the
paper's notation). A site tied to a primary uses the primary's parameters transposed.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from spdjax import lowrank
from spdjax.lowrank import LowRankSum
from spdjax.sites import SiteSpec, apply_kernel, inner_acts, matmul, unflat_output


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Components:
    """Rank-one subcomponents of one site: `kernel ~ V @ U`."""

    V: Float[Array, "d_in C"]
    U: Float[Array, "C d_out"]

    @property
    def C(self) -> int:
        return self.V.shape[-1]

    def transpose(self) -> "Components":
        """Components of the tied (transposed) site: `kernel.T ~ U.T @ V.T`."""
        return Components(V=self.U.T, U=self.V.T)


def init_components(key: Array, d_in: int, d_out: int, C: int, dtype=jnp.float32) -> Components:
    """Reference init: V ~ N(0, 1/d_in), U ~ N(0, 1/C)."""
    kv, ku = jax.random.split(key)
    V = jax.random.normal(kv, (d_in, C), dtype) / jnp.sqrt(jnp.asarray(d_in, dtype))
    U = jax.random.normal(ku, (C, d_out), dtype) / jnp.sqrt(jnp.asarray(C, dtype))
    return Components(V=V, U=U)


def site_components(components: dict[str, Components], spec: SiteSpec) -> Components:
    """The components a site computes with (transposed for tied sites)."""
    comp = components[spec.param_name]
    return comp.transpose() if spec.tied_to is not None else comp


def materialised_kernel(
    comp: Components,
    mask: Float[Array, "*lead C"],
    delta_mask: Float[Array, "*lead"] | None = None,
    kernel: Float[Array, "d_in d_out"] | None = None,
) -> Float[Array, "*lead d_in d_out"]:
    """Per-example kernel W'(x, r)^T = V diag(m) U + m_delta (kernel - V U).

    Builds one (d_in, d_out) matrix per example: for small models, tests and inspection only.
    """
    out = jnp.einsum("ic,...c,co->...io", comp.V, mask, comp.U)
    if delta_mask is not None:
        if kernel is None:
            raise ValueError("materialised_kernel: a delta mask needs the target kernel")
        out = out + delta_mask[..., None, None] * (kernel - comp.V @ comp.U)
    return out


def masked_site_output(
    spec: SiteSpec,
    a: Array,
    comp: Components,
    mask: Float[Array, "*lead C"],
    delta_mask: Float[Array, "*lead"] | None,
    kernel: Float[Array, "d_in d_out"] | None,
    bias: Array | None,
    h: Float[Array, "*lead C"] | None = None,
    low_rank: bool = False,
) -> Array | LowRankSum:
    """Masked site output in factored form, never building per-example weights.

        y' = ((a V) * (m - m_delta)) U + m_delta * (a W^T) + b

    which equals a W'(x, r)^T + b with the delta term computed from the target's own site map.
    `delta_mask=None` drops the delta term: y' = ((a V) * m) U + b. `h`: the inner activations a V
    when the caller already has them (they must be a V for this `a`). `low_rank`: for a linear site
    whose output has rank (C, plus d_in with the delta term) below d_out, return it as a
    `spdjax.lowrank.LowRankSum` of those factors. `a` may itself be a `LowRankSum` (linear sites).
    """
    flat = lowrank.carries(spec)
    if isinstance(a, LowRankSum) and not flat:
        a = a.dense()
    if h is None:
        h = a @ comp.V if isinstance(a, LowRankSum) else inner_acts(spec, a, comp.V)
    rank = comp.C + (spec.d_in if delta_mask is not None else 0)
    if low_rank and flat and lowrank.pays(rank, spec.d_out):
        if delta_mask is None:
            return LowRankSum(bias, ((h * mask, comp.U),))
        dm = delta_mask[..., None]
        terms, base = ((h * (mask - dm), comp.U),), bias
        if isinstance(a, LowRankSum):  # its m_delta (a W) as an array
            base = (a @ kernel) * dm if base is None else (a @ kernel) * dm + base
        else:
            terms += ((a * dm, kernel),)
        return LowRankSum(base, terms)
    if delta_mask is None:
        y = unflat_output(spec, matmul(h * mask, comp.U))
    else:
        y = unflat_output(spec, matmul(h * (mask - delta_mask[..., None]), comp.U))
        dm = delta_mask.reshape(delta_mask.shape + (1,) * len(spec.out_shape))
        y = y + dm * (a @ kernel if isinstance(a, LowRankSum) else apply_kernel(spec, a, kernel))
    return y if bias is None else y + bias


def faithfulness_loss(
    components: dict[str, Components], kernels: dict[str, Array], sites: tuple[SiteSpec, ...]
) -> Float[Array, ""]:
    """sum_l ||W_l - U_l V_l||_F^2 / sum_l numel(W_l), over primary sites (each parameter once)."""
    num, den = 0.0, 0
    for s in sites:
        if s.tied_to is not None:
            continue
        c = components[s.name]
        num = num + jnp.sum((kernels[s.name] - c.V @ c.U) ** 2)
        den += kernels[s.name].size
    return num / float(den)  # a Python int above 2**31 would overflow as a weakly typed int32 argument

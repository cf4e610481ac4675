"""APD parameter components: C components, each spanning every primary site of the target.

Component c at site l is the rank-<=m matrix `P_{c,l} = A_{c,l} B_{c,l}` in the library's kernel
layout (`kernel: (d_in, d_out)`, `y = x @ kernel + b`), stored stacked over components:
`A: (C, d_in, m)`, `B: (C, m, d_out)`. The "full" APD model uses `sum_c P_c` at every site; a masked
model uses `sum_c mask_c (x A_c) B_c`, computed in factored form (never per-example weights). A site
tied to a primary (TMS `linear2 = linear1^T`) uses the primary's components transposed:
`P_c^T = B_c^T A_c^T`. Biases and every non-site array of the target stay the target's (frozen).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from spdjax.sites import SiteSpec, flat_input, unflat_output
from spdjax.targets.base import Target


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class APDComponents:
    """The C components of one site: `P_c = A[c] @ B[c]`."""

    A: Float[Array, "C d_in m"]
    B: Float[Array, "C m d_out"]

    @property
    def C(self) -> int:
        return self.A.shape[0]

    @property
    def m(self) -> int:
        return self.A.shape[-1]

    def transpose(self) -> "APDComponents":
        """Components of the tied (transposed) site: `P_c^T = B_c^T A_c^T`."""
        return APDComponents(A=jnp.swapaxes(self.B, 1, 2), B=jnp.swapaxes(self.A, 1, 2))

    def kernels(self) -> Float[Array, "C d_in d_out"]:
        """Every component as a dense kernel `(C, d_in, d_out)` (analysis and tests)."""
        return jnp.einsum("cim,cmo->cio", self.A, self.B)

    def total(self) -> Float[Array, "d_in d_out"]:
        """`sum_c P_c`: the full APD model's kernel."""
        return jnp.einsum("cim,cmo->io", self.A, self.B)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class APDParams:
    """`components`: one `APDComponents` per primary site (all with the same C)."""

    components: dict[str, APDComponents]

    @property
    def C(self) -> int:
        return next(iter(self.components.values())).C


def site_m(spec: SiteSpec, m: int | None) -> int:
    """The rank of a site's components: `m`, or `min(d_in, d_out)` when `m` is None."""
    return int(m) if m is not None else min(spec.d_in, spec.d_out)


INIT_TYPES = ("kaiming_uniform", "xavier_normal")


def init_apd(
    key: Array,
    target: Target,
    C: int,
    m: int | None = None,
    init_scale: float = 1.0,
    dtype=jnp.float32,
    init_type: str = "kaiming_uniform",
) -> APDParams:
    """Fresh components for every primary site of `target`, times `init_scale`.

    The reference's torch initialisers on its stacked tensors (fan sizes as `torch.nn.init` computes
    them: dim 1 x trailing dims is fan-in, dim 0 x trailing dims fan-out):
    - `kaiming_uniform` (ResidMLP; tensors `(C, d_in, m)`, `(C, m, d_out)`):
      `A ~ U(+-sqrt(6 / (d_in m)))`, `B ~ U(+-sqrt(6 / (m d_out)))`;
    - `xavier_normal` (TMS; tensors `(n_instances=1, C, d_in, m)`, `(1, C, m, d_out)`):
      `A ~ N(0, 2 / (d_in m (C + 1)))`, `B ~ N(0, 2 / (m d_out (C + 1)))`, so every component starts
      near zero (a component the top-k never selects keeps little of its initial weight).
    """
    if isinstance(C, bool) or not isinstance(C, int) or C < 1:
        raise ValueError(f"apd.C must be an int >= 1, got {C!r}")
    if init_type not in INIT_TYPES:
        raise ValueError(f"apd.init_type: unknown {init_type!r}; allowed: {list(INIT_TYPES)}")
    comps = {}
    for i, s in enumerate(target.sites):
        if s.tied_to is not None:
            continue
        mm = site_m(s, m)
        ka, kb = jax.random.split(jax.random.fold_in(key, i))
        if init_type == "kaiming_uniform":
            ba = init_scale * math.sqrt(6.0 / (s.d_in * mm))
            bb = init_scale * math.sqrt(6.0 / (mm * s.d_out))
            A = jax.random.uniform(ka, (C, s.d_in, mm), dtype, -ba, ba)
            B = jax.random.uniform(kb, (C, mm, s.d_out), dtype, -bb, bb)
        else:
            sa = init_scale * math.sqrt(2.0 / (s.d_in * mm * (C + 1)))
            sb = init_scale * math.sqrt(2.0 / (mm * s.d_out * (C + 1)))
            A = sa * jax.random.normal(ka, (C, s.d_in, mm), dtype)
            B = sb * jax.random.normal(kb, (C, mm, s.d_out), dtype)
        comps[s.name] = APDComponents(A=A, B=B)
    return APDParams(comps)


def site_components(params: APDParams, spec: SiteSpec) -> APDComponents:
    """The components a site computes with (transposed for tied sites)."""
    comp = params.components[spec.param_name]
    return comp.transpose() if spec.tied_to is not None else comp


def inner_acts(spec: SiteSpec, a: Array, comp: APDComponents) -> Float[Array, "*lead C m"]:
    """`h_c = a A_c` for every component (embed sites: the rows `A_c[a]`)."""
    if spec.kind == "embed":
        return jnp.moveaxis(jnp.take(comp.A, a, axis=1), 0, -2)
    return jnp.einsum("...i,cim->...cm", flat_input(spec, a), comp.A)


def component_acts(spec: SiteSpec, a: Array, comp: APDComponents) -> Float[Array, "*lead C d_out"]:
    """`a P_c = (a A_c) B_c` for every component, flat output `(*lead, C, d_out)`."""
    return jnp.einsum("...cm,cmo->...co", inner_acts(spec, a, comp), comp.B)


def masked_site_output(
    spec: SiteSpec,
    a: Array,
    comp: APDComponents,
    mask: Float[Array, "*lead C"] | None,
    bias: Array | None,
) -> Array:
    """`sum_c mask_c (a A_c) B_c + b` in factored form (`mask=None`: all components, the full model)."""
    h = inner_acts(spec, a, comp)
    if mask is None:
        y = jnp.einsum("...cm,cmo->...o", h, comp.B)
    else:
        y = jnp.einsum("...cm,cmo->...o", h * mask.astype(h.dtype)[..., None], comp.B)
    y = unflat_output(spec, y)
    return y if bias is None else y + bias


def n_target_params(target: Target) -> int:
    """N: the number of decomposed target weights (each primary site's kernel once)."""
    return sum(s.d_in * s.d_out for s in target.primary_sites)


def faithfulness_loss(params: APDParams, kernels: dict[str, Array], target: Target) -> Float[Array, ""]:
    """Parameter match: `sum_l ||W*_l - sum_c P_{c,l}||_F^2 / N` over the primary sites."""
    num = 0.0
    for s in target.primary_sites:
        num = num + jnp.sum((kernels[s.name] - params.components[s.name].total()) ** 2)
    return num / n_target_params(target)


def count_params(params: APDParams) -> int:
    return int(sum(x.size for x in jax.tree.leaves(params)))

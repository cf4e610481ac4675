"""The trainable state of a decomposition: components of every primary site and a CI function per site."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jaxtyping import Array

from spdjax.ci import CIParams, init_ci
from spdjax.components import Components, init_components
from spdjax.targets.base import Target


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SPDParams:
    """`components`: per primary site; `ci`: per site (tied and identity sites included)."""

    components: dict[str, Components]
    ci: dict[str, CIParams]


def init_decomposition(
    key: Array,
    target: Target,
    ci_type: str = "mlp",
    ci_hidden: tuple[int, ...] = (16,),
    dtype=jnp.float32,
) -> SPDParams:
    """Fresh components (reference init) and CI functions for every site of `target`."""
    components, ci = {}, {}
    for i, s in enumerate(target.sites):
        kc, kg = jax.random.split(jax.random.fold_in(key, i))
        if s.tied_to is None:
            components[s.name] = init_components(kc, s.d_in, s.d_out, s.C, dtype)
        ci[s.name] = init_ci(kg, ci_type, s.d_in, s.C, tuple(ci_hidden), dtype)
    return SPDParams(components, ci)

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


def check_params(params: SPDParams, target: Target) -> None:
    """One-line ValueError unless `params` were made for `target`'s sites (static shapes only, so free
    under `jit`): components for exactly the primary sites with `V: (d_in, C)`, `U: (C, d_out)`, and a
    CI function for exactly every site with the site's input width and C."""
    if not isinstance(params, SPDParams):
        raise TypeError(f"params must be SPDParams (spdjax.init_decomposition), got {type(params).__name__}")
    problems = []
    for what, have, want in (
        ("components", params.components, [s.name for s in target.primary_sites]),
        ("ci", params.ci, list(target.site_names)),
    ):
        missing = [n for n in want if n not in have]
        extra = [n for n in have if n not in want]
        if missing:
            problems.append(f"no {what} for site(s) {missing}")
        if extra:
            problems.append(f"{what} for site(s) {extra} that the target does not have")
    for s in target.sites:
        c = params.components.get(s.name) if s.tied_to is None else None
        if c is not None:
            V, U = tuple(c.V.shape), tuple(c.U.shape)
            if V != (s.d_in, s.C) or U != (s.C, s.d_out):
                problems.append(
                    f"{s.name!r}: V {V} and U {U}, the site needs V (d_in, C) = {(s.d_in, s.C)} and "
                    f"U (C, d_out) = {(s.C, s.d_out)}"
                )
        g = params.ci.get(s.name)
        if g is not None and g.weights:
            problems += _ci_problems(s, g)
    if problems:
        raise ValueError("params do not fit the target (made for another target?): " + "; ".join(problems))


def _ci_problems(s, g: CIParams) -> list[str]:
    """Shape mismatches of site `s`'s CI function `g` (layout in `spdjax.ci.CIParams`)."""
    w0, wl = tuple(g.weights[0].shape), tuple(g.weights[-1].shape)
    if g.kind == "shared_mlp":
        width, C = (w0[0] if len(w0) == 2 else None), (wl[-1] if len(wl) == 2 else None)
        want_width = s.d_in
    else:
        width, C = (w0[1] if len(w0) == 3 else None), (w0[0] if len(w0) == 3 else None)
        want_width = 1 if g.kind == "mlp" else s.d_in
    out = []
    if width != want_width:
        out.append(f"ci {s.name!r} ({g.kind}): input width {width}, the site needs {want_width}")
    if C != s.C:
        out.append(f"ci {s.name!r} ({g.kind}): C = {C}, the site has C = {s.C}")
    return out

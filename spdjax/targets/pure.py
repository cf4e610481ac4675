"""Adapter for targets written as pure functions `apply_fn(params, batch)`.

Inside `apply_fn`, each decomposable matmul is written `spdjax.targets.linear(name, x, kernel, bias)`
where `name` is the kernel's path in `params` (e.g. `"layers.0.w_in"`, kernel `(d_in, d_out)`).
Sites are chosen by glob patterns over those paths, exactly as for NNX models.
"""

from __future__ import annotations

import contextvars
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
from jaxtyping import Array

from spdjax.sites import SitePattern, SiteSpec, as_patterns, match_patterns
from spdjax.targets.base import Target, call_site, check_tied, order_sites

# name -> (site spec or None, identity spec or None) for the pure target being traced.
_SPECS: contextvars.ContextVar[dict | None] = contextvars.ContextVar("spdjax_pure_specs", default=None)


def linear(name: str, x: Array, kernel: Array, bias: Array | None = None) -> Array:
    """`x @ kernel + bias`, routed through the site machinery when `name` is a chosen site."""
    specs = (_SPECS.get() or {}).get(name)

    def plain(a):
        y = a @ kernel
        return y if bias is None else y + bias

    if specs is None:
        return plain(x)
    spec, id_spec = specs
    if id_spec is not None:
        x = call_site(id_spec, x, None, None, lambda a: a)
    if spec is None:
        return plain(x)
    return call_site(spec, x, kernel, bias, plain)


def _leaf_paths(params) -> dict[str, Array]:
    flat, _ = jax.tree_util.tree_flatten_with_path(params)
    out = {}
    for path, leaf in flat:
        keys = []
        for k in path:
            keys.append(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))))
        out[".".join(keys)] = leaf
    return out


def from_apply(
    apply_fn: Callable[[Any, Any], Array],
    params: Any,
    sites: Sequence[SitePattern] | Mapping[str, int],
    *,
    tied: Mapping[str, str] | None = None,
    identity: Sequence[SitePattern] | Mapping[str, int] = (),
) -> Target:
    """Wrap a pure apply function as a `Target`; see the module docstring for the contract."""
    patterns = as_patterns(sites)
    id_patterns = as_patterns(identity, "identity") if identity else ()
    tied = dict(tied or {})
    leaves = _leaf_paths(params)
    kernels = {p: v for p, v in leaves.items() if jnp.ndim(v) == 2}
    matched = match_patterns(patterns, list(kernels))
    id_matched = match_patterns(id_patterns, list(kernels)) if id_patterns else {}
    hooked = [p for p in kernels if p in matched or p in id_matched]
    found = {
        p: SiteSpec(p, "linear", (kernels[p].shape[0],), (kernels[p].shape[1],),
                    matched[p].C if p in matched else 1, kernels[p].shape[0])
        for p in hooked
    }
    specs = order_sites(found, list(matched), tied, {p: pat.C for p, pat in id_matched.items()})
    by_name = {s.name: s for s in specs}
    table = {p: (by_name.get(p), by_name.get(p + ".pre_identity")) for p in hooked}

    def wrapped(params, batch):
        token = _SPECS.set(table)
        try:
            return apply_fn(params, batch)
        finally:
            _SPECS.reset(token)

    def kernels_fn(params):
        leaves = _leaf_paths(params)
        return {p: (leaves[p], None) for p in hooked}  # sites and identity hosts

    target = Target(params, specs, wrapped, kernels_fn)
    if tied:
        check_tied(by_name, target.kernels(), tied)
    return target

"""Adapter: decompose the Linear / LinearGeneral / Einsum / Embed layers of a Flax NNX model, chosen
by path glob (so also the query / key / value / out maps of `nnx.MultiHeadAttention`).

The user's model is not edited: `from_nnx` copies it, swaps each chosen layer for a thin `SiteHook`
that forwards to the original layer through `call_site`, and splits the copy into a graph
definition (static) and a state (the target's params, passed through `jit` as data).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

from flax import nnx
from jaxtyping import Array

from spdjax.sites import SitePattern, SiteSpec, as_patterns, match_patterns
from spdjax.targets.base import Target, call_site, check_tied, order_sites

SUPPORTED = (nnx.Linear, nnx.LinearGeneral, nnx.Einsum, nnx.Embed)


def _path_str(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def _parse_einsum(path: str, layer: nnx.Einsum) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(in_shape, out_shape) of an einsum `...IN,IN OUT->...OUT`; error for any other form."""
    eq = layer.einsum_str.replace(" ", "")
    try:
        lhs, out = eq.split("->")
        x, k = lhs.split(",")
    except ValueError:
        raise ValueError(f"site {path!r}: cannot parse einsum {layer.einsum_str!r}") from None
    x, out = x.replace("...", ""), out.replace("...", "")
    contracted = "".join(c for c in k if c in x and c not in out)
    new = "".join(c for c in k if c in out and c not in x)
    ok = (
        k == contracted + new
        and x.endswith(contracted)
        and out.endswith(new)
        and x[: len(x) - len(contracted)] == out[: len(out) - len(new)]
    )
    if not ok:
        raise ValueError(
            f"site {path!r}: einsum {layer.einsum_str!r} is not supported; the kernel's axes must be "
            "the input's trailing contracted axes followed by the output's trailing new axes "
            "(e.g. '...d,dnh->...nh')"
        )
    shape = tuple(layer.kernel_shape)
    return shape[: len(contracted)], shape[len(contracted) :]


def _linear_general_shapes(path: str, layer: nnx.LinearGeneral) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(in_shape, out_shape) of a LinearGeneral that contracts the input's trailing axes; error otherwise."""
    in_shape, out_shape = tuple(layer.in_features), tuple(layer.out_features)
    axis = tuple(layer.axis)
    if dict(layer.batch_axis) or axis != tuple(range(-len(in_shape), 0)):
        raise ValueError(
            f"site {path!r}: LinearGeneral with axis={layer.axis} and batch_axis={dict(layer.batch_axis)} is not "
            f"supported; the contracted axes must be the input's trailing ones given as negative indices "
            f"(axis={tuple(range(-len(in_shape), 0))}) and batch_axis empty"
        )
    return in_shape, out_shape


def _layer_kernel(layer) -> tuple[Array, Array | None]:
    """`(kernel (d_in, d_out), bias or None)` of a supported layer."""
    if isinstance(layer, nnx.Embed):
        return layer.embedding[...], None
    bias = layer.bias[...] if getattr(layer, "bias", None) is not None else None
    return layer.kernel[...], bias


def _spec(path: str, layer, pattern: SitePattern | None) -> SiteSpec:
    C = pattern.C if pattern is not None else 1
    if isinstance(layer, nnx.Linear):
        return SiteSpec(path, "linear", (layer.in_features,), (layer.out_features,), C, layer.in_features)
    if isinstance(layer, nnx.Embed):
        return SiteSpec(path, "embed", (), (layer.features,), C, layer.num_embeddings)
    if isinstance(layer, nnx.LinearGeneral):
        in_shape, out_shape = _linear_general_shapes(path, layer)
        return SiteSpec(path, "linear_general", in_shape, out_shape, C, math.prod(in_shape))
    if isinstance(layer, nnx.Einsum):
        in_shape, out_shape = _parse_einsum(path, layer)
        return SiteSpec(
            path, "einsum", in_shape, out_shape, C, math.prod(in_shape), einsum_str=layer.einsum_str
        )
    raise AssertionError(type(layer))


class SiteHook(nnx.Module):
    """Stands in for a chosen layer; routes its call (and an optional identity before it) via `call_site`."""

    def __init__(self, layer: nnx.Module, spec: SiteSpec | None, identity: SiteSpec | None):
        self.layer = layer
        self.spec = spec
        self.identity = identity

    def __call__(self, a, *args, **kwargs):
        # keyword arguments left at None (e.g. MultiHeadAttention's `out_sharding=None`) change nothing
        if args or any(v is not None for v in kwargs.values()):
            name = (self.spec or self.identity).name
            raise TypeError(
                f"site {name!r}: decomposed layers take exactly one input array (got extra arguments "
                f"{[type(x).__name__ for x in args] + [k for k, v in kwargs.items() if v is not None]})"
            )
        if self.identity is not None:
            a = call_site(self.identity, a, None, None, lambda x: x)
        if self.spec is None:
            return self.layer(a)
        kernel, bias = _layer_kernel(self.layer)
        if self.spec.kind in ("einsum", "linear_general"):
            kernel = kernel.reshape(self.spec.d_in, self.spec.d_out)
        return call_site(self.spec, a, kernel, bias, self.layer)

    def attend(self, query):
        """nnx.Embed.attend (tied unembedding) of the wrapped layer; this use is not decomposed."""
        if not isinstance(self.layer, nnx.Embed):
            raise AttributeError(f"site {self.spec.name!r}: only Embed sites have attend()")
        return self.layer.attend(query)


def _get(parent, key):
    return parent[key] if isinstance(key, int) else getattr(parent, key)


def _set(parent, key, value):
    if isinstance(key, int):
        parent[key] = value
    else:
        setattr(parent, key, value)


def from_nnx(
    model: nnx.Module,
    sites: Sequence[SitePattern] | Sequence[tuple[str, int]] | Mapping[str, int],
    *,
    tied: Mapping[str, str] | None = None,
    identity: Sequence[SitePattern] | Sequence[tuple[str, int]] | Mapping[str, int] = (),
    call: Callable[[nnx.Module, Any], Array] | None = None,
) -> Target:
    """Wrap an NNX model as a `Target` whose layers matching `sites` are decomposed.

    Args:
      model: the trained target (left untouched). Must be deterministic (eval mode).
      sites: glob patterns over module paths (`"layers.*.mlp_in"`) with the C of each.
      tied: `{site: primary}`; `site` reuses `primary`'s components transposed (its kernel must be the
        transpose of the primary's).
      identity: patterns of layers before which a d_in x d_in identity is inserted and decomposed as a
        site named `<path>.pre_identity`, with its C.
      call: `(model, batch) -> output`; default `model(batch)`.
    """
    patterns = as_patterns(sites)
    id_patterns = as_patterns(identity, "identity") if identity else ()
    tied = dict(tied or {})
    call = call or (lambda m, x: m(x))

    modules = {
        _path_str(p): m for p, m in nnx.iter_graph(model) if p and isinstance(m, nnx.Module)
    }
    matched = match_patterns(patterns, list(modules))
    id_matched = match_patterns(id_patterns, list(modules)) if id_patterns else {}
    for group in (matched, id_matched):
        for path, pat in group.items():
            if not isinstance(modules[path], SUPPORTED):
                raise ValueError(
                    f"site pattern {pat.pattern!r} matches {path!r} of type "
                    f"{type(modules[path]).__name__}, which cannot be decomposed; supported: "
                    f"{[t.__name__ for t in SUPPORTED]}"
                )

    hooked_paths = [p for p in modules if p in matched or p in id_matched]
    found = {p: _spec(p, modules[p], matched.get(p)) for p in hooked_paths}
    specs = order_sites(found, list(matched), tied, {p: pat.C for p, pat in id_matched.items()})
    by_name = {s.name: s for s in specs}

    graphdef, state = nnx.split(model)
    copy = nnx.merge(graphdef, state)
    raw_paths = {_path_str(p): p for p, m in nnx.iter_graph(copy) if p and isinstance(m, nnx.Module)}
    for path in hooked_paths:
        keys = raw_paths[path]
        parent = copy
        for k in keys[:-1]:
            parent = _get(parent, k)
        id_spec = by_name.get(path + ".pre_identity")
        _set(parent, keys[-1], SiteHook(_get(parent, keys[-1]), by_name.get(path), id_spec))
    hooked_graphdef, hooked_state = nnx.split(copy)

    def apply_fn(params, batch):
        return call(nnx.merge(hooked_graphdef, params), batch)

    def kernels_fn(params):
        m = nnx.merge(hooked_graphdef, params)
        out = {}
        for path in hooked_paths:
            node = m
            for k in raw_paths[path]:
                node = _get(node, k)
            spec = found[path]  # a site, or the host of an identity site (Target.kernels: its dtype)
            k, b = _layer_kernel(node.layer)
            out[path] = (k.reshape(spec.d_in, spec.d_out), b)
        return out

    target = Target(hooked_state, specs, apply_fn, kernels_fn)
    if tied:
        check_tied(by_name, target.kernels(), tied)
    return target

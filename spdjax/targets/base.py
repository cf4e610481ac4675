"""The `Target` pytree and the trace-time interception of site calls.

A target is a pure function `apply_fn(params, batch) -> output` in which every site routes its
computation through `call_site`. Outside any interception `call_site` runs the layer itself, so the
target computes exactly what the user's model computes. Losses wrap a forward pass in
`intercept(handler)`; while JAX traces that forward, each site asks the handler what to compute
(record its input, apply masked components, ...). The handler is read at trace time only, so the
mechanism is pure under `jit`, `vmap`, `scan` and `grad`, and the loss code never knows which model
family it is running.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
from jaxtyping import Array

from spdjax.sites import IDENTITY_SUFFIX, SiteSpec, identity_spec

# handler(spec, a, kernel, bias, layer_call) -> site output. kernel: (d_in, d_out) or None for
# identity sites; layer_call(a) is what the target's own layer computes.
SiteHandler = Callable[
    [SiteSpec, Array, Array | None, Array | None, Callable[[Array], Array]], Array
]

_HANDLER: contextvars.ContextVar[SiteHandler | None] = contextvars.ContextVar(
    "spdjax_site_handler", default=None
)


@contextlib.contextmanager
def intercept(handler: SiteHandler) -> Iterator[None]:
    """Route every site call traced inside this block through `handler`."""
    token = _HANDLER.set(handler)
    try:
        yield
    finally:
        _HANDLER.reset(token)


def check_input(spec: SiteSpec, a: Array) -> None:
    """ValueError unless `a: (*lead, *spec.in_shape)` (dense kinds; embed ids have no feature axis)."""
    want = tuple(spec.in_shape)
    shape = tuple(getattr(a, "shape", ()))
    if not want or (len(shape) >= len(want) and shape[len(shape) - len(want):] == want):
        return
    dtype = getattr(a, "dtype", None)
    got = f"{dtype}{list(shape)}" if dtype is not None else str(list(shape))
    raise ValueError(
        f"site {spec.name!r} expects inputs of shape (..., {', '.join(map(str, want))}), got {got}"
    )


def call_site(
    spec: SiteSpec,
    a: Array,
    kernel: Array | None,
    bias: Array | None,
    layer_call: Callable[[Array], Array],
) -> Array:
    """What a site computes now: `layer_call(a)` normally, the active handler's answer inside `intercept`.

    An input whose trailing axes are not the site's `in_shape` raises a one-line ValueError naming the
    site, the shape it expects and the one it got (at trace time, so it costs nothing under `jit`).
    """
    check_input(spec, a)
    handler = _HANDLER.get()
    if handler is None:
        return layer_call(a)
    return handler(spec, a, kernel, bias, layer_call)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Target:
    """A target model with its chosen sites.

    Attributes:
      params: the target's (frozen) arrays, a pytree; passed through `jit` as data.
      sites: every site (model-graph order; an inserted identity just before its host), tied
        sites included.
      apply_fn: `(params, batch) -> output`; sites go through `call_site`.
      kernels_fn: `params -> {site name: (kernel (d_in, d_out), bias or None)}` for every
        non-identity site, and for the layer each identity site is inserted before (its host; only its
        kernel's dtype is used: the identity's kernel has it, float32 where the host is missing).
    """

    params: Any
    sites: tuple[SiteSpec, ...] = dataclasses.field(metadata=dict(static=True))
    apply_fn: Callable[[Any, Any], Array] = dataclasses.field(metadata=dict(static=True))
    kernels_fn: Callable[[Any], dict[str, tuple[Array, Array | None]]] = dataclasses.field(
        metadata=dict(static=True)
    )

    def __call__(self, batch: Any) -> Array:
        return self.apply_fn(self.params, batch)

    @property
    def site_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.sites)

    @property
    def primary_sites(self) -> tuple[SiteSpec, ...]:
        """Sites that own component parameters (not tied to another site)."""
        return tuple(s for s in self.sites if s.tied_to is None)

    def site(self, name: str) -> SiteSpec:
        for s in self.sites:
            if s.name == name:
                return s
        raise KeyError(f"no site named {name!r}; sites: {list(self.site_names)}")

    def kernels(self) -> dict[str, Array]:
        """`{site name: kernel (d_in, d_out)}` for every site (identity sites give the identity, in the
        dtype of the kernel of the layer it is inserted before)."""
        found = self.kernels_fn(self.params)
        out = {}
        for s in self.sites:
            if s.kind == "identity":
                host = found.get(s.name[: -len(IDENTITY_SUFFIX)])
                dtype = host[0].dtype if host is not None else jnp.float32
                out[s.name] = jnp.eye(s.d_in, dtype=dtype)
            else:
                out[s.name] = found[s.name][0]
        return out

    def run(self, batch: Any, handler: SiteHandler | None = None) -> Array:
        """Forward pass with every site call routed through `handler` (None: the plain target)."""
        if handler is None:
            return self(batch)
        with intercept(handler):
            return self(batch)


def check_tied(sites: dict[str, SiteSpec], kernels: dict[str, Array], tied: dict[str, str]) -> None:
    """Tied sites must use transposed kernels of their primary; raises naming the pair otherwise."""
    for name, primary in tied.items():
        for n in (name, primary):
            if n not in sites:
                raise ValueError(f"tied: {n!r} is not a site; sites: {sorted(sites)}")
        if sites[primary].tied_to is not None:
            raise ValueError(f"tied: primary {primary!r} is itself tied to {sites[primary].tied_to!r}")
        if sites[name].kind != "linear" or sites[primary].kind != "linear":
            raise ValueError(f"tied: {name!r} and {primary!r} must both be linear sites")
        k, kp = kernels[name], kernels[primary]
        if k.shape != kp.T.shape or not bool(jnp.allclose(k, kp.T, atol=1e-6)):
            raise ValueError(
                f"tied: the kernel of {name!r} {tuple(k.shape)} is not the transpose of the kernel of "
                f"{primary!r} {tuple(kp.shape)}"
            )


def order_sites(
    found: dict[str, SiteSpec],
    site_paths: list[str],
    tied: dict[str, str],
    identity: dict[str, int],
) -> tuple[SiteSpec, ...]:
    """Site specs in `found`'s order, tying applied, identity sites just before their host.

    `found` holds a spec for every hooked layer (sites and identity hosts); `site_paths` the sites.
    """
    for name in tied:
        if name not in site_paths:
            raise ValueError(f"tied: {name!r} is not a site; sites: {sorted(site_paths)}")
    out = []
    for path in found:
        if path in identity:
            out.append(identity_spec(found[path], identity[path]))
        if path not in site_paths:
            continue
        if path in tied:
            p = found[tied[path]]
            if found[path].C != p.C:
                raise ValueError(
                    f"tied: {path!r} has C={found[path].C} but its primary {tied[path]!r} has C={p.C}"
                )
            out.append(dataclasses.replace(found[path], tied_to=tied[path]))
        else:
            out.append(found[path])
    return tuple(out)

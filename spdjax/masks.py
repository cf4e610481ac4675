"""Stochastic masks m = g + (1 - g) r and the delta-component masks.

Masks for different sites, samples and positions are independent. Everything is keyed explicitly, so
callers (and tests) can also build masks themselves and pass them to the loss terms.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

MASK_KINDS = ("continuous", "binomial")


class SiteMask(NamedTuple):
    """Mask of one site. `mask: (*S, *lead, C)`; `delta: (*S, *lead)` or None (no delta term)."""

    mask: Array
    delta: Array | None


def sample_r(key: Array, shape: tuple[int, ...], kind: str, dtype=jnp.float32) -> Array:
    """r ~ U(0, 1) (`continuous`) or Bernoulli(1/2) (`binomial`)."""
    if kind == "continuous":
        return jax.random.uniform(key, shape, dtype)
    if kind == "binomial":
        return jax.random.bernoulli(key, 0.5, shape).astype(dtype)
    raise ValueError(f"mask_type: unknown mask type {kind!r}; allowed: {list(MASK_KINDS)}")


def stochastic_mask(g: Float[Array, "*lead C"], r: Float[Array, "*S *lead C"]) -> Array:
    """m = g + (1 - g) r."""
    return g + (1.0 - g) * r


def sample_masks(
    key: Array,
    ci: dict[str, Float[Array, "*lead C"]],
    n_samples: int,
    kind: str = "continuous",
    use_delta: bool = True,
) -> dict[str, SiteMask]:
    """S independent stochastic masks per site: `mask: (S, *lead, C)`, `delta ~ U(0,1): (S, *lead)`."""
    out = {}
    for i, (name, g) in enumerate(ci.items()):
        kr, kd = jax.random.split(jax.random.fold_in(key, i))
        r = sample_r(kr, (n_samples, *g.shape), kind, g.dtype)
        delta = jax.random.uniform(kd, (n_samples, *g.shape[:-1]), g.dtype) if use_delta else None
        out[name] = SiteMask(stochastic_mask(g, r), delta)
    return out


def deterministic_masks(ci: dict[str, Array]) -> dict[str, SiteMask]:
    """m = g, no delta (CI-masked losses)."""
    return {name: SiteMask(g, None) for name, g in ci.items()}


def ones_masks(ci: dict[str, Array], use_delta: bool = False) -> dict[str, SiteMask]:
    """All-ones masks (unmasked recon; with `use_delta` the masked model is exactly the target)."""
    return {
        name: SiteMask(jnp.ones_like(g), jnp.ones(g.shape[:-1], g.dtype) if use_delta else None)
        for name, g in ci.items()
    }


def take_sample(masks: dict[str, SiteMask], s) -> dict[str, SiteMask]:
    """Sample s of S-stacked masks."""
    return {
        n: SiteMask(m.mask[s], None if m.delta is None else m.delta[s]) for n, m in masks.items()
    }


# ----------------------------------------------------------------------------- subset routing

ROUTINGS = ("uniform_k", "static_p")


def sample_routes(
    key: Array, lead: tuple[int, ...], names: tuple[str, ...], kind: str = "uniform_k", p: float = 0.5
) -> dict[str, Array]:
    """Which sites are masked, per position: `{site: bool (*lead)}`.

    `uniform_k`: k ~ U{1..L} per position, then a uniform k-subset of the L sites (at least one site is
    always routed). `static_p`: each site independently with probability `p` (possibly none).
    """
    L = len(names)
    if kind == "uniform_k":
        ku, kk = jax.random.split(key)
        ranks = jnp.argsort(jnp.argsort(jax.random.uniform(ku, (*lead, L)), axis=-1), axis=-1)
        # k - 1 = the rank of one of L i.i.d. uniforms among them, uniform on {0..L-1}. Drawn through a
        # sort (as randint it would be a chain of integer ops that XLA:CPU re-runs for every masked
        # element of every site: resid_mlp2 spent ~1.2 ms per (2048, 400) mask fusion on it).
        k = 1 + jnp.argsort(jnp.argsort(jax.random.uniform(kk, (*lead, L)), axis=-1), axis=-1)[..., :1]
        routed = ranks < k
    elif kind == "static_p":
        routed = jax.random.bernoulli(key, p, (*lead, L))
    else:
        raise ValueError(f"subset_routing: unknown routing {kind!r}; allowed: {list(ROUTINGS)}")
    return {n: routed[..., i] for i, n in enumerate(names)}


def route_masks(masks: dict[str, SiteMask], routes: dict[str, Array]) -> dict[str, SiteMask]:
    """Masks that compute the target's own map at positions where a site is not routed.

    Folded into the masks, so a routed forward costs no more than a fully masked one: with
    `mask = 1, delta = 1` a site computes `((a V) * 0) U + a W^T + b`, the clean output. A site
    without a delta term gets `delta = 0` where it is routed (its masked output is unchanged).
    """
    out = {}
    for n, m in masks.items():
        r = routes[n]
        delta = jnp.zeros(r.shape, m.mask.dtype) if m.delta is None else m.delta
        out[n] = SiteMask(
            jnp.where(r[..., None], m.mask, 1.0), jnp.where(r, delta, 1.0).astype(m.mask.dtype)
        )
    return out


# ----------------------------------------------------------------------------- PGD masks

PGD_INITS = ("random", "ones", "zeros")
PGD_SCOPES = ("per_example", "shared_across_batch")


def pgd_sources_init(
    key: Array, ci: dict[str, Array], init: str, scope: str, use_delta: bool
) -> dict[str, tuple[Array, Array | None]]:
    """Adversarial sources `a` per site: `(a_mask, a_delta)` of shape `((*lead, C), (*lead))` per
    example, or `((C,), ())` shared across the batch (and positions)."""
    if init not in PGD_INITS:
        raise ValueError(f"pgd_init: unknown {init!r}; allowed: {list(PGD_INITS)}")
    if scope not in PGD_SCOPES:
        raise ValueError(f"pgd_mask_scope: unknown {scope!r}; allowed: {list(PGD_SCOPES)}")
    out = {}
    for i, (name, g) in enumerate(ci.items()):
        shape = g.shape if scope == "per_example" else g.shape[-1:]
        shape_d = shape[:-1]
        km, kd = jax.random.split(jax.random.fold_in(key, i))
        if init == "random":
            a, ad = jax.random.uniform(km, shape, g.dtype), jax.random.uniform(kd, shape_d, g.dtype)
        else:
            fill = jnp.ones if init == "ones" else jnp.zeros
            a, ad = fill(shape, g.dtype), fill(shape_d, g.dtype)
        out[name] = (a, ad if use_delta else None)
    return out


def masks_from_sources(ci: dict[str, Array], sources) -> dict[str, SiteMask]:
    """m = g + (1 - g) a at full `(*lead, C)` shape; the delta mask is `a_delta` itself (its g is 0)."""
    out = {}
    for name, g in ci.items():
        a, ad = sources[name]
        delta = None if ad is None else jnp.broadcast_to(ad, g.shape[:-1])
        out[name] = SiteMask(stochastic_mask(g, a), delta)
    return out


def pgd_sources(
    loss_of_masks, ci: dict[str, Array], key: Array, n_steps: int, step_size: float,
    init: str = "random", scope: str = "per_example", use_delta: bool = True,
):
    """`n_steps` of projected sign-gradient ascent `a <- clip(a + step_size sign(dL/da), 0, 1)`.

    `loss_of_masks(masks) -> scalar` is the divergence to maximise. `ci` is held fixed (its gradient
    stopped) during the search and the returned sources carry no gradient. With shared sources the
    gradient sums over the whole (global) batch, so every device of a data-parallel mesh takes the
    same step.
    """
    ci = jax.lax.stop_gradient(ci)
    src = pgd_sources_init(key, ci, init, scope, use_delta)

    def ascend(_, src):
        grads = jax.grad(lambda s: loss_of_masks(masks_from_sources(ci, s)))(src)
        return jax.tree.map(lambda a, g: jnp.clip(a + step_size * jnp.sign(g), 0.0, 1.0), src, grads)

    src = jax.lax.fori_loop(0, n_steps, ascend, src)
    return jax.lax.stop_gradient(src)

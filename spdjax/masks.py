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

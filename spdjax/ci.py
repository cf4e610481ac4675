"""Causal-importance (CI) functions: raw importances z per site, subcomponent and position.

Kinds (hidden widths are a tuple; GELU is the exact erf form):
- `mlp` (the paper's): one MLP per subcomponent on its scalar inner activation h_c = (a V)_c,
  1 -> hidden... -> 1. Gradients reach V through h.
- `vector_mlp`: one MLP per subcomponent on the full site input, d_in -> hidden... -> 1.
- `shared_mlp`: one MLP per site on the site input, d_in -> hidden... -> C.
Init (reference): hidden weights N(0, 2/fan_in), output weights N(0, 1/fan_in), zero biases.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from spdjax.components import Components
from spdjax.sites import SiteSpec, dense_features, inner_acts

CI_KINDS = ("mlp", "vector_mlp", "shared_mlp")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class CIParams:
    """Weights of one site's CI function.

    mlp / vector_mlp: `weights[i]: (C, fan_in, fan_out)`, `biases[i]: (C, fan_out)`.
    shared_mlp: `weights[i]: (fan_in, fan_out)`, `biases[i]: (fan_out,)`.
    """

    weights: tuple[Array, ...]
    biases: tuple[Array, ...]
    kind: str = dataclasses.field(metadata=dict(static=True))


def init_ci(key: Array, kind: str, d_in: int, C: int, hidden: tuple[int, ...], dtype=jnp.float32) -> CIParams:
    """Reference init for a CI function of `kind` on a site with input width d_in."""
    if kind not in CI_KINDS:
        raise ValueError(f"ci.type: unknown CI function {kind!r}; allowed: {list(CI_KINDS)}")
    if any((not isinstance(h, int)) or h <= 0 for h in hidden):
        raise ValueError(f"ci.hidden: widths must be positive ints, got {hidden!r}")
    first = {"mlp": 1, "vector_mlp": d_in, "shared_mlp": d_in}[kind]
    last = C if kind == "shared_mlp" else 1
    dims = (first, *hidden, last)
    keys = jax.random.split(key, len(dims) - 1)
    weights, biases = [], []
    for i, (fi, fo) in enumerate(zip(dims[:-1], dims[1:])):
        gain = 1.0 if i == len(dims) - 2 else 2.0
        shape = (fi, fo) if kind == "shared_mlp" else (C, fi, fo)
        weights.append(jax.random.normal(keys[i], shape, dtype) * jnp.sqrt(gain / fi))
        biases.append(jnp.zeros(shape[:-2] + (fo,), dtype))
    return CIParams(tuple(weights), tuple(biases), kind)


_INV_SQRT2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


@jax.custom_jvp
def gelu(x: Array) -> Array:
    """Exact GELU x * Phi(x), written with erf (XLA's erf is a cheap rational approximation; the
    erfc form jax.nn.gelu uses needs an exp); derivative Phi(x) + x phi(x) via a custom JVP."""
    return x * (0.5 + 0.5 * jax.lax.erf(x * _INV_SQRT2))


@gelu.defjvp
def _gelu_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    cdf = 0.5 + 0.5 * jax.lax.erf(x * _INV_SQRT2)
    return x * cdf, (cdf + x * jnp.exp(-0.5 * x * x) * _INV_SQRT_2PI) * t


_gelu = gelu


@jax.custom_vjp
def scalar_mlp(w1, b1, w2, b2, h):
    """One hidden layer per subcomponent on a scalar: z_c = sum_k w2[c,k] GELU(w1[c,k] h_c + b1[c,k]) + b2[c].

    Shapes: w1, b1, w2: (C, H); b2: (C,); h: (*lead, C) -> (*lead, C). The hand-written VJP
    recomputes the (*lead, C, H) hidden layer in one fused pass and reduces every weight gradient
    from it, instead of the several transposed passes autodiff of the einsum form produces on CPU.
    """
    pre = h[..., None] * w1 + b1
    return jnp.sum(gelu(pre) * w2, axis=-1) + b2


def _scalar_mlp_fwd(w1, b1, w2, b2, h):
    return scalar_mlp(w1, b1, w2, b2, h), (w1, b1, w2, h)


def _scalar_mlp_bwd(res, dz):
    w1, b1, w2, h = res
    pre = h[..., None] * w1 + b1
    cdf = 0.5 + 0.5 * jax.lax.erf(pre * _INV_SQRT2)
    dzb = dz[..., None]
    g = dzb * w2 * (cdf + pre * jnp.exp(-0.5 * pre * pre) * _INV_SQRT_2PI)
    ax = tuple(range(h.ndim - 1))
    return (
        jnp.sum(g * h[..., None], ax),
        jnp.sum(g, ax),
        jnp.sum(pre * cdf * dzb, ax),
        jnp.sum(dz, ax),
        jnp.sum(g * w1, -1),
    )


scalar_mlp.defvjp(_scalar_mlp_fwd, _scalar_mlp_bwd)


def _per_component_mlp(p: CIParams, x: Float[Array, "*lead C fan_in"]) -> Float[Array, "*lead C"]:
    n = len(p.weights)
    if n == 2 and p.weights[0].shape[1] == 1 and p.weights[1].shape[2] == 1:
        w1, w2 = p.weights[0][:, 0, :], p.weights[1][:, :, 0]
        return scalar_mlp(w1, p.biases[0], w2, p.biases[1][:, 0], x[..., 0])
    for i, (w, b) in enumerate(zip(p.weights, p.biases)):
        if w.shape[1] == 1:
            x = x * w[:, 0, :] + b  # scalar input: an outer product, no reduction needed
        elif w.shape[2] == 1:
            x = jnp.sum(x * w[:, :, 0], axis=-1, keepdims=True) + b
        else:
            x = jnp.einsum("...ci,cio->...co", x, w) + b
        if i < n - 1:
            x = _gelu(x)
    return x[..., 0]


def ci_raw(
    p: CIParams, spec: SiteSpec, a: Array, comp: Components
) -> Float[Array, "*lead C"]:
    """Raw importances z for a site input `a` (the clean target's input to the site)."""
    if p.kind == "mlp":
        h = inner_acts(spec, a, comp.V)
        return _per_component_mlp(p, h[..., None])
    x = dense_features(spec, a, dtype=comp.V.dtype)
    if p.kind == "vector_mlp":
        w0 = p.weights[0]
        x = jnp.einsum("...d,cdh->...ch", x, w0) + p.biases[0]
        if len(p.weights) == 1:
            return x[..., 0]
        rest = CIParams(p.weights[1:], p.biases[1:], p.kind)
        return _per_component_mlp(rest, _gelu(x))
    n = len(p.weights)
    for i, (w, b) in enumerate(zip(p.weights, p.biases)):
        x = x @ w + b
        if i < n - 1:
            x = _gelu(x)
    return x

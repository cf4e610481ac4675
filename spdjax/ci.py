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

from spdjax import kernels
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
    shapes = ci_shapes(kind, d_in, C, hidden)
    keys = jax.random.split(key, len(shapes))
    weights, biases = [], []
    for i, (w_shape, b_shape) in enumerate(shapes):
        gain = 1.0 if i == len(shapes) - 1 else 2.0
        weights.append(jax.random.normal(keys[i], w_shape, dtype) * jnp.sqrt(gain / w_shape[-2]))
        biases.append(jnp.zeros(b_shape, dtype))
    return CIParams(tuple(weights), tuple(biases), kind)


def ci_shapes(
    kind: str, d_in: int, C: int, hidden: tuple[int, ...]
) -> tuple[tuple[tuple[int, ...], tuple[int, ...]], ...]:
    """`((weights[i] shape, biases[i] shape), ...)` of a CI function of `kind` (what `init_ci` makes):
    layers first -> *hidden -> last with first = 1 (`mlp`) or d_in, last = C (`shared_mlp`) or 1."""
    first = {"mlp": 1, "vector_mlp": d_in, "shared_mlp": d_in}[kind]
    last = C if kind == "shared_mlp" else 1
    dims = (first, *hidden, last)
    if kind == "shared_mlp":
        return tuple(((fi, fo), (fo,)) for fi, fo in zip(dims[:-1], dims[1:]))
    return tuple(((C, fi, fo), (C, fo)) for fi, fo in zip(dims[:-1], dims[1:]))


_INV_SQRT2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


@jax.custom_jvp
def gelu(x: Array) -> Array:
    """Exact GELU x * Phi(x), written with erf (XLA's erf is a cheap rational approximation; the
    erfc form jax.nn.gelu uses needs an exp); derivative Phi(x) + x phi(x) via a custom JVP."""
    return x * (0.5 + 0.5 * jax.lax.erf(x * _INV_SQRT2))


def _gelu_parts(x: Array) -> tuple[Array, Array]:
    """(Phi(x), GELU'(x) = Phi(x) + x phi(x))."""
    cdf = 0.5 + 0.5 * jax.lax.erf(x * _INV_SQRT2)
    return cdf, cdf + x * jnp.exp(-0.5 * x * x) * _INV_SQRT_2PI


@gelu.defjvp
def _gelu_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    cdf, d = _gelu_parts(x)
    return x * cdf, d * t


_gelu = gelu


@jax.custom_vjp
def scalar_mlp(w1, b1, w2, b2, h):
    """One hidden layer per subcomponent on a scalar: z_c = sum_k w2[c,k] GELU(w1[c,k] h_c + b1[c,k]) + b2[c].

    Shapes: w1, b1, w2: (C, H); b2: (C,); h: (*lead, C) -> (*lead, C). The hand-written VJP
    recomputes the (*lead, C, H) hidden layer and reduces every weight gradient from it. On CPU, in
    float32, one C++ kernel does so (`spdjax.kernels`); otherwise on CPU in batch chunks of about
    `BWD_CHUNK_ELEMS` hidden units (see `_scalar_mlp_grads_chunked`).
    """
    pre = h[..., None] * w1 + b1
    return jnp.sum(gelu(pre) * w2, axis=-1) + b2


# Hidden units per chunk of the CPU backward: 2 MiB of float32, so a chunk's temporaries stay in cache.
BWD_CHUNK_ELEMS = 1 << 19


def _scalar_mlp_grads(w1, b1, w2, h, dz):
    """(dw1, db1, dw2, dh) for flat h, dz: (N, C), all N rows at once."""
    pre = h[..., None] * w1 + b1
    cdf, d = _gelu_parts(pre)
    dzb = dz[..., None]
    g = dzb * w2 * d
    return (
        jnp.sum(g * h[..., None], 0),
        jnp.sum(g, 0),
        jnp.sum(pre * cdf * dzb, 0),
        jnp.sum(g * w1, -1),
    )


def _scalar_mlp_grads_chunked(w1, b1, w2, h, dz):
    """`_scalar_mlp_grads` in row chunks under `lax.scan`, accumulating the weight gradients.

    XLA:CPU materialises each (N, C, H) temporary of the all-at-once form in memory, so that backward
    is bound by memory traffic (~3x slower at N C H = 13M). Chunk j holds rows j, j + n, j + 2n, ...
    (n chunks): interleaved, so each chunk draws from the whole batch rather than from one device's
    shard of it. Rows padded to a multiple of n have dz = 0 and add nothing.
    """
    N, C = h.shape
    n = -(-N * C * w1.shape[1] // BWD_CHUNK_ELEMS)
    if n == 1:
        return _scalar_mlp_grads(w1, b1, w2, h, dz)
    rows = -(-N // n)
    pad = rows * n - N
    h, dz = (jnp.pad(x, ((0, pad), (0, 0))).reshape(rows, n, C).swapaxes(0, 1) for x in (h, dz))

    def body(acc, xs):
        *sums, dh = _scalar_mlp_grads(w1, b1, w2, *xs)
        return tuple(a + s for a, s in zip(acc, sums)), dh

    zero = jnp.zeros(w1.shape, w1.dtype)
    sums, dh = jax.lax.scan(body, (zero, zero, zero), (h, dz))
    return (*sums, dh.swapaxes(0, 1).reshape(rows * n, C)[:N])


def _scalar_mlp_grads_cpu(w1, b1, w2, h, dz):
    """The CPU backward: the hand-written kernel of `spdjax.kernels` for float32 when it is built
    (the CPU backend is the default one), else the chunked pure-JAX form."""
    f32 = all(x.dtype == jnp.float32 for x in (w1, b1, w2, h, dz))
    if f32 and jax.default_backend() == "cpu" and kernels.load():
        return kernels.scalar_mlp_grads(w1, b1, w2, h, dz)
    return _scalar_mlp_grads_chunked(w1, b1, w2, h, dz)


def _scalar_mlp_fwd(w1, b1, w2, b2, h):
    return scalar_mlp(w1, b1, w2, b2, h), (w1, b1, w2, h)


def _scalar_mlp_bwd(res, dz):
    w1, b1, w2, h = res
    C = w1.shape[0]
    flat = (h.reshape(-1, C), dz.reshape(-1, C))
    dw1, db1, dw2, dh = jax.lax.platform_dependent(
        w1, b1, w2, *flat, cpu=_scalar_mlp_grads_cpu, default=_scalar_mlp_grads
    )
    return dw1, db1, dw2, jnp.sum(dz, tuple(range(dz.ndim - 1))), dh.reshape(h.shape)


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
    p: CIParams, spec: SiteSpec, a: Array, comp: Components, h: Float[Array, "*lead C"] | None = None
) -> Float[Array, "*lead C"]:
    """Raw importances z for a site input `a` (the clean target's input to the site); `h`: its inner
    activations a V if the caller has them (used by the `mlp` kind)."""
    if p.kind == "mlp":
        h = inner_acts(spec, a, comp.V) if h is None else h
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

"""Sites: the linear maps of a target that get decomposed, and how to compute with them.

A site maps an input `a` with leading axes `*lead` (batch, positions, ...) and trailing feature
axes `in_shape` to an output with trailing axes `out_shape`. Internally every site is the matrix
`kernel: (d_in, d_out)` with `y = flat(a) @ kernel + bias` (the transpose of the paper's W), so
subcomponents are stored as `V: (d_in, C)` and `U: (C, d_out)` with `kernel ~ V @ U`.

Kinds: `linear` (nnx.Linear, pure-function linears), `embed` (row look-up; `a` holds integer ids,
`in_shape == ()`, `d_in` = vocabulary size), `einsum` (nnx.Einsum whose contracted axes trail the
input and whose new axes trail the output), `linear_general` (nnx.LinearGeneral contracting the
input's trailing axes, e.g. nnx.MultiHeadAttention's query / key / value `(d, heads, head_dim)` and
out `(heads, head_dim, d)`: the whole matrix, heads flattened, is one site), `identity` (an inserted
d x d identity).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from typing import Sequence

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

KINDS = ("linear", "embed", "einsum", "linear_general", "identity")
IDENTITY_SUFFIX = ".pre_identity"


@dataclasses.dataclass(frozen=True)
class SiteSpec:
    """Static description of one site (hashable; lives in jit's static structure)."""

    name: str
    kind: str
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    C: int
    d_in: int
    tied_to: str | None = None  # the primary site whose (transposed) components this site uses
    einsum_str: str | None = None

    @property
    def d_out(self) -> int:
        return math.prod(self.out_shape)

    @property
    def param_name(self) -> str:
        """Name of the component parameters this site uses."""
        return self.tied_to or self.name


@dataclasses.dataclass(frozen=True)
class SitePattern:
    """A glob over module paths (e.g. `layers.*.mlp_in`) and the C for every site it matches."""

    pattern: str
    C: int


def _describe(x) -> str:
    """`a list of str ['a', 'b']`, `a str 'a'`, `None`, ...: a malformed `sites` argument, for errors."""
    if x is None:
        return "None"
    if isinstance(x, (list, tuple)) and x:
        kinds = " / ".join(sorted({type(e).__name__ for e in x}))
        return f"a {type(x).__name__} of {kinds} {x!r}"
    return f"a {type(x).__name__} {x!r}"


def as_patterns(sites, arg: str = "sites") -> tuple[SitePattern, ...]:
    """Accepts SitePattern, (pattern, C) pairs or a {pattern: C} mapping (`arg`: the argument's name in
    errors). A malformed form raises a one-line TypeError saying what was expected; a bad C a ValueError."""
    expected = f"{arg} must be {{pattern: C}} or ((pattern, C), ...) with C the number of subcomponents"
    if isinstance(sites, dict):
        sites = list(sites.items())
    elif isinstance(sites, SitePattern):
        sites = [sites]
    elif isinstance(sites, (str, bytes)) or not isinstance(sites, (list, tuple)):
        raise TypeError(f"{expected}, e.g. {{'layers.*.mlp_in': 100}}; got {_describe(sites)}")
    if sites and all(isinstance(s, str) for s in sites):
        example = {s: 100 for s in sites[:2]}
        raise TypeError(f"{expected}, e.g. {example!r}; got {_describe(sites)}")
    out = []
    for s in sites:
        if isinstance(s, SitePattern):
            p = s
        elif isinstance(s, (list, tuple)) and len(s) == 2:
            p = SitePattern(*s)
        else:
            hint = " (no C)" if isinstance(s, (list, tuple)) and len(s) == 1 else ""
            raise TypeError(f"{expected}, e.g. {{'layers.*.mlp_in': 100}}; got the entry {s!r}{hint}")
        if not isinstance(p.pattern, str) or not p.pattern:
            raise TypeError(f"{expected}; got the pattern {p.pattern!r} (a {type(p.pattern).__name__}, not a str)")
        if not isinstance(p.C, int) or isinstance(p.C, bool) or p.C <= 0:
            raise ValueError(
                f"{arg}: C for pattern {p.pattern!r} must be a positive int (the number of subcomponents), "
                f"got {p.C!r}"
            )
        out.append(p)
    if not out:
        raise ValueError(f"{arg}: at least one site pattern is required, e.g. {{'layers.*.mlp_in': 100}}")
    return tuple(out)


def match_patterns(
    patterns: Sequence[SitePattern], paths: Sequence[str]
) -> dict[str, SitePattern]:
    """Maps each matched path to its pattern. Errors: a pattern matching nothing, a path matched twice."""
    matched: dict[str, SitePattern] = {}
    for pat in patterns:
        hits = [p for p in paths if fnmatch.fnmatchcase(p, pat.pattern)]
        if not hits:
            raise ValueError(
                f"site pattern {pat.pattern!r} matches no decomposable layer; "
                f"available paths: {sorted(paths)}"
            )
        for h in hits:
            if h in matched:
                raise ValueError(
                    f"layer {h!r} is matched by two site patterns: "
                    f"{matched[h].pattern!r} and {pat.pattern!r}"
                )
            matched[h] = pat
    return matched


def flat_input(spec: SiteSpec, a: Array) -> Array:
    """`(*lead, *in_shape) -> (*lead, d_in)` for dense kinds."""
    if not spec.in_shape:
        raise ValueError(f"site {spec.name!r}: embed inputs have no dense feature axis")
    lead = a.shape[: a.ndim - len(spec.in_shape)]
    return a.reshape(*lead, spec.d_in)


def lead_shape(spec: SiteSpec, a: Array) -> tuple[int, ...]:
    """Leading (batch, position, ...) axes of a site input."""
    return a.shape[: a.ndim - len(spec.in_shape)]


def inner_acts(spec: SiteSpec, a: Array, V: Float[Array, "d_in C"]) -> Float[Array, "*lead C"]:
    """Inner activations h = a V (embed: the rows V[a])."""
    if spec.kind == "embed":
        return jnp.take(V, a, axis=0)
    return matmul(flat_input(spec, a), V)


# A matmul with a contraction or output width at most this is written as multiplies and a sum, which XLA
# fuses with its neighbours; as a dot it is a library call costing ~0.1 ms whatever its size (TMS).
SMALL_DOT = 4


def matmul(x: Float[Array, "*lead k"], w: Float[Array, "k n"]) -> Float[Array, "*lead n"]:
    """`x @ w`; for k or n <= `SMALL_DOT`, as elementwise products and a sum (the same value)."""
    k, n = w.shape
    if k <= SMALL_DOT:
        out = x[..., 0, None] * w[0]
        for i in range(1, k):
            out = out + x[..., i, None] * w[i]
        return out
    if n <= SMALL_DOT:
        return jnp.sum(x[..., :, None] * w, axis=-2)
    return x @ w


def dense_features(spec: SiteSpec, a: Array, dtype=jnp.float32) -> Float[Array, "*lead d_in"]:
    """The site input as dense features (embed: one-hot ids), for vector/shared CI functions."""
    if spec.kind == "embed":
        return jax.nn.one_hot(a, spec.d_in, dtype=dtype)
    return flat_input(spec, a)


def unflat_output(spec: SiteSpec, y: Float[Array, "*lead d_out"]) -> Array:
    return y.reshape(*y.shape[:-1], *spec.out_shape)


def apply_kernel(spec: SiteSpec, a: Array, kernel: Float[Array, "d_in d_out"]) -> Array:
    """Target site map without bias: `(*lead, *in_shape) -> (*lead, *out_shape)`."""
    if spec.kind == "embed":
        return jnp.take(kernel, a, axis=0)
    if spec.kind == "identity":
        return a
    return unflat_output(spec, matmul(flat_input(spec, a), kernel))


def identity_spec(site: SiteSpec, C: int) -> SiteSpec:
    """The identity site inserted before `site` (acts on that site's input)."""
    if site.kind == "embed":
        raise ValueError(f"identity insertion before embedding site {site.name!r} is not supported")
    return SiteSpec(
        name=site.name + IDENTITY_SUFFIX,
        kind="identity",
        in_shape=site.in_shape,
        out_shape=site.in_shape,
        C=C,
        d_in=site.d_in,
    )

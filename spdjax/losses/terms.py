"""The built-in loss terms: their options classes, their functions, and the table that names them.

Every reconstruction term is D(masked model, target) for one choice of

- **masks**: `stochastic` (m = g + (1 - g) r, S samples), `ci` (m = g), `ones` (m = 1) or `pgd`
  (m = g + (1 - g) a with the adversarial sources a of a PGD search);
- **sites**: `all` (every site masked at once), `layerwise` (one site at a time, averaged over sites) or
  `subset` (a random subset of sites per position, the rest computing the target's own map).

`RECON_TERMS` maps each term name to its (masks, sites) and the PRNG salts of its randomness
(`fold_in(key, salt)`); `recon_options` gives the options each combination has.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from spdjax import masks as masks_lib
from spdjax.components import faithfulness_loss, masked_site_output, site_components
from spdjax.losses.forward import divergence, layerwise_forward_losses, masked_forward
from spdjax.losses.registry import LossContext, OptionError, TermOptions, register_term
from spdjax.masks import SiteMask

# ----------------------------------------------------------------------------- options


@dataclasses.dataclass(frozen=True)
class LayerwiseOptions(TermOptions):
    """`*_layerwise` terms (stochastic, ci): `unroll=None` traces one forward pass per site; an int sweeps
    the sites with `lax.scan` at that unroll (see `layerwise_forward_losses`)."""

    unroll: int | None = None

    def validate(self):
        super().validate()
        u = self.unroll
        if u is not None and u < 1:
            raise OptionError("unroll", f" must be None or an int >= 1, got {u!r}")


@dataclasses.dataclass(frozen=True)
class SubsetOptions(TermOptions):
    """`*_subset` terms: which sites are masked per position: `uniform_k` (k ~ U{1..L}, then a uniform
    k-subset) or `static_p` (each site independently with probability `subset_p`)."""

    routing: str = "uniform_k"
    subset_p: float = 0.5

    def validate(self):
        super().validate()
        if self.routing not in masks_lib.ROUTINGS:
            raise OptionError("routing", f": unknown {self.routing!r}; allowed: {list(masks_lib.ROUTINGS)}")
        if not 0.0 < self.subset_p <= 1.0:
            raise OptionError("subset_p", f" must be in (0, 1], got {self.subset_p!r}")


@dataclasses.dataclass(frozen=True)
class PGDOptions(TermOptions):
    """`pgd_*` terms: `n_steps` of `a <- clip(a + step_size sign(dD/da), 0, 1)` from `init` (random / ones
    / zeros), sources per example or `shared_across_batch` (see `masks.pgd_sources`)."""

    init: str = "random"
    n_steps: int = 1
    step_size: float = 1.0
    mask_scope: str = "per_example"

    def validate(self):
        super().validate()
        if self.init not in masks_lib.PGD_INITS:
            raise OptionError("init", f": unknown {self.init!r}; allowed: {list(masks_lib.PGD_INITS)}")
        if self.mask_scope not in masks_lib.PGD_SCOPES:
            raise OptionError("mask_scope", f": unknown {self.mask_scope!r}; allowed: {list(masks_lib.PGD_SCOPES)}")
        if self.n_steps < 0:
            raise OptionError("n_steps", f" must be an int >= 0, got {self.n_steps!r}")
        if not self.step_size > 0:
            raise OptionError("step_size", f" must be > 0, got {self.step_size!r}")


@dataclasses.dataclass(frozen=True)
class PGDSubsetOptions(PGDOptions, SubsetOptions):
    """`pgd_recon_subset`: the PGD options and the subset routing."""


@dataclasses.dataclass(frozen=True)
class MinimalityOptions(TermOptions):
    """`importance_minimality`: p (`pnorm`, optionally annealed linearly to `p_anneal_final_p` between the
    training fractions `p_anneal_start_frac` and `p_anneal_end_frac`), the `beta` log term and `eps`."""

    pnorm: float = 1.0
    p_anneal_start_frac: float = 1.0
    p_anneal_final_p: float | None = None
    p_anneal_end_frac: float = 1.0
    beta: float = 0.0
    eps: float = 1e-12

    def validate(self):
        super().validate()
        for f in ("pnorm", "p_anneal_final_p"):
            v = getattr(self, f)
            if v is not None and not v > 0:
                raise OptionError(f, f" must be > 0, got {v!r}")
        if not 0.0 <= self.p_anneal_start_frac <= self.p_anneal_end_frac:
            raise OptionError(
                "p_anneal_start_frac",
                " must satisfy 0 <= p_anneal_start_frac <= p_anneal_end_frac, "
                f"got {self.p_anneal_start_frac} and {self.p_anneal_end_frac}",
            )


MASK_SOURCES = ("stochastic", "ci", "ones", "pgd")
SITE_SELECTIONS = ("all", "layerwise", "subset")


def recon_options(masks: str, sites: str) -> type[TermOptions]:
    """The options class of a reconstruction term: PGD options for `pgd` masks, routing for `subset`
    sites, `unroll` for `layerwise` sites (not with `pgd`: its layerwise sweep is one search per site)."""
    if masks not in MASK_SOURCES or sites not in SITE_SELECTIONS:
        raise ValueError(f"recon_options: unknown ({masks!r}, {sites!r}); masks in {MASK_SOURCES}, "
                         f"sites in {SITE_SELECTIONS}")
    if masks == "pgd":
        return PGDSubsetOptions if sites == "subset" else PGDOptions
    return {"all": TermOptions, "layerwise": LayerwiseOptions, "subset": SubsetOptions}[sites]


class Recon(NamedTuple):
    """A reconstruction term: where its masks come from, which sites they mask, and the `fold_in` salts of
    its mask randomness and of its subset routes (None: not random)."""

    masks: str
    sites: str
    mask_salt: int | None = None
    route_salt: int | None = None


RECON_TERMS: dict[str, Recon] = {
    #  term name                        masks         sites       mask salt  route salt
    "stochastic_recon":           Recon("stochastic", "all",       1),
    "stochastic_recon_layerwise": Recon("stochastic", "layerwise", 2),
    "stochastic_recon_subset":    Recon("stochastic", "subset",    3,         4),
    "ci_masked_recon":            Recon("ci",         "all"),
    "ci_masked_recon_layerwise":  Recon("ci",         "layerwise"),
    "ci_masked_recon_subset":     Recon("ci",         "subset",    None,      5),
    "unmasked_recon":             Recon("ones",       "all"),
    "pgd_recon":                  Recon("pgd",        "all",       6),
    "pgd_recon_layerwise":        Recon("pgd",        "layerwise", 9),
    "pgd_recon_subset":           Recon("pgd",        "subset",    7,         8),
}  # fmt: skip
HIDDEN_ACTS_SALT = 10  # stochastic_hidden_acts_recon

# ----------------------------------------------------------------------------- building blocks


def mean_over_samples(fn, *stacked) -> Float[Array, ""]:
    """(1/S) sum_s fn(*(x[s] for x in stacked)) over the leading S axis of every leaf (`vmap`).

    For S = 1 fn runs on the single sample without `vmap`: the value is the same, but the transposed
    (gradient) matmuls of a vmapped size-1 axis reach XLA:CPU in a transposed layout its matmul library
    does not take (resid_mlp:1: two (2048, 100) x (2048, 1000) gradient matmuls ran at 24 GFLOP/s).
    """
    S = {x.shape[0] for x in jax.tree.leaves(stacked)}
    if len(S) != 1:
        raise ValueError(f"mean_over_samples: leading (sample) axes differ: {sorted(S)}")
    if S == {1}:
        return fn(*jax.tree.map(lambda x: x[0], stacked))
    return jnp.mean(jax.vmap(fn)(*stacked))


def stochastic_recon_loss(
    params, target, batch, out, site_masks: dict[str, SiteMask], output_loss="mse", remat=False
) -> Float[Array, ""]:
    """(1/S) sum_s D(f(x | all sites masked with m^(s)), f(x)); the S samples under `vmap`."""

    def one(sm):
        return divergence(output_loss, masked_forward(params, target, batch, sm, remat), out)

    return mean_over_samples(one, site_masks)


def stochastic_recon_layerwise_loss(
    params, target, batch, out, site_masks: dict[str, SiteMask], output_loss="mse", unroll=None, remat=False
) -> Float[Array, ""]:
    """(1/(S L)) sum_s sum_l D(f(x | only site l masked with m^(s)_l), f(x)); vmap over S; sites per `unroll`."""

    def one(sm):
        return layerwise_forward_losses(params, target, batch, out, sm, output_loss, unroll, remat)

    return mean_over_samples(one, site_masks)


def stochastic_recon_subset_loss(
    params, target, batch, out, site_masks: dict[str, SiteMask], routes: dict[str, Array],
    output_loss="mse", remat=False,
) -> Float[Array, ""]:
    """(1/S) sum_s D(f(x | routed sites masked with m^(s), the rest clean), f(x)); routes `(S, *lead)`."""

    def one(sm, rt):
        pred = masked_forward(params, target, batch, masks_lib.route_masks(sm, rt), remat)
        return divergence(output_loss, pred, out)

    return mean_over_samples(one, site_masks, routes)


def annealed_p(opts, progress) -> Array | float:
    """p linearly annealed from `pnorm` to `p_anneal_final_p` between the start and end fractions.

    `opts`: `MinimalityOptions` (or a `LossConfig`: its `importance_minimality` options). Without
    annealing p is a Python number, so `x ** p` compiles to multiplications for integral p.
    """
    p0 = opts.pnorm
    if opts.p_anneal_final_p is None or opts.p_anneal_start_frac >= 1.0:
        return int(p0) if float(p0).is_integer() else float(p0)
    start, end, p1 = opts.p_anneal_start_frac, opts.p_anneal_end_frac, opts.p_anneal_final_p
    frac = jnp.clip((progress - start) / max(end - start, 1e-12), 0.0, 1.0)
    frac = jnp.where(progress >= end, 1.0, frac)
    return jnp.asarray(p0 + (p1 - p0) * frac, jnp.float32)


def importance_minimality_loss(
    ci_upper: dict[str, Array], p, beta: float = 0.0, eps: float = 1e-12
) -> Float[Array, ""]:
    """sum_l sum_c [mean_{b,t} (g + eps)^p + beta * mean * log2(1 + sum_{b,t} (g + eps)^p)]."""
    total = 0.0
    for g in ci_upper.values():
        x = (g + eps) ** p
        axes = tuple(range(g.ndim - 1))
        s = jnp.sum(x, axis=axes)
        mean = s / (x.size // x.shape[-1])
        term = mean if beta == 0.0 else mean + beta * mean * jnp.log2(1.0 + s)
        total = total + jnp.sum(term)
    return total


def pgd_recon_loss(
    params, target, batch, out, ci_lower: dict[str, Array], key: Array, config,
    routes: dict[str, Array] | None = None, only_site: str | None = None, opts: PGDOptions | None = None,
) -> Float[Array, ""]:
    """D(f(x | masks m = g + (1 - g) a*), f(x)) with a* the PGD adversary (see `masks.pgd_sources`).

    `config` (a `LossConfig`) gives the shared settings (output_loss, use_delta_component, remat) and, when
    `opts` is None, the PGD options (`config.options_for("pgd_recon")`). `routes` restricts masking to
    routed sites per position (subset variant); `only_site` masks one site and leaves the others clean
    (one term of the layerwise variant).
    """
    if opts is None:
        opts = config.options_for("pgd_recon")
    remat = config.remat
    ci = ci_lower if only_site is None else {only_site: ci_lower[only_site]}

    def loss(p, masks):
        if routes is not None:
            masks = masks_lib.route_masks(masks, routes)
        return divergence(config.output_loss, masked_forward(p, target, batch, masks, remat), out)

    src = masks_lib.pgd_sources(
        lambda m: loss(jax.lax.stop_gradient(params), m), ci, key, opts.n_steps,
        opts.step_size, opts.init, opts.mask_scope, config.use_delta_component,
    )
    return loss(params, masks_lib.masks_from_sources(ci, src))


def hidden_acts_recon_loss(
    params, target, batch, inputs: dict[str, Array], site_masks: dict[str, SiteMask], remat=False
) -> Float[Array, ""]:
    """sum_l ||a'_l - a_l||^2 / sum_l numel(a_l): every (floating) site input under the masks vs clean."""

    def run(params, site_masks):
        seen: dict[str, Array] = {}

        def handler(spec, a, kernel, bias, layer_call):
            seen[spec.name] = a
            m = site_masks[spec.name]
            return masked_site_output(
                spec, a, site_components(params.components, spec), m.mask, m.delta, kernel, bias
            )

        target.run(batch, handler)
        return seen

    seen = jax.checkpoint(run)(params, site_masks) if remat else run(params, site_masks)
    num, den = 0.0, 0
    for name, a in inputs.items():
        if jnp.issubdtype(a.dtype, jnp.floating):
            num = num + jnp.sum((seen[name] - a) ** 2)
            den += a.size
    return num / max(den, 1)


# ----------------------------------------------------------------------------- the terms


def _stochastic(ctx: LossContext, salt: int, n_samples: int | None = None):
    c = ctx.config
    return masks_lib.sample_masks(
        jax.random.fold_in(ctx.key, salt), ctx.ci.lower, c.n_mask_samples if n_samples is None else n_samples,
        c.mask_type, c.use_delta_component,
    )


def _routes(ctx: LossContext, opts: SubsetOptions, salt: int, n_samples: int | None = None) -> dict[str, Array]:
    """Subset routes `{site: bool (*lead)}` (with a leading S axis when `n_samples` is given)."""
    names = tuple(ctx.ci.lower)
    lead = next(iter(ctx.ci.lower.values())).shape[:-1]
    key = jax.random.fold_in(ctx.key, salt)
    if n_samples is None:
        return masks_lib.sample_routes(key, lead, names, opts.routing, opts.subset_p)
    keys = jax.random.split(key, n_samples)
    return jax.vmap(lambda k: masks_lib.sample_routes(k, lead, names, opts.routing, opts.subset_p))(keys)


def recon_term(kind: Recon, ctx: LossContext, opts: TermOptions) -> Float[Array, ""]:
    """The reconstruction term `kind` (one row of `RECON_TERMS`) with its options `opts`."""
    c = ctx.config
    p, t, x, out = ctx.params, ctx.target, ctx.batch, ctx.out
    if kind.masks == "pgd":
        key = jax.random.fold_in(ctx.key, kind.mask_salt)
        if kind.sites == "all":
            return pgd_recon_loss(p, t, x, out, ctx.ci.lower, key, c, opts=opts)
        if kind.sites == "subset":
            routes = _routes(ctx, opts, kind.route_salt)
            return pgd_recon_loss(p, t, x, out, ctx.ci.lower, key, c, routes=routes, opts=opts)
        terms = [
            pgd_recon_loss(p, t, x, out, ctx.ci.lower, jax.random.fold_in(key, i), c, only_site=name, opts=opts)
            for i, name in enumerate(ctx.ci.lower)
        ]
        return sum(terms) / len(terms)
    if kind.masks == "stochastic":
        sm = _stochastic(ctx, kind.mask_salt)
        if kind.sites == "all":
            return stochastic_recon_loss(p, t, x, out, sm, c.output_loss, c.remat)
        if kind.sites == "layerwise":
            return stochastic_recon_layerwise_loss(p, t, x, out, sm, c.output_loss, opts.unroll, c.remat)
        routes = _routes(ctx, opts, kind.route_salt, c.n_mask_samples)
        return stochastic_recon_subset_loss(p, t, x, out, sm, routes, c.output_loss, c.remat)
    # deterministic masks, no delta term
    masks = masks_lib.deterministic_masks(ctx.ci.lower) if kind.masks == "ci" else masks_lib.ones_masks(ctx.ci.lower)
    if kind.sites == "layerwise":
        return layerwise_forward_losses(p, t, x, out, masks, c.output_loss, opts.unroll, c.remat)
    if kind.sites == "subset":
        masks = masks_lib.route_masks(masks, _routes(ctx, opts, kind.route_salt))
    return divergence(c.output_loss, masked_forward(p, t, x, masks, c.remat), out)


def faithfulness(ctx: LossContext, opts: TermOptions):
    """sum_l ||W_l - U_l V_l||_F^2 / sum_l numel(W_l)."""
    return faithfulness_loss(ctx.params.components, ctx.target.kernels(), ctx.target.sites)


def importance_minimality(ctx: LossContext, opts: MinimalityOptions):
    return importance_minimality_loss(ctx.ci.upper, annealed_p(opts, ctx.progress), opts.beta, opts.eps)


def stochastic_hidden_acts_recon(ctx: LossContext, opts: TermOptions):
    """Every site's input under one stochastic mask sample vs the clean pass (an evaluation term)."""
    masks = masks_lib.take_sample(_stochastic(ctx, HIDDEN_ACTS_SALT, 1), 0)
    return hidden_acts_recon_loss(ctx.params, ctx.target, ctx.batch, ctx.inputs, masks, ctx.config.remat)


OTHER_TERMS = {
    "faithfulness": (TermOptions, faithfulness),
    "importance_minimality": (MinimalityOptions, importance_minimality),
    "stochastic_hidden_acts_recon": (TermOptions, stochastic_hidden_acts_recon),
}
# registration order = the order of `TERMS` (and of an evaluation over all terms)
for _name in ("faithfulness", "stochastic_recon", "stochastic_recon_layerwise", "stochastic_recon_subset",
              "importance_minimality", "ci_masked_recon", "ci_masked_recon_layerwise", "ci_masked_recon_subset",
              "unmasked_recon", "pgd_recon", "pgd_recon_layerwise", "pgd_recon_subset",
              "stochastic_hidden_acts_recon"):
    if _name in RECON_TERMS:
        _kind = RECON_TERMS[_name]
        register_term(_name, recon_options(_kind.masks, _kind.sites), functools.partial(recon_term, _kind))
    else:
        register_term(_name, *OTHER_TERMS[_name])

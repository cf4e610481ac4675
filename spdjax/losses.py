"""SPD loss terms, one pure function each, and `loss_fn` that composes them from a `LossConfig`.

Shapes: a batch has leading axes `*lead` (batch, positions, ...); CI and masks are `(*lead, C)` per
site; S-stacked masks carry a leading `S` axis. Divergences compare the masked model's output with
the clean target output: `mse` averages over all elements; `kl` is KL(softmax(target) ||
softmax(masked)) summed over the last (vocabulary) axis and averaged over the other axes.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from spdjax import masks as masks_lib
from spdjax.ci import ci_raw
from spdjax.components import faithfulness_loss, masked_site_output, site_components
from spdjax.decomposition import SPDParams, check_params
from spdjax.fields import dataclass_from, to_dict
from spdjax.masks import SiteMask
from spdjax.sigmoids import get_sigmoids
from spdjax.targets.base import Target

DIVERGENCES = ("mse", "kl")


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Static loss configuration (hashable; a leafless pytree, so it can be passed to `jit`).

    `coeffs` is a tuple of `(term name, coefficient)`; only listed terms are computed. Defaults are the
    reference-main recipe (delta component on, no faithfulness term).
    """

    coeffs: tuple[tuple[str, float], ...] = (
        ("stochastic_recon", 1.0),
        ("stochastic_recon_layerwise", 1.0),
        ("importance_minimality", 3e-3),
    )
    n_mask_samples: int = 1
    mask_type: str = "continuous"
    use_delta_component: bool = True
    sigmoid: str = "leaky_hard"
    output_loss: str = "mse"
    pnorm: float = 1.0
    p_anneal_start_frac: float = 1.0
    p_anneal_final_p: float | None = None
    p_anneal_end_frac: float = 1.0
    minimality_beta: float = 0.0
    minimality_eps: float = 1e-12
    ci_l0_threshold: float = 0.1
    layerwise_unroll: int | None = None  # None: one traced pass per site; int: lax.scan with that unroll
    subset_routing: str = "uniform_k"  # *_subset terms: "uniform_k" or "static_p"
    subset_p: float = 0.5  # static_p routing: probability that a site is masked at a position
    pgd_init: str = "random"  # pgd_* terms: initial adversarial sources (random / ones / zeros)
    pgd_n_steps: int = 1
    pgd_step_size: float = 1.0
    pgd_mask_scope: str = "per_example"  # or "shared_across_batch"

    def __post_init__(self):
        for name, c in self.coeffs:
            if name not in TERMS:
                raise ValueError(f"loss.coeffs: unknown loss term {name!r}; allowed: {sorted(TERMS)}")
        if not isinstance(self.n_mask_samples, int) or self.n_mask_samples < 1:
            raise ValueError(f"loss.n_mask_samples must be an int >= 1, got {self.n_mask_samples!r}")
        if self.mask_type not in masks_lib.MASK_KINDS:
            raise ValueError(
                f"loss.mask_type: unknown {self.mask_type!r}; allowed: {list(masks_lib.MASK_KINDS)}"
            )
        if self.output_loss not in DIVERGENCES:
            raise ValueError(f"loss.output_loss: unknown {self.output_loss!r}; allowed: {list(DIVERGENCES)}")
        get_sigmoids(self.sigmoid)
        for f in ("pnorm", "p_anneal_final_p"):
            v = getattr(self, f)
            if v is not None and not v > 0:
                raise ValueError(f"loss.{f} must be > 0, got {v!r}")
        u = self.layerwise_unroll
        if u is not None and (isinstance(u, bool) or not isinstance(u, int) or u < 1):
            raise ValueError(f"loss.layerwise_unroll must be None or an int >= 1, got {u!r}")
        if self.subset_routing not in masks_lib.ROUTINGS:
            raise ValueError(
                f"loss.subset_routing: unknown {self.subset_routing!r}; allowed: {list(masks_lib.ROUTINGS)}"
            )
        if not 0.0 < self.subset_p <= 1.0:
            raise ValueError(f"loss.subset_p must be in (0, 1], got {self.subset_p!r}")
        if self.pgd_init not in masks_lib.PGD_INITS:
            raise ValueError(f"loss.pgd_init: unknown {self.pgd_init!r}; allowed: {list(masks_lib.PGD_INITS)}")
        if self.pgd_mask_scope not in masks_lib.PGD_SCOPES:
            raise ValueError(
                f"loss.pgd_mask_scope: unknown {self.pgd_mask_scope!r}; allowed: {list(masks_lib.PGD_SCOPES)}"
            )
        n = self.pgd_n_steps
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"loss.pgd_n_steps must be an int >= 0, got {n!r}")
        if not self.pgd_step_size > 0:
            raise ValueError(f"loss.pgd_step_size must be > 0, got {self.pgd_step_size!r}")
        if not 0.0 <= self.p_anneal_start_frac <= self.p_anneal_end_frac:
            raise ValueError(
                "loss.p_anneal_start_frac must satisfy 0 <= p_anneal_start_frac <= p_anneal_end_frac, "
                f"got {self.p_anneal_start_frac} and {self.p_anneal_end_frac}"
            )

    @property
    def coeff_dict(self) -> dict[str, float]:
        return dict(self.coeffs)


jax.tree_util.register_dataclass(
    LossConfig, data_fields=[], meta_fields=[f.name for f in dataclasses.fields(LossConfig)]
)


# ----------------------------------------------------------------------------- building blocks


def divergence(kind: str, pred: Array, target: Array) -> Float[Array, ""]:
    """D(pred, target): `mse` (mean over elements) or `kl` (KL(target || pred) over the last axis)."""
    if kind == "mse":
        return jnp.mean((pred - target) ** 2)
    if kind == "kl":
        lt = jax.nn.log_softmax(target, axis=-1)
        lp = jax.nn.log_softmax(pred, axis=-1)
        return jnp.mean(jnp.sum(jnp.exp(lt) * (lt - lp), axis=-1))
    raise ValueError(f"output_loss: unknown divergence {kind!r}; allowed: {list(DIVERGENCES)}")


def clean_forward(target: Target, batch: Any) -> tuple[Array, dict[str, Array]]:
    """Target output and every site's input in the clean forward pass (gradients stopped)."""
    inputs: dict[str, Array] = {}

    def record(spec, a, kernel, bias, layer_call):
        inputs[spec.name] = a
        return layer_call(a)

    out = target.run(batch, record)
    missing = [n for n in target.site_names if n not in inputs]
    if missing:
        raise ValueError(f"sites {missing} were never called in the target's forward pass")
    return jax.lax.stop_gradient(out), jax.lax.stop_gradient(inputs)


class CIOutputs(NamedTuple):
    raw: dict[str, Array]
    lower: dict[str, Array]  # masks and CI-masked losses
    upper: dict[str, Array]  # importance minimality


def compute_ci(params: SPDParams, target: Target, inputs: dict[str, Array], sigmoid: str) -> CIOutputs:
    """Raw, lower-leaky and upper-leaky importances `(*lead, C)` for every site."""
    sig = get_sigmoids(sigmoid)
    raw = {
        s.name: ci_raw(params.ci[s.name], s, inputs[s.name], site_components(params.components, s))
        for s in target.sites
    }
    return CIOutputs(
        raw,
        {n: sig.lower(z) for n, z in raw.items()},
        {n: sig.upper(z) for n, z in raw.items()},
    )


def masked_forward(
    params: SPDParams, target: Target, batch: Any, site_masks: dict[str, SiteMask]
) -> Array:
    """Target forward with each site in `site_masks` computing its masked factored map; others clean."""

    def handler(spec, a, kernel, bias, layer_call):
        if spec.name not in site_masks:
            return layer_call(a)
        m = site_masks[spec.name]
        return masked_site_output(
            spec, a, site_components(params.components, spec), m.mask, m.delta, kernel, bias
        )

    return target.run(batch, handler)


def layerwise_forward_losses(
    params: SPDParams,
    target: Target,
    batch: Any,
    out: Array,
    site_masks: dict[str, SiteMask],
    output_loss: str,
    unroll: int | None = None,
) -> Float[Array, ""]:
    """Mean over sites l of D(forward with only site l masked, out).

    `unroll=None` (default) traces one forward pass per site, each with only that site masked: XLA
    then shares every pass's clean prefix with the clean forward pass and skips the masked branch
    elsewhere (resid_mlp:2 step: 106 -> 46 GFLOP). For many sites pass an int: the sites are swept
    with `lax.scan` (that unroll factor), each handler running `lax.cond(l == its index, masked,
    clean)`, which keeps compile time and code size flat in the number of sites at the price of
    recomputing the clean parts in every iteration.
    """
    names = [s.name for s in target.sites if s.name in site_masks]
    if unroll is None:
        total = 0.0
        for n in names:
            pred = masked_forward(params, target, batch, {n: site_masks[n]})
            total = total + divergence(output_loss, pred, out)
        return total / len(names)
    index = {n: i for i, n in enumerate(names)}

    def body(total, l):
        def handler(spec, a, kernel, bias, layer_call):
            if spec.name not in index:
                return layer_call(a)
            m = site_masks[spec.name]
            comp = site_components(params.components, spec)

            def masked(a):
                return masked_site_output(spec, a, comp, m.mask, m.delta, kernel, bias)

            return jax.lax.cond(l == index[spec.name], masked, layer_call, a)

        pred = target.run(batch, handler)
        return total + divergence(output_loss, pred, out), None

    total, _ = jax.lax.scan(body, jnp.zeros((), out.dtype), jnp.arange(len(names)), unroll=unroll)
    return total / len(names)


# ----------------------------------------------------------------------------- the terms


class LossContext(NamedTuple):
    """Everything a term may need, computed once per step."""

    params: SPDParams
    target: Target
    batch: Any
    out: Array
    inputs: dict[str, Array]
    ci: CIOutputs
    key: Array
    config: LossConfig
    progress: Array  # fraction of training done, in [0, 1]


def stochastic_recon_loss(
    params, target, batch, out, site_masks: dict[str, SiteMask], output_loss="mse"
) -> Float[Array, ""]:
    """(1/S) sum_s D(f(x | all sites masked with m^(s)), f(x)); the S samples under `vmap`."""

    def one(sm):
        return divergence(output_loss, masked_forward(params, target, batch, sm), out)

    return jnp.mean(jax.vmap(one)(site_masks))


def stochastic_recon_layerwise_loss(
    params, target, batch, out, site_masks: dict[str, SiteMask], output_loss="mse", unroll=None
) -> Float[Array, ""]:
    """(1/(S L)) sum_s sum_l D(f(x | only site l masked with m^(s)_l), f(x)); vmap over S; sites per `unroll`."""

    def one(sm):
        return layerwise_forward_losses(params, target, batch, out, sm, output_loss, unroll)

    return jnp.mean(jax.vmap(one)(site_masks))


def annealed_p(config: LossConfig, progress) -> Array | float:
    """p linearly annealed from `pnorm` to `p_anneal_final_p` between the start and end fractions.

    Without annealing p is a Python number, so `x ** p` compiles to multiplications for integral p.
    """
    p0 = config.pnorm
    if config.p_anneal_final_p is None or config.p_anneal_start_frac >= 1.0:
        return int(p0) if float(p0).is_integer() else float(p0)
    start, end, p1 = config.p_anneal_start_frac, config.p_anneal_end_frac, config.p_anneal_final_p
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


def _faithfulness(ctx: LossContext):
    return faithfulness_loss(ctx.params.components, ctx.target.kernels(), ctx.target.sites)


def _stochastic(ctx: LossContext, salt: int):
    c = ctx.config
    return masks_lib.sample_masks(
        jax.random.fold_in(ctx.key, salt), ctx.ci.lower, c.n_mask_samples, c.mask_type,
        c.use_delta_component,
    )


def _stochastic_recon(ctx: LossContext):
    return stochastic_recon_loss(
        ctx.params, ctx.target, ctx.batch, ctx.out, _stochastic(ctx, 1), ctx.config.output_loss
    )


def _stochastic_recon_layerwise(ctx: LossContext):
    return stochastic_recon_layerwise_loss(
        ctx.params, ctx.target, ctx.batch, ctx.out, _stochastic(ctx, 2), ctx.config.output_loss,
        ctx.config.layerwise_unroll,
    )


def _importance_minimality(ctx: LossContext):
    c = ctx.config
    return importance_minimality_loss(
        ctx.ci.upper, annealed_p(c, ctx.progress), c.minimality_beta, c.minimality_eps
    )


def _ci_masked_recon(ctx: LossContext):
    pred = masked_forward(ctx.params, ctx.target, ctx.batch, masks_lib.deterministic_masks(ctx.ci.lower))
    return divergence(ctx.config.output_loss, pred, ctx.out)


def _ci_masked_recon_layerwise(ctx: LossContext):
    return layerwise_forward_losses(
        ctx.params, ctx.target, ctx.batch, ctx.out, masks_lib.deterministic_masks(ctx.ci.lower),
        ctx.config.output_loss, ctx.config.layerwise_unroll,
    )


def _unmasked_recon(ctx: LossContext):
    pred = masked_forward(ctx.params, ctx.target, ctx.batch, masks_lib.ones_masks(ctx.ci.lower))
    return divergence(ctx.config.output_loss, pred, ctx.out)


def _routes(ctx: LossContext, salt: int, n_samples: int | None = None) -> dict[str, Array]:
    """Subset routes `{site: bool (*lead)}` (with a leading S axis when `n_samples` is given)."""
    c = ctx.config
    names = tuple(ctx.ci.lower)
    lead = next(iter(ctx.ci.lower.values())).shape[:-1]
    key = jax.random.fold_in(ctx.key, salt)
    if n_samples is None:
        return masks_lib.sample_routes(key, lead, names, c.subset_routing, c.subset_p)
    keys = jax.random.split(key, n_samples)
    return jax.vmap(lambda k: masks_lib.sample_routes(k, lead, names, c.subset_routing, c.subset_p))(keys)


def stochastic_recon_subset_loss(
    params, target, batch, out, site_masks: dict[str, SiteMask], routes: dict[str, Array],
    output_loss="mse",
) -> Float[Array, ""]:
    """(1/S) sum_s D(f(x | routed sites masked with m^(s), the rest clean), f(x)); routes `(S, *lead)`."""

    def one(sm, rt):
        pred = masked_forward(params, target, batch, masks_lib.route_masks(sm, rt))
        return divergence(output_loss, pred, out)

    return jnp.mean(jax.vmap(one)(site_masks, routes))


def pgd_recon_loss(
    params, target, batch, out, ci_lower: dict[str, Array], key: Array, config: LossConfig,
    routes: dict[str, Array] | None = None, only_site: str | None = None,
) -> Float[Array, ""]:
    """D(f(x | masks m = g + (1 - g) a*), f(x)) with a* the PGD adversary (see `masks.pgd_sources`).

    `routes` restricts masking to routed sites per position (subset variant); `only_site` masks one
    site and leaves the others clean (one term of the layerwise variant).
    """
    ci = ci_lower if only_site is None else {only_site: ci_lower[only_site]}

    def loss(p, masks):
        if routes is not None:
            masks = masks_lib.route_masks(masks, routes)
        return divergence(config.output_loss, masked_forward(p, target, batch, masks), out)

    src = masks_lib.pgd_sources(
        lambda m: loss(jax.lax.stop_gradient(params), m), ci, key, config.pgd_n_steps,
        config.pgd_step_size, config.pgd_init, config.pgd_mask_scope, config.use_delta_component,
    )
    return loss(params, masks_lib.masks_from_sources(ci, src))


def hidden_acts_recon_loss(
    params, target, batch, inputs: dict[str, Array], site_masks: dict[str, SiteMask]
) -> Float[Array, ""]:
    """sum_l ||a'_l - a_l||^2 / sum_l numel(a_l): every (floating) site input under the masks vs clean."""
    seen: dict[str, Array] = {}

    def handler(spec, a, kernel, bias, layer_call):
        seen[spec.name] = a
        m = site_masks[spec.name]
        return masked_site_output(
            spec, a, site_components(params.components, spec), m.mask, m.delta, kernel, bias
        )

    target.run(batch, handler)
    num, den = 0.0, 0
    for name, a in inputs.items():
        if jnp.issubdtype(a.dtype, jnp.floating):
            num = num + jnp.sum((seen[name] - a) ** 2)
            den += a.size
    return num / max(den, 1)


def _stochastic_recon_subset(ctx: LossContext):
    return stochastic_recon_subset_loss(
        ctx.params, ctx.target, ctx.batch, ctx.out, _stochastic(ctx, 3),
        _routes(ctx, 4, ctx.config.n_mask_samples), ctx.config.output_loss,
    )


def _ci_masked_recon_subset(ctx: LossContext):
    masks = masks_lib.route_masks(masks_lib.deterministic_masks(ctx.ci.lower), _routes(ctx, 5))
    return divergence(ctx.config.output_loss, masked_forward(ctx.params, ctx.target, ctx.batch, masks), ctx.out)


def _pgd_recon(ctx: LossContext):
    return pgd_recon_loss(
        ctx.params, ctx.target, ctx.batch, ctx.out, ctx.ci.lower, jax.random.fold_in(ctx.key, 6), ctx.config
    )


def _pgd_recon_subset(ctx: LossContext):
    return pgd_recon_loss(
        ctx.params, ctx.target, ctx.batch, ctx.out, ctx.ci.lower, jax.random.fold_in(ctx.key, 7),
        ctx.config, routes=_routes(ctx, 8),
    )


def _pgd_recon_layerwise(ctx: LossContext):
    key = jax.random.fold_in(ctx.key, 9)
    terms = [
        pgd_recon_loss(
            ctx.params, ctx.target, ctx.batch, ctx.out, ctx.ci.lower, jax.random.fold_in(key, i),
            ctx.config, only_site=name,
        )
        for i, name in enumerate(ctx.ci.lower)
    ]
    return sum(terms) / len(terms)


def _stochastic_hidden_acts_recon(ctx: LossContext):
    c = ctx.config
    masks = masks_lib.take_sample(masks_lib.sample_masks(
        jax.random.fold_in(ctx.key, 10), ctx.ci.lower, 1, c.mask_type, c.use_delta_component), 0)
    return hidden_acts_recon_loss(ctx.params, ctx.target, ctx.batch, ctx.inputs, masks)


# name -> term(ctx) -> scalar. New terms register here.
TERMS: dict[str, Callable[[LossContext], Array]] = {
    "faithfulness": _faithfulness,
    "stochastic_recon": _stochastic_recon,
    "stochastic_recon_layerwise": _stochastic_recon_layerwise,
    "stochastic_recon_subset": _stochastic_recon_subset,
    "importance_minimality": _importance_minimality,
    "ci_masked_recon": _ci_masked_recon,
    "ci_masked_recon_layerwise": _ci_masked_recon_layerwise,
    "ci_masked_recon_subset": _ci_masked_recon_subset,
    "unmasked_recon": _unmasked_recon,
    "pgd_recon": _pgd_recon,
    "pgd_recon_layerwise": _pgd_recon_layerwise,
    "pgd_recon_subset": _pgd_recon_subset,
    "stochastic_hidden_acts_recon": _stochastic_hidden_acts_recon,
}


def ci_l0(ci_lower: dict[str, Array], threshold: float = 0.1) -> dict[str, Array]:
    """Mean number of subcomponents per input (position) with CI > threshold, per site."""
    return {n: jnp.mean(jnp.sum(g > threshold, axis=-1).astype(jnp.float32)) for n, g in ci_lower.items()}


def loss_fn(
    params: SPDParams,
    target: Target,
    batch: Any,
    key: Array,
    config: LossConfig = LossConfig(),
    progress: float | Array = 0.0,
    extra_terms: tuple[str, ...] = (),
) -> tuple[Float[Array, ""], dict[str, Array]]:
    """The SPD loss: `sum_i coeff_i * term_i` over `config.coeffs`, and its metrics.

    Pure, jittable (`jax.jit(loss_fn)` works as is: `target` and `config` carry their static parts)
    and differentiable in `params`. `progress` (fraction of training done) drives p-annealing.
    `extra_terms` are computed for the metrics only (evaluation), with coefficient 0.

    Returns `(loss, metrics)`; metrics hold every computed term under `loss/<term>`, the total under
    `loss/total`, `ci_l0/<site>` and the current `p`.
    """
    check_params(params, target)
    out, inputs = clean_forward(target, batch)
    ci = compute_ci(params, target, inputs, config.sigmoid)
    ctx = LossContext(params, target, batch, out, inputs, ci, key, config, jnp.asarray(progress))
    coeffs = config.coeff_dict
    metrics: dict[str, Array] = {}
    total = jnp.zeros((), jnp.float32)
    for name in list(coeffs) + [t for t in extra_terms if t not in coeffs]:
        if name not in TERMS:
            raise ValueError(f"unknown loss term {name!r}; allowed: {sorted(TERMS)}")
        value = TERMS[name](ctx)
        metrics[f"loss/{name}"] = value
        if coeffs.get(name, 0.0) != 0.0:
            total = total + coeffs[name] * value
    metrics["loss/total"] = total
    for n, v in ci_l0(ci.lower, config.ci_l0_threshold).items():
        metrics[f"ci_l0/{n}"] = v
    metrics["p"] = jnp.asarray(annealed_p(config, ctx.progress), jnp.float32)
    return total, metrics


def loss_config_from(section) -> LossConfig:
    """The `loss` section of a run config (ConfigDict, dict or None) -> `LossConfig`; errors name the field."""
    values = to_dict(section, "loss")
    coeffs = values.pop("coeffs", None)
    if coeffs is not None:
        coeffs = to_dict(coeffs, "loss.coeffs")
        for k, v in coeffs.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ValueError(f"config.loss.coeffs.{k} must be a number, got {v!r}")
        values["coeffs"] = tuple((k, float(v)) for k, v in coeffs.items())
    try:
        return dataclass_from(LossConfig, values, "loss")
    except TypeError as e:
        raise ValueError(f"config.loss: {e}") from None

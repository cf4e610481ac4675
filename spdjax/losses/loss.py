"""`loss_fn`: the configured terms composed into the SPD loss, and its metrics."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from jaxtyping import Array, Float

from spdjax.decomposition import SPDParams, check_params
from spdjax.losses.config import LossConfig
from spdjax.losses.forward import (
    batch_position_weight,
    clean_forward,
    clean_inner_acts,
    clean_reads,
    compute_ci,
    low_rank_outputs,
    position_weights,
    shared_inner_acts,
    vocab_chunks,
)
from spdjax.losses.registry import TERMS, LossContext, TermOptions
from spdjax.losses.terms import annealed_p
from spdjax.targets.base import Target


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
    extra_terms: tuple[str | tuple[str, TermOptions], ...] = (),
) -> tuple[Float[Array, ""], dict[str, Array]]:
    """The SPD loss: `sum_i coeff_i * term_i` over `config.terms`, and its metrics.

    Pure, jittable (`jax.jit(loss_fn)` works as is: `target` and `config` carry their static parts)
    and differentiable in `params`. `progress` (fraction of training done) drives p-annealing.
    `extra_terms` are computed for the metrics only (evaluation), never added: names (with
    `config.options_for(name)`) or `(name, options)` pairs.

    Sequence models: CI and masks are per token (`(batch, positions, C)`); a dict batch may carry
    `batch["loss_mask"]` `(batch, positions)`, the weight of each position in every output divergence
    (e.g. 1 on the positions whose next-token prediction counts); the target's own call then picks
    its input from the dict (`spdjax.from_nnx(model, ..., call=lambda m, b: m(b["tokens"]))`).

    Returns `(loss, metrics)`; metrics hold every computed term under `loss/<term>`, the total under
    `loss/total`, `ci_l0/<site>` (mean over every position) and the current `p`.
    """
    check_params(params, target)
    out, inputs = clean_forward(target, batch)
    inner = None if config.remat else clean_inner_acts(params, target, inputs)
    ci = compute_ci(params, target, inputs, config.sigmoid, config.remat, inner)
    ctx = LossContext(params, target, batch, out, inputs, ci, key, config, jnp.asarray(progress))
    configured = config.term_dict
    todo = list(config.terms)
    for t in extra_terms:
        name, opts = t if isinstance(t, tuple) else (t, None)
        if name not in TERMS:
            raise ValueError(f"unknown loss term {name!r}; allowed: {sorted(TERMS)}")
        if name not in configured and name not in [n for n, _ in todo]:
            todo.append((name, config.options_for(name) if opts is None else opts))
    metrics: dict[str, Array] = {}
    total = jnp.zeros((), jnp.float32)
    with (
        position_weights(batch_position_weight(batch)),
        vocab_chunks(config.vocab_chunk),
        shared_inner_acts(inner),
        low_rank_outputs(clean_reads(params, target, inputs) if config.low_rank_outputs else None),
    ):
        for name, opts in todo:
            value = TERMS[name](ctx, opts)
            metrics[f"loss/{name}"] = value
            if name in configured and opts.coeff != 0.0:
                total = total + opts.coeff * value
    metrics["loss/total"] = total
    for n, v in ci_l0(ci.lower, config.ci_l0_threshold).items():
        metrics[f"ci_l0/{n}"] = v
    metrics["p"] = jnp.asarray(annealed_p(config.options_for("importance_minimality"), ctx.progress), jnp.float32)
    return total, metrics

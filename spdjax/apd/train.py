"""APD optimisation: Adam (no weight decay) with the reference's LR schedule, the unit-norm constraint
on A, and one jitted train step (state in, state out, state donated).

Schedule (ApolloResearch/apd): linear warm-up `lr * t / W` for `t < W = int(warmup_frac * steps)`,
then `lr * s(t)` with `s` = 1 (`constant`), `cos(pi/2 * t / (T - 1))` (`cosine`, a quarter cosine to 0
on the absolute step) or `1 - t / (T - 1)` (`linear`).

Unit norm (`APDConfig.unit_norm_A`): before every step each column `A_{c,l,:,m}` is normalised over
d_in; after backward the radial part of A's gradient is projected out, `g <- g - <g, a> a`.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from spdjax.apd.components import APDComponents, APDParams
from spdjax.apd.losses import APDConfig, apd_loss_fn
from spdjax.train import OptimConfig, TrainState

SCHEDULES = ("constant", "cosine", "linear")


def make_schedule(optim: OptimConfig) -> Callable[[Any], Any]:
    if optim.schedule not in SCHEDULES:
        raise ValueError(f"optim.schedule: unknown {optim.schedule!r} for APD; allowed: {list(SCHEDULES)}")
    lr, T = float(optim.lr), int(optim.steps)
    W = int(optim.warmup_frac * T)
    denom = max(T - 1, 1)

    def schedule(count):
        t = jnp.asarray(count, jnp.float32)
        if optim.schedule == "constant":
            main = jnp.full((), lr, jnp.float32)
        elif optim.schedule == "cosine":
            # clamped: float32 cos(pi/2) is -4e-8, which would make the last step's lr negative
            main = lr * jnp.maximum(jnp.cos(0.5 * math.pi * t / denom), 0.0)
        else:
            main = lr * jnp.maximum(1.0 - t / denom, 0.0)
        if W == 0:
            return main
        return jnp.where(t < W, lr * t / W, main)

    return schedule


def check_optim(optim: OptimConfig) -> None:
    """APD has no faithfulness warm-up and no gradient clipping: refuse settings that would be ignored."""
    if optim.faithfulness_warmup_steps:
        raise ValueError("optim.faithfulness_warmup_steps must be 0 for APD (faithfulness is a loss term)")
    if optim.clip_components is not None or optim.clip_ci is not None:
        raise ValueError("optim.clip_components / clip_ci are not supported for APD; leave them unset")


def make_optimizer(optim: OptimConfig) -> optax.GradientTransformation:
    return optax.adam(make_schedule(optim), b1=0.9, b2=0.999, eps=1e-8)


def normalize_A(params: APDParams) -> APDParams:
    """Every column `A_{c,l,:,m}` scaled to unit norm over d_in."""
    return APDParams({
        n: APDComponents(A=c.A / jnp.linalg.norm(c.A, axis=1, keepdims=True), B=c.B)
        for n, c in params.components.items()
    })


def project_A_grads(grads: APDParams, params: APDParams) -> APDParams:
    """Remove the radial part of A's gradient (A's columns unit norm): `g - <g, a> a` per column."""
    out = {}
    for n, g in grads.components.items():
        a = params.components[n].A
        out[n] = APDComponents(A=g.A - jnp.sum(g.A * a, axis=1, keepdims=True) * a, B=g.B)
    return APDParams(out)


def make_train_step(
    config: APDConfig, optimizer: optax.GradientTransformation, batch_fn: Callable, schedule=None
):
    """`step(state, target, batch=None) -> (state, metrics)`, jitted with the state donated.

    Batches are sampled inside the step from `fold_in(fold_in(key, step), 0)` (the data stream is a
    pure function of (seed, step), as in SPD), unless one is passed.
    """

    def step(state: TrainState, target, batch=None):
        key = jax.random.fold_in(state.key, state.step)
        if batch is None:
            batch = batch_fn(jax.random.fold_in(key, 0))
        params = normalize_A(state.params) if config.unit_norm_A else state.params
        (loss, metrics), grads = jax.value_and_grad(apd_loss_fn, has_aux=True)(
            params, target, batch, jax.random.fold_in(key, 1), config
        )
        if config.unit_norm_A:
            grads = project_A_grads(grads, params)
        updates, opt_state = optimizer.update(grads, state.opt_state, params)
        new = optax.apply_updates(params, updates)
        metrics = dict(metrics)
        metrics["grad_norm/components"] = optax.tree.norm(grads)
        if schedule is not None:
            metrics["lr"] = schedule(state.step)
        return TrainState(state.step + 1, new, opt_state, state.key), metrics

    return jax.jit(step, donate_argnums=0)

"""Optimisation: Adam with warm-up + constant/linear/cosine schedules, per-group gradient clipping,
the faithfulness warm-up, and one jitted train step (state in, state out, state donated).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Iterator, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array

from spdjax import sharding
from spdjax.components import faithfulness_loss
from spdjax.decomposition import SPDParams
from spdjax.losses import LossConfig, loss_fn
from spdjax.targets.base import Target

SCHEDULES = ("constant", "linear", "cosine")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """Adam (b1 0.9, b2 0.999, eps 1e-8, no weight decay) and its schedule.

    The LR rises linearly from 0 over `warmup_frac * steps`, then follows `schedule` from `lr` down to
    `final_lr_frac * lr` at step `steps` (`constant` stays at `lr`).
    """

    steps: int
    lr: float = 1e-3
    schedule: str = "cosine"
    warmup_frac: float = 0.0
    final_lr_frac: float = 0.0
    clip_components: float | None = None  # max global grad norm of U, V (None: no clipping)
    clip_ci: float | None = None  # max global grad norm of the CI functions
    faithfulness_warmup_steps: int = 200  # reference-main recipe; 0 for the paper recipe
    faithfulness_warmup_lr: float = 0.01
    faithfulness_warmup_weight_decay: float = 0.1

    def __post_init__(self):
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"optim.steps must be an int >= 1, got {self.steps!r}")
        if not self.lr > 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"optim.schedule: unknown {self.schedule!r}; allowed: {list(SCHEDULES)}")
        for f in ("warmup_frac", "final_lr_frac"):
            v = getattr(self, f)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"optim.{f} must be in [0, 1], got {v!r}")
        for f in ("faithfulness_warmup_lr", "faithfulness_warmup_weight_decay"):
            v = getattr(self, f)
            if not v >= 0 or (f.endswith("lr") and v == 0):
                raise ValueError(f"optim.{f} must be {'> 0' if f.endswith('lr') else '>= 0'}, got {v!r}")
        for f in ("clip_components", "clip_ci"):
            v = getattr(self, f)
            if v is not None and not v > 0:
                raise ValueError(f"optim.{f} must be > 0 or None, got {v!r}")
        if self.faithfulness_warmup_steps < 0:
            raise ValueError(
                f"optim.faithfulness_warmup_steps must be >= 0, got {self.faithfulness_warmup_steps!r}"
            )


def make_schedule(cfg: OptimConfig) -> optax.Schedule:
    warm = int(round(cfg.warmup_frac * cfg.steps))
    rest = max(cfg.steps - warm, 1)
    final = cfg.lr * cfg.final_lr_frac
    if cfg.schedule == "constant":
        main = optax.constant_schedule(cfg.lr)
    elif cfg.schedule == "linear":
        main = optax.linear_schedule(cfg.lr, final, rest)
    else:
        main = optax.cosine_decay_schedule(cfg.lr, rest, alpha=cfg.final_lr_frac)
    if warm == 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warm), main], [warm])


def clip_by_group(clip_components: float | None, clip_ci: float | None) -> optax.GradientTransformation:
    """Clip the global gradient norm of the components and of the CI functions separately."""

    def init_fn(params):
        return optax.EmptyState()

    def clip(tree, max_norm):
        if max_norm is None:
            return tree
        norm = optax.tree.norm(tree)
        scale = jnp.minimum(1.0, max_norm / jnp.maximum(norm, 1e-12))
        return jax.tree.map(lambda g: g * scale, tree)

    def update_fn(updates: SPDParams, state, params=None):
        return SPDParams(clip(updates.components, clip_components), clip(updates.ci, clip_ci)), state

    return optax.GradientTransformation(init_fn, update_fn)


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
    return optax.chain(
        clip_by_group(cfg.clip_components, cfg.clip_ci),
        optax.adam(make_schedule(cfg), b1=0.9, b2=0.999, eps=1e-8),
    )


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
    step: Array  # int32 scalar: optimiser steps taken
    params: SPDParams
    opt_state: Any
    key: Array  # base key; the step key is fold_in(key, step)


def init_train_state(params: Any, optimizer: optax.GradientTransformation, key: Array) -> TrainState:
    """Step 0 of any method's params pytree (SPD, APD), with fresh optimiser state."""
    return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params), key)


def faithfulness_warmup(params: SPDParams, target: Target, cfg: OptimConfig) -> SPDParams:
    """`faithfulness_warmup_steps` of AdamW on the faithfulness loss alone (components only), in one jit."""
    n = cfg.faithfulness_warmup_steps
    if n == 0:
        return params
    opt = optax.adamw(cfg.faithfulness_warmup_lr, weight_decay=cfg.faithfulness_warmup_weight_decay)

    @jax.jit
    def run(components, target):
        kernels = target.kernels()

        def step(carry, _):
            comps, st = carry
            g = jax.grad(faithfulness_loss)(comps, kernels, target.sites)
            upd, st = opt.update(g, st, comps)
            return (optax.apply_updates(comps, upd), st), None

        (comps, _), _ = jax.lax.scan(step, (components, opt.init(components)), None, length=n)
        return comps

    return SPDParams(run(params.components, target), params.ci)


def make_train_step(
    loss_config: LossConfig,
    optimizer: optax.GradientTransformation,
    total_steps: int,
    batch_fn: Callable[[Array], Any] | None = None,
    schedule: optax.Schedule | None = None,
    mesh: jax.sharding.Mesh | None = None,
    shardings: Any = None,
):
    """`step(state, target, batch=None) -> (state, metrics)`, jitted with the state donated.

    With `batch_fn(key)`, batches are sampled inside the step from `fold_in(fold_in(key, step), 0)`,
    so a run's data stream is a pure function of (seed, step). Metrics stay on device.

    With a `mesh` (spdjax.sharding), the step is jitted with `shardings` (the state's, from
    `spdjax.sharding.state_shardings`) as the state's input and output shardings, the target and the
    metrics replicated, and the batch sharded over the `data` axis: a sampled batch is constrained
    to it inside the step, so it is drawn as one global array (the same for any device count).
    """
    if mesh is not None and shardings is None:
        raise ValueError("make_train_step: with a mesh, pass shardings=spdjax.sharding.state_shardings(state, mesh)")

    def step(state: TrainState, target: Target, batch=None):
        key = jax.random.fold_in(state.key, state.step)
        if batch is None:
            if batch_fn is None:
                raise ValueError("train step: pass a batch or give make_train_step a batch_fn")
            batch = batch_fn(jax.random.fold_in(key, 0))
            if mesh is not None:
                batch = sharding.constrain_batch(batch, mesh)
        progress = state.step.astype(jnp.float32) / total_steps
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, target, batch, jax.random.fold_in(key, 1), loss_config, progress
        )
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = dict(metrics)
        metrics["grad_norm/components"] = optax.tree.norm(grads.components)
        metrics["grad_norm/ci"] = optax.tree.norm(grads.ci)
        if schedule is not None:
            metrics["lr"] = schedule(state.step)
        return TrainState(state.step + 1, params, opt_state, state.key), metrics

    if mesh is None:
        return jax.jit(step, donate_argnums=0)
    rep = sharding.replicated(mesh)
    jitted = jax.jit(
        step,
        in_shardings=(shardings, rep, sharding.batch_sharding(mesh)),
        out_shardings=(shardings, rep),
        donate_argnums=0,
    )

    def sharded_step(state: TrainState, target: Target, batch=None):
        return jitted(state, target, batch)  # in_shardings cover all three positional arguments

    sharded_step.lower = lambda state, target, batch=None: jitted.lower(state, target, batch)
    return sharded_step


class LogRecord(NamedTuple):
    step: int
    metrics: dict[str, float]
    wall_time_s: float


class NonFiniteError(RuntimeError):
    """A loss term or a parameter became NaN/Inf; raised before anything bad is checkpointed."""


def params_finite(params) -> Array:
    """Scalar bool: every parameter is finite."""
    leaves = jax.tree.leaves(params)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


_params_finite = jax.jit(params_finite)


def _check_finite(step: int, metrics: dict[str, float], params) -> None:
    _check_finite_metrics(step, metrics)
    if not bool(_params_finite(params)):
        raise NonFiniteError(f"step {step}: a parameter became non-finite (all loss terms were finite)")


def run_steps(
    state: TrainState,
    step_fn,
    target: Target,
    total_steps: int,
    batches: Iterator[Any] | None = None,
    log_every: int = 100,
    on_log: Callable[[LogRecord], None] | None = None,
    checkpoint: Callable[[TrainState], None] | None = None,
    checkpoint_every: int | None = None,
    progress_bar: bool = False,
    bar_ref: dict | None = None,
    evaluate: Callable[[TrainState], None] | None = None,
    eval_every: int | None = None,
) -> TrainState:
    """Step `state` from `state.step` to `total_steps`.

    Metrics reach the host only on log and checkpoint steps, where they (and, before a checkpoint,
    the parameters) are checked for NaN/Inf: a `NonFiniteError` names the step and the loss terms, and
    nothing non-finite is ever checkpointed. `checkpoint(state)` runs every `checkpoint_every` steps
    and at the end; `evaluate(state)` every `eval_every` steps and at the end.
    """
    start = int(state.step)
    bar = None
    if progress_bar:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, initial=start, dynamic_ncols=True, unit="step")
        if bar_ref is not None:
            bar_ref["bar"] = bar
    t0 = time.perf_counter()
    try:
        for i in range(start, total_steps):
            batch = next(batches) if batches is not None else None
            state, metrics = step_fn(state, target, batch)
            step = i + 1
            is_log = step % log_every == 0 or step == total_steps
            is_ckpt = checkpoint is not None and (
                step == total_steps or (checkpoint_every and step % checkpoint_every == 0)
            )
            if is_log or is_ckpt:
                host = {k: float(np.asarray(v)) for k, v in jax.device_get(metrics).items()}
                if is_ckpt:
                    _check_finite(step, host, state.params)
                else:
                    _check_finite_metrics(step, host)
                if is_log:
                    rec = LogRecord(step, host, time.perf_counter() - t0)
                    if on_log is not None:
                        on_log(rec)
                if is_ckpt:
                    checkpoint(state)
            if evaluate is not None and eval_every and (step % eval_every == 0 or step == total_steps):
                evaluate(state)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return state


def _check_finite_metrics(step: int, metrics: dict[str, float]) -> None:
    bad = sorted(k for k, v in metrics.items() if not np.isfinite(v))
    if bad:
        raise NonFiniteError(f"step {step}: non-finite value in {', '.join(bad)}")


def train(
    target: Target,
    params: SPDParams,
    loss_config: LossConfig,
    optim: OptimConfig,
    key: Array,
    batch_fn: Callable[[Array], Any] | None = None,
    batches: Iterator[Any] | None = None,
    log_every: int = 100,
    on_log: Callable[[LogRecord], None] | None = None,
    progress_bar: bool = False,
    bar_ref: dict | None = None,
    mesh: jax.sharding.Mesh | None = None,
) -> tuple[TrainState, list[LogRecord]]:
    """Faithfulness warm-up, then `optim.steps` jitted steps. Metrics reach the host on log steps only.

    Give either `batch_fn(key) -> batch` (sampled on device inside the step) or an iterator `batches`.
    With a `mesh` (spdjax.sharding.make_mesh) the state is placed on it (params and Adam state by
    role, see spdjax.sharding) and batches are sharded over its `data` axis; host-side `batches` are
    each process's own rows, assembled into global arrays.
    """
    if (batch_fn is None) == (batches is None):
        raise ValueError("train: give exactly one of batch_fn or batches")
    params = jax.tree.map(jnp.copy, params)  # the jitted step donates its state: keep the caller's
    key = jnp.copy(key)
    shardings = None
    if mesh is not None:
        params = sharding.place(params, sharding.param_shardings(params, mesh))
        target = sharding.place(target, sharding.replicated(mesh))
        if batches is not None:
            batches = (sharding.global_batch(b, mesh) for b in batches)
    params = faithfulness_warmup(params, target, optim)
    optimizer = make_optimizer(optim)
    state = init_train_state(params, optimizer, key)
    if mesh is not None:
        shardings = sharding.state_shardings(state, mesh)
        state = sharding.place(state, shardings)
    step_fn = make_train_step(
        loss_config, optimizer, optim.steps, batch_fn, make_schedule(optim), mesh=mesh, shardings=shardings
    )
    history: list[LogRecord] = []

    def log(rec: LogRecord):
        history.append(rec)
        if on_log is not None:
            on_log(rec)

    state = run_steps(
        state, step_fn, target, optim.steps, batches, log_every, log,
        progress_bar=progress_bar, bar_ref=bar_ref,
    )
    return state, history

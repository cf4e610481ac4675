"""One jitted train step for every method (state in, state out, state donated) and the step loop.

`make_train_step(method, ...)` differentiates `method.loss` and applies the method's parameter hooks
and optimiser; `run_steps` drives it with logging, checkpoint and evaluation hooks. `train(...)` is
the library entry point for research code (SPD on any target, no workdir).
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
from spdjax.decomposition import SPDParams
from spdjax.losses import LossConfig
from spdjax.method import Method
from spdjax.optim import OptimConfig, make_schedule
from spdjax.spd import SPD, faithfulness_warmup, spd_optimizer
from spdjax.targets.base import Target


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
    step: Array  # int32 scalar: optimiser steps taken
    params: Any  # the method's parameters (SPDParams, APDParams, ...)
    opt_state: Any
    key: Array  # base key; the step key is fold_in(key, step)


def init_train_state(params: Any, optimizer: optax.GradientTransformation, key: Array) -> TrainState:
    """Step 0 of any method's params pytree, with fresh optimiser state."""
    return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params), key)


def cast_floats(tree: Any, dtype) -> Any:
    """Every floating leaf of `tree` as `dtype` (others unchanged)."""
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def make_train_step(
    method: Method,
    optimizer: optax.GradientTransformation,
    total_steps: int,
    batch_fn: Callable[[Array], Any] | None = None,
    schedule: optax.Schedule | None = None,
    mesh: jax.sharding.Mesh | None = None,
    shardings: Any = None,
    compute_dtype=None,
    target_shardings: Any = None,
):
    """`step(state, target, batch=None) -> (state, metrics)`, jitted with the state donated.

    With `batch_fn(key)`, batches are sampled inside the step from `fold_in(fold_in(key, step), 0)`,
    so a run's data stream is a pure function of (seed, step). Metrics stay on device.

    `compute_dtype` (e.g. `jnp.bfloat16`): the loss sees the parameters, target and batch cast to it
    while the optimiser updates the parameters in their own dtype (master weights); None: no cast.

    With a `mesh` (spdjax.sharding), the step is jitted with `shardings` (the state's, from
    `spdjax.sharding.state_shardings`) as the state's input and output shardings, the target on
    `target_shardings` (default replicated; `spdjax.sharding.target_shardings`), the metrics replicated, and the batch sharded over the `data` axis: a sampled batch is constrained
    to it inside the step, so it is drawn as one global array (the same for any device count).
    """
    if mesh is not None and shardings is None:
        raise ValueError("make_train_step: with a mesh, pass shardings=spdjax.sharding.state_shardings(...)")

    def loss(params, target, batch, key, progress):
        if compute_dtype is None:
            return method.loss(params, target, batch, key, progress)
        cast = lambda t: cast_floats(t, compute_dtype)  # noqa: E731
        value, metrics = method.loss(cast(params), cast(target), cast(batch), key, progress)
        return value.astype(jnp.float32), cast_floats(metrics, jnp.float32)

    def step(state: TrainState, target: Target, batch=None):
        key = jax.random.fold_in(state.key, state.step)
        if batch is None:
            if batch_fn is None:
                raise ValueError("train step: pass a batch or give make_train_step a batch_fn")
            batch = batch_fn(jax.random.fold_in(key, 0))
            if mesh is not None:
                batch = sharding.constrain_batch(batch, mesh)
        progress = state.step.astype(jnp.float32) / total_steps
        params = method.constrain(state.params)
        (_, metrics), grads = jax.value_and_grad(loss, has_aux=True)(
            params, target, batch, jax.random.fold_in(key, 1), progress
        )
        grads = method.project_grads(grads, params)
        updates, opt_state = optimizer.update(grads, state.opt_state, params)
        metrics = dict(metrics)
        metrics.update(method.grad_metrics(grads))
        if schedule is not None:
            metrics["lr"] = schedule(state.step)
        return TrainState(state.step + 1, optax.apply_updates(params, updates), opt_state, state.key), metrics

    if mesh is None:
        return jax.jit(step, donate_argnums=0)
    rep = sharding.replicated(mesh)
    jitted = jax.jit(
        step,
        in_shardings=(shardings, rep if target_shardings is None else target_shardings, sharding.batch_sharding(mesh)),
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


def _check_finite_metrics(step: int, metrics: dict[str, float]) -> None:
    bad = sorted(k for k, v in metrics.items() if not np.isfinite(v))
    if bad:
        raise NonFiniteError(f"step {step}: non-finite value in {', '.join(bad)}")


@dataclasses.dataclass(frozen=True)
class Cadence:
    """When the loop logs, checkpoints and evaluates (every N steps, and always at the last step).
    `checkpoint_every=None`: only at the end; `eval_every=None`: never."""

    total_steps: int
    log_every: int = 100
    checkpoint_every: int | None = None
    eval_every: int | None = None


class Hooks:
    """What the loop calls; override what you need (the defaults do nothing).

    `checkpoints = False` skips checkpoint steps altogether (and their parameter finiteness check).
    `stop_requested()` is asked after every step: True makes that step a log and checkpoint step and
    then ends the loop with `Interrupted` (preemption: SIGTERM / SIGINT).
    """

    checkpoints: bool = False

    def on_log(self, record: LogRecord) -> None:
        pass

    def on_checkpoint(self, state: TrainState) -> None:
        pass

    def on_eval(self, state: TrainState) -> None:
        pass

    def stop_requested(self) -> bool:
        return False


class Interrupted(Exception):
    """The loop stopped early at `step` because `Hooks.stop_requested()` said so (after checkpointing)."""

    def __init__(self, step: int):
        super().__init__(f"stopped after step {step}")
        self.step = step


def format_metrics(metrics: dict[str, float]) -> str:
    keys = [k for k in metrics if k.startswith("loss/")] + [k for k in metrics if k.startswith("ci_l0/")]
    return " ".join(f"{k.split('/', 1)[1]}={metrics[k]:.4g}" for k in keys)


def run_steps(
    state: TrainState,
    step_fn,
    target: Target,
    cadence: Cadence,
    hooks: Hooks | None = None,
    batches: Iterator[Any] | None = None,
    progress_bar: bool = False,
) -> TrainState:
    """Step `state` from `state.step` to `cadence.total_steps`.

    Metrics stay on device between log and checkpoint steps; there every step's metrics since the
    last fetch reach the host together and are checked for NaN/Inf in order (and, before a checkpoint,
    the parameters too): a `NonFiniteError` names the first bad step and its terms, and nothing
    non-finite is ever checkpointed. At a step that is both, the evaluation runs before the
    checkpoint (a kill during it re-runs it on resume). `batches` (host-side) gives one batch per
    step; without it the step samples its own.
    """
    hooks = hooks or Hooks()
    total, start = cadence.total_steps, int(state.step)
    bar = None
    if progress_bar:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=start, dynamic_ncols=True, unit="step")
    t0 = time.perf_counter()
    pending: list[tuple[int, Any]] = []  # (step, device metrics) not yet checked
    try:
        for i in range(start, total):
            batch = next(batches) if batches is not None else None
            state, metrics = step_fn(state, target, batch)
            step = i + 1
            pending.append((step, metrics))
            stop = hooks.stop_requested()
            last = step == total
            is_log = step % cadence.log_every == 0 or last or stop
            is_ckpt = hooks.checkpoints and (
                last or stop or bool(cadence.checkpoint_every and step % cadence.checkpoint_every == 0)
            )
            if is_log or is_ckpt:
                host = _check_pending(pending)
                pending = []
                if is_ckpt and not bool(_params_finite(state.params)):
                    raise NonFiniteError(f"step {step}: a parameter became non-finite (all loss terms were finite)")
                if is_log:
                    hooks.on_log(LogRecord(step, host, time.perf_counter() - t0))
                    if bar is not None:
                        bar.set_postfix_str(format_metrics(host), refresh=False)
            if cadence.eval_every and (step % cadence.eval_every == 0 or last):
                hooks.on_eval(state)
            if is_ckpt:
                hooks.on_checkpoint(state)
            if bar is not None:
                bar.update(1)
            if stop:
                raise Interrupted(step)
    finally:
        if bar is not None:
            bar.close()
    return state


def _check_pending(pending: list[tuple[int, Any]]) -> dict[str, float]:
    """Host copies of the pending steps' metrics, checked in order; the last step's metrics."""
    hosts = jax.device_get([m for _, m in pending])
    host = {}
    for (step, _), m in zip(pending, hosts):
        host = {k: float(np.asarray(v)) for k, v in m.items()}
        _check_finite_metrics(step, host)
    return host


class _History(Hooks):
    def __init__(self, on_log: Callable[[LogRecord], None] | None):
        self.records: list[LogRecord] = []
        self._on_log = on_log

    def on_log(self, record: LogRecord) -> None:
        self.records.append(record)
        if self._on_log is not None:
            self._on_log(record)


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
    mesh: jax.sharding.Mesh | None = None,
) -> tuple[TrainState, list[LogRecord]]:
    """SPD in research code: faithfulness warm-up, then `optim.steps` jitted steps (no workdir).

    Give either `batch_fn(key) -> batch` (sampled on device inside the step) or an iterator `batches`.
    With a `mesh` (spdjax.sharding.make_mesh) the state is placed on it (params and Adam state by
    role, see spdjax.sharding) and batches are sharded over its `data` axis; host-side `batches` are
    each process's own rows, assembled into global arrays. Metrics reach the host on log steps only.
    """
    if (batch_fn is None) == (batches is None):
        raise ValueError("train: give exactly one of batch_fn or batches")
    method = SPD.with_loss(loss_config)
    params = jax.tree.map(jnp.copy, params)  # the jitted step donates its state: keep the caller's
    key = jnp.copy(key)
    shardings = None
    if mesh is not None:
        params = sharding.place(params, sharding.param_shardings(params, mesh))
        target = sharding.place(target, sharding.replicated(mesh))
        if batches is not None:
            batches = (sharding.global_batch(b, mesh) for b in batches)
    params = faithfulness_warmup(params, target, optim)
    optimizer = spd_optimizer(optim)
    state = init_train_state(params, optimizer, key)
    if mesh is not None:
        shardings = sharding.state_shardings(state, mesh)
        state = sharding.place(state, shardings)
    step_fn = make_train_step(
        method, optimizer, optim.steps, batch_fn, make_schedule(optim), mesh=mesh, shardings=shardings
    )
    history = _History(on_log)
    state = run_steps(state, step_fn, target, Cadence(optim.steps, log_every), history, batches, progress_bar)
    return state, history.records

"""A whole decomposition run: config -> target -> train (checkpointed, resumable) -> export -> summary.

Writes into the workdir: `config.json`, `checkpoints/` (Orbax), `metrics.jsonl` (one line per log
step), `eval.jsonl` (one line per held-out evaluation, keys `eval/...`), `tensorboard/`, `decomposition/` (the final decomposition, see spdjax.export),
`summary.json` (flat keys) and the experiment's figures.

Re-running the same command with the same workdir resumes from the newest complete checkpoint and
ends bit-for-bit where an uninterrupted run would have ended (same machine). A workdir whose saved
config differs is refused, listing the differing fields, unless `fresh` (start over) or
`allow_config_change` is given.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import time
from pathlib import Path
from typing import Callable

import jax
import ml_collections

from spdjax import export, sharding
from spdjax.checkpoint import Checkpointer
from spdjax.config import RunConfig, parse
from spdjax.decomposition import init_decomposition
from spdjax.metrics_writer import MetricsWriter
from spdjax.train import (
    LogRecord,
    TrainState,
    faithfulness_warmup,
    init_train_state,
    make_optimizer,
    make_schedule,
    make_train_step,
    run_steps,
)


class ConfigMismatchError(ValueError):
    """The workdir holds a run with a different config."""


def _flatten(d, prefix=""):
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_diff(old: dict, new: dict) -> list[str]:
    """`["field: old -> new", ...]` over the flattened configs."""
    a, b = _flatten(old), _flatten(new)
    return [
        f"{k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}"
        for k in sorted(set(a) | set(b))
        if a.get(k, "<absent>") != b.get(k, "<absent>")
    ]


def _config_json(cfg: ml_collections.ConfigDict) -> dict:
    return json.loads(cfg.to_json_best_effort())


def prepare_workdir(cfg, workdir: Path, fresh: bool, allow_config_change: bool) -> None:
    """Check the workdir against `cfg` (see the module docstring) and write config.json."""
    workdir.mkdir(parents=True, exist_ok=True)
    new = _config_json(cfg)
    saved = workdir / "config.json"
    if fresh:
        for name in ("checkpoints", "tensorboard", "decomposition"):
            shutil.rmtree(workdir / name, ignore_errors=True)
        for name in ("metrics.jsonl", "eval.jsonl", "summary.json"):
            (workdir / name).unlink(missing_ok=True)
    elif saved.exists() and (workdir / "checkpoints").exists():
        diff = config_diff(json.loads(saved.read_text()), new)
        diff = [d for d in diff if not d.startswith("mesh.")]  # resuming on another mesh is fine
        if diff and not allow_config_change:
            raise ConfigMismatchError(
                f"workdir {workdir} holds a run with a different config ({'; '.join(diff)}); pass "
                "--fresh to start over or --allow_config_change to resume with the new config"
            )
    saved.write_text(json.dumps(new, indent=2))


def _fmt(metrics: dict[str, float]) -> str:
    keys = [k for k in metrics if k.startswith("loss/")] + [k for k in metrics if k.startswith("ci_l0/")]
    return " ".join(f"{k.split('/', 1)[1]}={metrics[k]:.4g}" for k in keys)


class _Stop(Exception):
    pass


def run(
    cfg: ml_collections.ConfigDict,
    workdir: str | Path,
    cache_dir: str | Path,
    quiet: bool = False,
    fresh: bool = False,
    allow_config_change: bool = False,
    stop_at_step: int | None = None,
    wandb_project: str | None = None,
) -> dict | None:
    """Run (or resume) the decomposition described by `cfg`; returns the summary (also in summary.json).

    `stop_at_step` ends the session right after that step's checkpoint, as a preemption would (for
    tests); it returns None. `wandb_project` also logs the training metrics to Weights & Biases (the
    `wandb` package must be installed).
    """
    import experiments

    if cfg.get("method", "spd") == "apd":
        from spdjax.apd.run import apd_run

        return apd_run(cfg, workdir, cache_dir, quiet, fresh, allow_config_change, stop_at_step, wandb_project)
    rc: RunConfig = parse(cfg)
    if wandb_project and importlib.util.find_spec("wandb") is None:
        raise ImportError(f"--wandb_project={wandb_project!r} needs the wandb package: pip install wandb")
    workdir = Path(workdir)
    mesh = sharding.make_mesh(rc.mesh)  # one-line errors for a mesh that does not fit the devices
    sharding.check_batch_size(rc.batch_size, mesh)
    sharding.check_batch_size(rc.eval_batch_size, mesh, "eval_batch_size")
    lead = jax.process_index() == 0  # only process 0 logs and writes outputs (checkpoints: all)
    if lead:
        prepare_workdir(cfg, workdir, fresh, allow_config_change)
    _sync("spdjax_prepare_workdir")
    if not lead:  # process 0 trains and caches the target first; the others then load it
        _sync("spdjax_target_cached")
    exp = experiments.build(rc, Path(cache_dir))
    if lead:
        _sync("spdjax_target_cached")
    key = jax.random.key(rc.seed)
    optimizer = make_optimizer(rc.optim)
    target = sharding.place(exp.target, sharding.replicated(mesh))

    def fresh_state(target):
        params = init_decomposition(jax.random.fold_in(key, 0), target, rc.ci_type, rc.ci_hidden)
        params = faithfulness_warmup(params, target, rc.optim)
        return init_train_state(params, optimizer, jax.random.fold_in(key, 1))

    abstract = jax.eval_shape(fresh_state, target)
    shardings = sharding.state_shardings(abstract, mesh)  # raises if mesh.model does not divide a C
    if not quiet and lead and (mesh.devices.size > 1 or jax.process_count() > 1):
        print(sharding.describe(mesh), flush=True)
    check_batch(exp)
    step_fn = make_train_step(
        rc.loss, optimizer, rc.optim.steps, exp.batch_fn, make_schedule(rc.optim), mesh=mesh, shardings=shardings
    )
    eval_fn = make_eval_fn(rc, exp, mesh)
    eval_key = jax.random.fold_in(key, 2)

    def evaluate(s: TrainState) -> dict | None:
        step = int(s.step)
        figures = rc.figures_every and step % rc.figures_every == 0 and step != rc.optim.steps
        metrics = eval_fn(s.params, target, jax.random.fold_in(eval_key, step))
        host = {k: float(v) for k, v in jax.device_get(metrics).items()}
        params = _params_for_host(s.params, mesh)  # collective: every process takes part
        if not lead:
            return None
        gt = exp.analyze(params, exp.target, workdir / "figures" / f"step_{step}" if figures else None, rc.loss)
        host.update({k: float(v) for k, v in gt.items() if isinstance(v, (int, float))})
        return host

    out = train_session(
        cfg, rc, workdir, abstract, lambda: jax.jit(fresh_state, out_shardings=shardings)(target),
        step_fn, target, evaluate, shardings=shardings, quiet=quiet, lead=lead,
        stop_at_step=stop_at_step, wandb_project=wandb_project,
    )
    if out is None:
        return None
    state, wall = out
    params = _params_for_host(state.params, mesh)  # collective: every process takes part
    result = finish(rc, exp, TrainState(state.step, params, None, None), workdir, wall) if lead else None
    _sync("spdjax_finish")
    return result


def train_session(
    cfg: ml_collections.ConfigDict,
    rc: RunConfig,
    workdir: Path,
    abstract: TrainState,
    init: Callable[[], TrainState],
    step_fn,
    target,
    evaluate: Callable[[TrainState], dict | None],
    *,
    shardings=None,
    quiet: bool = False,
    lead: bool = True,
    stop_at_step: int | None = None,
    wandb_project: str | None = None,
) -> tuple[TrainState, float] | None:
    """The resumable part of a run, shared by every method: restore the newest checkpoint (onto
    `shardings`) or `init()`, then step to `rc.optim.steps` with metrics, held-out evaluation
    (`evaluate(state) -> host metrics`, or None on processes that write nothing) and checkpoints.

    Returns `(final state, wall time including earlier sessions)`, or None when `stop_at_step` ended it.
    """
    ckpt = Checkpointer(workdir / "checkpoints", max_to_keep=rc.keep_checkpoints)
    restored = ckpt.restore_latest(abstract, shardings)  # onto this mesh, whatever mesh saved it
    prior_wall = 0.0
    if restored is not None:
        state, extra = restored
        prior_wall = float(extra.get("wall_time_s", 0.0))
        if not quiet and lead:
            print(f"resuming from the checkpoint at step {int(state.step)}", flush=True)
    else:  # (SPD: initialised directly on the mesh, so no process holds more than its shards)
        state = init()
    resume_step = int(state.step) if restored is not None else None
    writer = MetricsWriter(
        workdir, resume_step=resume_step, wandb_project=wandb_project,
        wandb_run_name=workdir.name, config=_config_json(cfg),
    ) if lead else _NoWriter()
    eval_writer = MetricsWriter(
        workdir, resume_step=resume_step, metrics_file="eval.jsonl", tensorboard_dir="tensorboard/eval"
    ) if lead else _NoWriter()
    bar_ref: dict = {}
    t0 = time.perf_counter()

    def on_log(rec: LogRecord):
        writer.write(rec.step, rec.metrics, wall_time_s=prior_wall + rec.wall_time_s)
        bar = bar_ref.get("bar")
        if bar is not None:
            bar.set_postfix_str(_fmt(rec.metrics), refresh=False)

    def checkpoint(s: TrainState):
        ckpt.save(s, {"wall_time_s": prior_wall + time.perf_counter() - t0})
        if stop_at_step is not None and int(s.step) >= stop_at_step:
            raise _Stop

    def eval_and_write(s: TrainState):
        host = evaluate(s)
        if host is not None:
            eval_writer.write(int(s.step), host, wall_time_s=prior_wall + time.perf_counter() - t0, prefix="eval/")

    try:
        state = run_steps(
            state, step_fn, target, rc.optim.steps, log_every=rc.log_every, on_log=on_log,
            checkpoint=checkpoint, checkpoint_every=rc.checkpoint_every,
            progress_bar=not quiet and lead, bar_ref=bar_ref, evaluate=eval_and_write, eval_every=rc.eval_every,
        )
    except _Stop:
        return None
    finally:
        ckpt.close()
        writer.close()
        eval_writer.close()
    jax.block_until_ready(state.params)
    return state, prior_wall + time.perf_counter() - t0


def _sync(name: str) -> None:
    """A barrier across processes (nothing with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _params_for_host(params, mesh):
    """Params every process can read (gathered from other hosts' shards when there are several)."""
    return sharding.to_host(params, mesh) if jax.process_count() > 1 else params


class _NoWriter:
    """The metrics writer of processes other than 0."""

    def write(self, *args, **kwargs):
        pass

    def close(self):
        pass


def check_batch(exp) -> None:
    """A one-line error, before any compilation, when the experiment's batches do not fit its target."""
    batch = jax.eval_shape(exp.batch_fn, jax.random.key(0))
    try:
        jax.eval_shape(exp.target, batch)
    except Exception as e:  # noqa: BLE001
        shapes = jax.tree.map(lambda x: f"{x.dtype}{list(x.shape)}", batch)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"batch {shapes} does not fit the target: {first}") from None


def make_eval_fn(rc: RunConfig, exp, mesh=None):
    """Jitted `(params, target, key) -> metrics`: every loss term and CI-L0 on a held-out batch
    (sampled sharded over the mesh's `data` axis when a mesh is given; metrics replicated)."""
    from spdjax.losses import TERMS, loss_fn

    def eval_fn(params, target, key):
        batch = exp.batch_fn(jax.random.fold_in(key, 0))
        if mesh is not None:
            batch = sharding.constrain_batch(batch, mesh)
        _, metrics = loss_fn(
            params, target, batch, jax.random.fold_in(key, 1), rc.loss, 1.0, tuple(TERMS)
        )
        return metrics

    return jax.jit(eval_fn, out_shardings=None if mesh is None else sharding.replicated(mesh))


def finish(rc: RunConfig, exp, state: TrainState, workdir: Path, wall: float) -> dict:
    """Export the decomposition, analyse it and write summary.json."""
    export.save(
        workdir / "decomposition", state.params, exp.target.sites, rc.ci_type, rc.ci_hidden,
        extra={"experiment": rc.experiment, "step": int(state.step), **exp.info},
    )
    summary = dict(exp.analyze(state.params, exp.target, workdir, rc.loss))
    last = _last_metrics(workdir / "metrics.jsonl")
    summary.update({f"final/{k}": v for k, v in last.items() if k not in ("step", "wall_time_s")})
    summary["wall_time_s"] = wall
    summary["steps"] = rc.optim.steps
    summary.update({f"target/{k}": v for k, v in exp.info.items()})
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True, default=float))
    return summary


def analyze(cfg: ml_collections.ConfigDict, workdir: str | Path, cache_dir: str | Path) -> dict:
    """Regenerate the summary and every figure from a finished run's exported decomposition."""
    import experiments

    if cfg.get("method", "spd") == "apd":
        from spdjax.apd.run import apd_analyze

        return apd_analyze(cfg, workdir, cache_dir)
    rc = parse(cfg)
    workdir = Path(workdir)
    dec = export.load(workdir / "decomposition")
    exp = experiments.build(rc, Path(cache_dir))
    if dec.sites != exp.target.sites:
        raise ValueError(f"{workdir / 'decomposition'} does not match the config's target sites")
    prior = json.loads((workdir / "summary.json").read_text()) if (workdir / "summary.json").exists() else {}
    state = TrainState(jax.numpy.asarray(dec.extra.get("step", rc.optim.steps)), dec.params, None, None)
    return finish(rc, exp, state, workdir, float(prior.get("wall_time_s", float("nan"))))


def _last_metrics(path: Path) -> dict:
    if not path.exists():
        return {}
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    return json.loads(lines[-1]) if lines else {}


def format_summary(summary: dict) -> str:
    lines = ["summary:"]
    for k in sorted(summary):
        v = summary[k]
        lines.append(f"  {k:40s} {v:.6g}" if isinstance(v, float) else f"  {k:40s} {v}")
    return "\n".join(lines)

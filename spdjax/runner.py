"""One runner for every method and experiment: config -> target and data -> training (checkpointed,
resumable) -> export -> summary.

Writes into the workdir: `config.json`, `checkpoints/` (Orbax), `metrics.jsonl` (one line per log
step), `eval.jsonl` (one line per held-out evaluation, keys `eval/...`), `tensorboard/`,
`decomposition/` (the method's export), `summary.json` (flat keys) and the experiment's figures.

Re-running the same command with the same workdir resumes from the newest complete checkpoint (with a
host-side data iterator at the position it had) and ends bit-for-bit where an uninterrupted run would
have ended (same machine). A workdir whose saved config differs is refused, listing the differing
fields, unless `fresh` (start over) or `allow_config_change` is given.

Surviving the cluster: process 0 holds the workdir's lock for the whole run (`spdjax.workdir`: a second
launch is refused naming the holder); SIGTERM and SIGINT finish the current step, write a checkpoint,
flush the metrics and raise `Preempted` (launch.py exits with `PREEMPTED_EXIT_CODE`, 75, so a
scheduler can requeue); `config.json` is written atomically once the run holds its state; damaged
checkpoints are moved aside and the previous one used, but a workdir whose checkpoints are all damaged
is refused rather than restarted over its outputs (`--fresh` starts over).

The runner knows methods only through `spdjax.method.Method` and experiments only through the
`build(run_config) -> Experiment` callable the entry point passes in.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from spdjax import sharding
from spdjax.checkpoint import Checkpointer, CheckpointError
from spdjax.config import RunConfig, parse
from spdjax.data import iterate
from spdjax.experiment import Build, Experiment
from spdjax.metrics_writer import MetricsWriter, read_metrics
from spdjax.optim import make_optimizer, make_schedule
from spdjax.train import (
    Cadence,
    Hooks,
    Interrupted,
    LogRecord,
    TrainState,
    init_train_state,
    make_train_step,
    run_steps,
)
from spdjax.workdir import CONFIG_FILE, WorkdirLock, atomic_write_text, ensure_dir, read_json

DATA_STATE = "data_iterator"  # key of the host-side iterator's state in a checkpoint's extras
PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: stopped by SIGTERM / SIGINT after a checkpoint; run again to resume
OUTPUTS = ("checkpoints", "checkpoints_unreadable", "tensorboard", "decomposition", "figures")
OUTPUT_FILES = ("metrics.jsonl", "eval.jsonl", "summary.json", "wandb_run_id.txt")


class ConfigMismatchError(ValueError):
    """The workdir holds a run with a different config."""


class Preempted(RuntimeError):
    """SIGTERM / SIGINT stopped the run after a checkpoint; the same command resumes it."""


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """How to run, as opposed to what (the config).

    `stop_at_step` ends the session right after that step's checkpoint, as a preemption would (for
    tests); `wandb_project` also logs the training metrics to Weights & Biases (needs `wandb`).
    """

    quiet: bool = False
    fresh: bool = False
    allow_config_change: bool = False
    stop_at_step: int | None = None
    wandb_project: str | None = None


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
    """Check the workdir against `cfg` (see the module docstring); with `fresh`, remove the earlier
    run's outputs. `config.json` is written later, once the run holds its state (`write_config`)."""
    ensure_dir(workdir)
    saved = workdir / CONFIG_FILE
    if fresh:
        for name in OUTPUTS:
            shutil.rmtree(workdir / name, ignore_errors=True)
        for name in OUTPUT_FILES + (CONFIG_FILE,):
            (workdir / name).unlink(missing_ok=True)
    elif saved.exists() and (workdir / "checkpoints").exists():
        diff = config_diff(read_json(saved, "the saved config of the run in this workdir"), _config_json(cfg))
        diff = [d for d in diff if not d.startswith("mesh.")]  # resuming on another mesh is fine
        if diff and not allow_config_change:
            raise ConfigMismatchError(
                f"workdir {workdir} holds a run with a different config ({'; '.join(diff)}); pass "
                "--fresh to start over or --allow_config_change to resume with the new config"
            )


def write_config(cfg, workdir: Path) -> None:
    atomic_write_text(workdir / CONFIG_FILE, json.dumps(_config_json(cfg), indent=2))


class _Stop(Exception):
    pass


def _sync(name: str) -> None:
    """A barrier across processes (nothing with one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def _for_host(tree, mesh):
    """`tree` readable by every process (gathered from other hosts' shards when there are several)."""
    return sharding.to_host(tree, mesh) if jax.process_count() > 1 else tree


class _NoWriter:
    """The metrics writer of processes other than 0."""

    def write(self, *args, **kwargs):
        pass

    def close(self):
        pass


def check_batch(exp: Experiment) -> None:
    """A one-line error, before any compilation, when the experiment's batches do not fit its target."""
    if exp.batch_fn is not None:
        batch = jax.eval_shape(exp.batch_fn, jax.random.key(0))
    else:
        batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), exp.host_data.held_out(0))
    try:
        jax.eval_shape(exp.target, batch)
    except Exception as e:  # noqa: BLE001
        shapes = jax.tree.map(lambda x: f"{x.dtype}{list(x.shape)}", batch)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"batch {shapes} does not fit the target: {first}") from None


def held_out_batch(exp: Experiment, mesh, key, index: int):
    """A held-out batch on `mesh`: sampled from `key` (on-device sampler) or the host data's `index`-th."""
    if exp.batch_fn is not None:
        return _sampler(exp.batch_fn, mesh)(key)
    return sharding.global_batch(exp.host_data.held_out(index), mesh)


def held_out_stream(exp: Experiment, mesh, key) -> Callable[[int], Any]:
    """`i -> the i-th batch` of held-out data for a pass over many batches (harvest, clustering):
    `exp.harvest_data` when the family has one (None past its end), else `held_out_batch` with `key`
    folded with i (endless for samplers)."""
    if exp.harvest_data is not None:
        return exp.harvest_data
    return lambda i: held_out_batch(exp, mesh, jax.random.fold_in(key, i), i)


@functools.lru_cache(maxsize=8)
def _sampler(batch_fn, mesh):
    """`batch_fn` jitted with its batch sharded over `mesh` (compiled once per run, not per evaluation)."""
    return jax.jit(lambda k: sharding.constrain_batch(batch_fn(k), mesh))


class Run:
    """The pieces of one run on this process: config, method, experiment, mesh, step, data."""

    def __init__(self, rc: RunConfig, exp: Experiment, mesh):
        self.rc, self.exp, self.mesh, self.method = rc, exp, mesh, rc.method
        self.key = jax.random.key(rc.seed)
        self.optimizer = make_optimizer(rc.optim, *self.method.gradient_transforms(rc.optim))
        target_shardings = sharding.target_shardings(exp.target, mesh, rc.mesh.shard_target)
        self.target = sharding.place(exp.target, target_shardings)
        self.abstract = jax.eval_shape(self.fresh_state, self.target)
        self.shardings = sharding.state_shardings(self.abstract, mesh, self.method)  # raises if mesh.model does not divide a C
        self.step_fn = make_train_step(
            self.method, self.optimizer, rc.optim.steps, exp.batch_fn, make_schedule(rc.optim), mesh=mesh,
            shardings=self.shardings, compute_dtype=rc.precision.compute, target_shardings=target_shardings,
        )
        self._eval_metrics = jax.jit(self.method.eval_metrics, out_shardings=sharding.replicated(mesh))

    def fresh_state(self, target) -> TrainState:
        params = self.method.init_params(jax.random.fold_in(self.key, 0), target, self.rc.precision.param)
        params = self.method.prepare(params, target, self.rc.optim)
        return init_train_state(params, self.optimizer, jax.random.fold_in(self.key, 1))

    def init_state(self) -> TrainState:
        """Step 0, initialised directly on the mesh (no process holds more than its shards)."""
        return jax.jit(self.fresh_state, out_shardings=self.shardings)(self.target)

    def held_out(self, key, index: int):
        return held_out_batch(self.exp, self.mesh, key, index)

    def evaluate(self, params, step: int, figures: Path | None, lead: bool) -> dict | None:
        """Held-out metrics of `params` at `step` (every process takes part; None except on process 0)."""
        key = jax.random.fold_in(jax.random.fold_in(self.key, 2), step)
        batch = self.held_out(jax.random.fold_in(key, 0), step)
        metrics = self._eval_metrics(params, self.target, batch, jax.random.fold_in(key, 1))
        host = {k: float(v) for k, v in jax.device_get(metrics).items()}
        params, batch = _for_host(params, self.mesh), _for_host(batch, self.mesh)  # collectives
        if not lead:
            return None
        out = self.method.analyze(params, self.exp, batch, figures)
        host.update({k: float(v) for k, v in out.items() if isinstance(v, (int, float))})
        return host


class Session(Hooks):
    """The resumable part of a run: checkpoints (with the data iterator's position), metrics writers,
    held-out evaluations, the wall clock across sessions."""

    checkpoints = True

    def __init__(self, run: Run, cfg, workdir: Path, options: RunOptions, lead: bool):
        self.run, self.cfg, self.workdir, self.options, self.lead = run, cfg, workdir, options, lead
        rc = run.rc
        self.ckpt = Checkpointer(workdir / "checkpoints", max_to_keep=rc.keep_checkpoints)
        self.data = run.exp.host_data.train_iterator() if run.exp.host_data is not None else None
        self.config_written = False
        self.signal: str | None = None
        try:
            restored = self.ckpt.restore_latest(run.abstract, run.shardings)  # onto this mesh, whatever mesh saved it
        except BaseException:
            self.ckpt.close()
            raise
        quarantined = self.ckpt.quarantine_dir
        if restored is None and quarantined.is_dir() and any(quarantined.iterdir()):
            self.ckpt.close()
            raise CheckpointError(
                f"workdir {workdir} holds no readable checkpoint, only damaged ones in {quarantined}; pass "
                "--fresh to start over (or move them back)"
            )
        self.prior_wall = 0.0
        if restored is not None:
            self.state, extra = restored
            self.prior_wall = float(extra.get("wall_time_s", 0.0))
            if self.data is not None:
                if DATA_STATE not in extra:
                    raise ValueError(f"checkpoint at step {int(self.state.step)} holds no data iterator position")
                self.data.set_state(extra[DATA_STATE])
            if lead:
                print(f"resuming from the checkpoint at step {int(self.state.step)}", flush=True)
            self._write_config()
        else:
            self.state = run.init_state()
        resume_step = int(self.state.step) if restored is not None else None
        self.writer = MetricsWriter(
            workdir, resume_step=resume_step, wandb_project=options.wandb_project,
            wandb_run_name=workdir.name, config=_config_json(cfg),
        ) if lead else _NoWriter()
        self.eval_writer = MetricsWriter(
            workdir, resume_step=resume_step, metrics_file="eval.jsonl", tensorboard_dir="tensorboard/eval"
        ) if lead else _NoWriter()
        self.t0 = time.perf_counter()

    def wall(self) -> float:
        return self.prior_wall + time.perf_counter() - self.t0

    def on_log(self, record: LogRecord) -> None:
        self.writer.write(record.step, record.metrics, wall_time_s=self.prior_wall + record.wall_time_s)

    def _write_config(self) -> None:
        if self.lead and not self.config_written:
            write_config(self.cfg, self.workdir)
        self.config_written = True

    def on_checkpoint(self, state: TrainState) -> None:
        extra: dict[str, Any] = {"wall_time_s": self.wall()}
        if self.data is not None:
            extra[DATA_STATE] = self.data.get_state()
        self.ckpt.save(state, extra)
        self._write_config()
        if self.options.stop_at_step is not None and int(state.step) >= self.options.stop_at_step:
            raise _Stop

    def stop_requested(self) -> bool:
        flag = self.signal is not None
        if jax.process_count() > 1:  # every process must stop at the same step (the checkpoint is collective)
            flag = bool(np.max(multihost_utils.process_allgather(np.int32(flag))))
        return flag

    def _on_signal(self, signum, frame) -> None:
        if self.signal is not None:  # a second one: stop at once
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name
        if self.lead:
            print(f"\n{self.signal}: finishing step and writing a checkpoint (again to stop at once)", flush=True)

    def on_eval(self, state: TrainState) -> None:
        rc, step = self.run.rc, int(state.step)
        figures = rc.figures_every and step % rc.figures_every == 0 and step != rc.optim.steps
        host = self.run.evaluate(state.params, step, self.workdir / "figures" / f"step_{step}" if figures else None, self.lead)
        if host is not None:
            self.eval_writer.write(step, host, wall_time_s=self.wall(), prefix="eval/")

    def train(self) -> tuple[TrainState, float] | None:
        """Step to the end: `(final state, wall time including earlier sessions)`, or None when
        `stop_at_step` ended the session."""
        rc, mesh = self.run.rc, self.run.mesh
        batches = None
        if self.data is not None:
            batches = (sharding.global_batch(b, mesh) for b in iterate(self.data))
        cadence = Cadence(rc.optim.steps, rc.log_every, rc.checkpoint_every, rc.eval_every)
        main = threading.current_thread() is threading.main_thread()
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)} if main else {}
        try:
            state = run_steps(
                self.state, self.run.step_fn, self.run.target, cadence, self, batches,
                progress_bar=not self.options.quiet and self.lead,
            )
        except _Stop:
            return None
        except Interrupted as e:
            self.ckpt.close()  # the checkpoint is complete before we say so
            raise Preempted(
                f"stopped by {self.signal} after step {e.step}: checkpoint written to {self.ckpt.directory}; run the "
                "same command again to resume"
            ) from None
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self.ckpt.close()
            self.writer.close()
            self.eval_writer.close()
        jax.block_until_ready(state.params)
        return state, self.wall()


def run(
    cfg: ml_collections.ConfigDict, workdir: str | Path, build: Build, options: RunOptions = RunOptions()
) -> dict | None:
    """Run (or resume) the decomposition described by `cfg` on the experiment `build(run_config)`
    returns; the summary (also in summary.json), or None when `options.stop_at_step` ended it."""
    rc = parse(cfg)
    if options.wandb_project and importlib.util.find_spec("wandb") is None:
        raise ImportError(f"--wandb_project={options.wandb_project!r} needs the wandb package: pip install wandb")
    workdir = Path(workdir)
    # one-line errors for a mesh that does not fit the devices or the batch
    mesh = sharding.make_mesh(rc.mesh, batch_sizes=(rc.batch_size, rc.eval_batch_size))
    sharding.check_batch_size(rc.batch_size, mesh)
    sharding.check_batch_size(rc.eval_batch_size, mesh, "eval_batch_size")
    lead = jax.process_index() == 0  # only process 0 logs and writes outputs (checkpoints: all)
    lock = WorkdirLock(workdir)
    if lead:
        ensure_dir(workdir)
        lock.acquire()  # held until the run ends: a second launch on this workdir is refused
    try:
        return _run_locked(cfg, rc, workdir, build, options, mesh, lead)
    finally:
        lock.release()


def _run_locked(cfg, rc: RunConfig, workdir: Path, build: Build, options: RunOptions, mesh, lead: bool) -> dict | None:
    if lead:
        prepare_workdir(cfg, workdir, options.fresh, options.allow_config_change)
    _sync("spdjax_prepare_workdir")
    if not lead:  # process 0 trains and caches the target first; the others then load it
        _sync("spdjax_target_cached")
    exp = build(rc)
    if lead:
        _sync("spdjax_target_cached")
    check_batch(exp)
    r = Run(rc, exp, mesh)
    if lead:
        print(f"{rc.method.name} on {sharding.describe(mesh)}", flush=True)
    out = Session(r, cfg, workdir, options, lead).train()
    if out is None:
        return None
    state, wall = out
    params = _for_host(state.params, mesh)  # collectives: every process takes part
    batch = _for_host(r.held_out(_summary_key(rc), 0), mesh)
    result = finish(rc, exp, params, int(state.step), batch, workdir, wall) if lead else None
    _sync("spdjax_finish")
    return result


def _summary_key(rc: RunConfig):
    """The key of the held-out batch the final summary is computed on."""
    return jax.random.fold_in(jax.random.key(rc.seed), 0x7E57)


def finish(rc: RunConfig, exp: Experiment, params, step: int, batch, workdir: Path, wall: float) -> dict:
    """Export the decomposition, analyse it (figures into the workdir) and write summary.json."""
    method = rc.method
    method.export(workdir / "decomposition", params, exp.target, {"experiment": rc.experiment, "step": step, **exp.info})
    summary = dict(method.analyze(params, exp, batch, workdir))
    last = _last_metrics(workdir / "metrics.jsonl")
    summary.update({f"final/{k}": v for k, v in last.items() if k not in ("step", "wall_time_s")})
    summary["wall_time_s"] = wall
    summary["steps"] = rc.optim.steps
    summary.update({f"target/{k}": v for k, v in exp.info.items()})
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True, default=float))
    return summary


def require_decomposition(rc: RunConfig, workdir: Path, purpose: str, needs_ci: bool = False) -> None:
    """One-line errors when `workdir` holds no exported decomposition, or (`needs_ci`) when the run's
    method has no causal importances; `purpose` names what needs it ("analyze", "the harvest")."""
    if needs_ci and rc.method.name != "spd":
        raise ValueError(f"{purpose} needs causal importances (an SPD run); this run's method is {rc.method.name!r}")
    if not (workdir / "decomposition").is_dir():
        raise FileNotFoundError(f"{workdir / 'decomposition'} does not exist: {purpose} needs a finished run's workdir")


def analyze(cfg: ml_collections.ConfigDict, workdir: str | Path, build: Build) -> dict:
    """Regenerate the summary and every figure from a finished run's exported decomposition."""
    rc = parse(cfg)
    workdir = Path(workdir)
    require_decomposition(rc, workdir, "analyze")
    with WorkdirLock(workdir):
        return _analyze_locked(rc, workdir, build)


def _analyze_locked(rc: RunConfig, workdir: Path, build: Build) -> dict:
    exp = build(rc)
    params, extra = rc.method.load(workdir / "decomposition", exp.target)
    summary_file = workdir / "summary.json"
    prior = read_json(summary_file, "the run's summary") if summary_file.exists() else {}
    mesh = sharding.make_mesh(sharding.MeshConfig(data=1))
    batch = held_out_batch(exp, mesh, _summary_key(rc), 0)
    step = int(extra.get("step", rc.optim.steps))
    return finish(rc, exp, params, step, batch, workdir, float(prior.get("wall_time_s", float("nan"))))


def _last_metrics(path: Path) -> dict:
    """The last complete record of a metrics.jsonl ({} if none); garbled lines are skipped with a warning."""
    if not path.exists():
        return {}
    records = read_metrics(path)
    return records[-1] if records else {}


def format_summary(summary: dict) -> str:
    lines = ["summary:"]
    for k in sorted(summary):
        v = summary[k]
        lines.append(f"  {k:40s} {v:.6g}" if isinstance(v, float) else f"  {k:40s} {v}")
    return "\n".join(lines)


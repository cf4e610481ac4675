"""A whole APD run, the counterpart of `spdjax.run.run` (which dispatches here for `method="apd"`):
config -> the experiment's target and data -> APD training (checkpointed, resumable) -> export ->
summary.json and figures.

Workdir contents as for SPD: `config.json`, `checkpoints/` (Orbax, `spdjax.checkpoint.Checkpointer`),
`metrics.jsonl` + `tensorboard/` (`spdjax.metrics_writer.MetricsWriter`), `eval.jsonl`,
`decomposition/` (spdjax.apd.export), `summary.json` (flat keys: `mmcs`, `ml2r`, `n_alive`,
`n_features_with_own_component`, `wall_time_s`, `peak_rss_mib`, `n_apd_params`, ...), PNG figures and,
for float-vector targets, `ownership.json` (each feature's largest-attribution component and share).
APD runs on one device (the `mesh` section is not used) and one process.
"""

from __future__ import annotations

import importlib.util
import json
import resource
from pathlib import Path

import jax
import ml_collections

from spdjax.apd import analysis, export
from spdjax.apd.components import init_apd
from spdjax.apd.config import apd_config_from
from spdjax.apd.train import check_optim, make_optimizer, make_schedule, make_train_step
from spdjax.config import parse
from spdjax.train import TrainState, init_train_state


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (MiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _n_features(rc) -> int | None:
    t = rc.target
    n = t.get("n_features") if t is not None else None
    return int(n) if n else None


def apd_run(
    cfg: ml_collections.ConfigDict,
    workdir: str | Path,
    cache_dir: str | Path,
    quiet: bool = False,
    fresh: bool = False,
    allow_config_change: bool = False,
    stop_at_step: int | None = None,
    wandb_project: str | None = None,
) -> dict | None:
    """Run (or resume) the APD decomposition described by `cfg`; returns the summary."""
    import experiments
    from spdjax.run import check_batch, prepare_workdir, train_session

    rc = parse(cfg)
    apd = apd_config_from(rc.apd)
    check_optim(rc.optim)
    if wandb_project and importlib.util.find_spec("wandb") is None:
        raise ImportError(f"--wandb_project={wandb_project!r} needs the wandb package: pip install wandb")
    workdir = Path(workdir)
    prepare_workdir(cfg, workdir, fresh, allow_config_change)
    exp = experiments.build(rc, Path(cache_dir))
    target = exp.target
    check_batch(exp)
    key = jax.random.key(rc.seed)
    optimizer = make_optimizer(rc.optim)
    schedule = make_schedule(rc.optim)

    def fresh_state():
        params = init_apd(jax.random.fold_in(key, 0), target, apd.C, apd.m, apd.init_scale, init_type=apd.init_type)
        return init_train_state(params, optimizer, jax.random.fold_in(key, 1))

    abstract = jax.eval_shape(fresh_state)
    eval_key = jax.random.fold_in(key, 2)
    n_features = _n_features(rc)

    def evaluate(s: TrainState) -> dict:
        batch = exp.batch_fn(jax.random.fold_in(eval_key, int(s.step)))
        summary = analysis.analyze(s.params, target, apd, n_features, batch, None)
        return {k: float(v) for k, v in summary.items() if isinstance(v, (int, float))}

    out = train_session(
        cfg, rc, workdir, abstract, jax.jit(fresh_state), make_train_step(apd, optimizer, exp.batch_fn, schedule),
        target, evaluate, quiet=quiet, stop_at_step=stop_at_step, wandb_project=wandb_project,
    )
    if out is None:
        return None
    state, wall = out
    return finish(rc, apd, exp, state, workdir, wall)


def finish(rc, apd, exp, state: TrainState, workdir: Path, wall: float) -> dict:
    """Export the decomposition, analyse it, write the figures and summary.json."""
    from spdjax.run import _last_metrics

    export.save(
        workdir / "decomposition", state.params, exp.target.sites, apd,
        extra={"experiment": rc.experiment, "step": int(state.step), **exp.info},
    )
    batch = exp.batch_fn(jax.random.fold_in(jax.random.key(rc.seed), 0x7E57))
    summary = {"method": "apd"}
    summary.update(analysis.analyze(state.params, exp.target, apd, _n_features(rc), batch, workdir))
    last = _last_metrics(workdir / "metrics.jsonl")
    summary.update({f"final/{k}": v for k, v in last.items() if k not in ("step", "wall_time_s")})
    summary["wall_time_s"] = wall
    summary["steps"] = rc.optim.steps
    summary["peak_rss_mib"] = peak_rss_mib()
    summary.update({f"target/{k}": v for k, v in exp.info.items()})
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True, default=float))
    return summary


def apd_analyze(cfg: ml_collections.ConfigDict, workdir: str | Path, cache_dir: str | Path) -> dict:
    """Regenerate the summary and figures from a finished APD run's exported decomposition."""
    import experiments

    rc = parse(cfg)
    apd = apd_config_from(rc.apd)
    workdir = Path(workdir)
    params, meta = export.load(workdir / "decomposition")
    exp = experiments.build(rc, Path(cache_dir))
    prior = json.loads((workdir / "summary.json").read_text()) if (workdir / "summary.json").exists() else {}
    state = TrainState(jax.numpy.asarray(meta["extra"].get("step", rc.optim.steps)), params, None, None)
    return finish(rc, apd, exp, state, workdir, float(prior.get("wall_time_s", float("nan"))))

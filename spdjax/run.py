"""A whole decomposition run: config -> target -> train -> save -> analyse -> summary.

Writes into the workdir: `config.json`, `metrics.jsonl` (one line per log step), `decomposition/` (the
final decomposition, see spdjax.export), `summary.json` (flat keys) and the experiment's figures.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import ml_collections

from spdjax.config import RunConfig, parse
from spdjax import export
from spdjax.decomposition import init_decomposition
from spdjax.train import LogRecord, train


def _fmt(metrics: dict[str, float]) -> str:
    keys = [k for k in metrics if k.startswith("loss/")] + [k for k in metrics if k.startswith("ci_l0/")]
    return " ".join(f"{k.split('/', 1)[1]}={metrics[k]:.4g}" for k in keys)


def run(cfg: ml_collections.ConfigDict, workdir: str | Path, cache_dir: str | Path, quiet: bool = False) -> dict:
    """Run the decomposition described by `cfg`; returns the summary dict (also in summary.json)."""
    import experiments

    rc: RunConfig = parse(cfg)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(cfg.to_json_best_effort(indent=2))
    exp = experiments.build(rc, Path(cache_dir))
    key = jax.random.key(rc.seed)
    params = init_decomposition(jax.random.fold_in(key, 0), exp.target, rc.ci_type, rc.ci_hidden)

    metrics_path = workdir / "metrics.jsonl"
    metrics_file = metrics_path.open("w")
    last: dict[str, float] = {}
    bar_ref = {}

    def on_log(rec: LogRecord):
        last.clear()
        last.update(rec.metrics)
        metrics_file.write(json.dumps({"step": rec.step, "wall_time_s": rec.wall_time_s, **rec.metrics}) + "\n")
        metrics_file.flush()
        bar = bar_ref.get("bar")
        if bar is not None:
            bar.set_postfix_str(_fmt(rec.metrics), refresh=False)

    t0 = time.perf_counter()
    state, history = train(
        exp.target, params, rc.loss, rc.optim, jax.random.fold_in(key, 1),
        batch_fn=exp.batch_fn, log_every=rc.log_every, on_log=on_log,
        progress_bar=not quiet, bar_ref=bar_ref,
    )
    jax.block_until_ready(state.params)
    wall = time.perf_counter() - t0
    metrics_file.close()
    export.save(
        workdir / "decomposition", state.params, exp.target.sites, rc.ci_type, rc.ci_hidden,
        extra={"experiment": rc.experiment, **exp.info},
    )

    summary = {k: v for k, v in exp.analyze(state.params, exp.target, workdir).items()}
    summary.update({f"final/{k}": v for k, v in last.items()})
    summary["wall_time_s"] = wall
    summary["steps"] = rc.optim.steps
    summary.update({f"target/{k}": v for k, v in exp.info.items()})
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True, default=float))
    return summary


def format_summary(summary: dict) -> str:
    lines = ["summary:"]
    for k in sorted(summary):
        v = summary[k]
        lines.append(f"  {k:40s} {v:.6g}" if isinstance(v, float) else f"  {k:40s} {v}")
    return "\n".join(lines)

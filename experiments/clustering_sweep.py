"""How alpha (and tau) trade a clustering's agreement with the ground truth, on a finished run.

    python -m experiments.clustering_sweep --config=configs/resid_mlp2_reference.py --workdir=W \
        [--alphas=0.1,1,3,10] [--taus=0.01,0.1] [--seeds=3] [--sampler=range] [--n_samples=8192]

For each tau the causal importances are computed once (held-out batches of the run's data); for each
alpha the merge runs once per seed; the table gives, at the stopping point, the number of groups, the
family's ground-truth scores (ARI, purity, separated, cross-layer: `spdjax.clustering.evaluate`, mean
over seeds) and the seeds' mean matching distance. `--scored_sites=layers.*.mlp_in` scores only those
sites' subcomponents (all sites are still clustered).
"""

from __future__ import annotations

import fnmatch
import time

import numpy as np
from absl import app, flags
from ml_collections import config_flags

import experiments
from spdjax.clustering import MechanismTruth, MergeConfig, binarize, cluster, evaluate
from spdjax.clustering.workflow import held_out_ci
from spdjax.config import parse

_CONFIG = config_flags.DEFINE_config_file("config", None, "The run's config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "The finished run's workdir.")
_CACHE = flags.DEFINE_string("cache_dir", ".cache/targets", "Where trained targets are cached.")
_ALPHAS = flags.DEFINE_list("alphas", ["0.1", "1", "3", "10"], "Rank penalties.")
_TAUS = flags.DEFINE_list("taus", ["0.01", "0.1"], "CI thresholds.")
_SEEDS = flags.DEFINE_integer("seeds", 3, "Merge runs per setting.")
_SAMPLER = flags.DEFINE_string("sampler", "range", "range, mcmc or exp_rank.")
_STOP = flags.DEFINE_string("stop", "first_positive", "first_positive or min_length.")
_N = flags.DEFINE_integer("n_samples", 8192, "Rows (inputs or token positions).")
_FLOOR = flags.DEFINE_float("freq_floor", 0.001, "Frequency floor.")
_SCORED = flags.DEFINE_string("scored_sites", None, "Score only subcomponents of sites matching this glob (all clustered).")

KEYS = ("n_groups", "ari", "purity", "separated", "cross_layer")


def sweep(rc, exp, params, alphas, taus, seeds: int, sampler: str, n_samples: int, freq_floor: float,
          scored_sites: str | None = None, stop: str = "first_positive") -> list[dict]:
    sigmoid = rc.method.settings.loss.sigmoid
    ci = held_out_ci(params, exp, rc, n_samples)
    truth = exp.mechanisms(params, exp.target, sigmoid)
    if scored_sites:
        keep = {s: v for s, v in truth.labels.items() if fnmatch.fnmatch(s, scored_sites)}
        truth = MechanismTruth({s: v if s in keep else np.full_like(v, -1) for s, v in truth.labels.items()}, truth.layers)
    rows = []
    for tau in taus:
        acts = binarize(ci, tau, freq_floor)
        for alpha in alphas:
            t0 = time.perf_counter()
            c = cluster(acts, MergeConfig(alpha=alpha, sampler=sampler, stop=stop), seeds=range(seeds))
            scores = [evaluate(h.labels(), acts.members, truth) for h in c.histories]
            row = {"tau": tau, "alpha": alpha, "n": acts.acts.shape[1], "seconds": time.perf_counter() - t0}
            for k in KEYS:
                vals = [s[k] for s in scores if k in s]
                row[k] = float(np.mean(vals)) if vals else float("nan")
            row["stability"] = c.stability().get("stop/mean", float("nan"))
            rows.append(row)
            print(format_row(row), flush=True)
    return rows


def format_row(r: dict) -> str:
    return (f"| {r['tau']:g} | {r['alpha']:g} | {r['n']} | {r['n_groups']:.1f} | {r['ari']:.3f} | {r['purity']:.3f} | "
            f"{r['separated']:.3f} | {r['cross_layer']:.3f} | {r['stability']:.3f} |")


def main(argv):
    del argv
    rc = parse(_CONFIG.value)
    exp = experiments.build(rc, _CACHE.value)
    if exp.mechanisms is None:
        raise SystemExit(f"error: family {rc.experiment!r} has no ground truth (Experiment.mechanisms)")
    params, _ = rc.method.load(f"{_WORKDIR.value}/decomposition", exp.target)
    print("| tau | alpha | subcomponents | groups | ARI | purity | separated | cross-layer | seed distance |")
    print("|---|---|---|---|---|---|---|---|---|")
    sweep(rc, exp, params, [float(a) for a in _ALPHAS.value], [float(t) for t in _TAUS.value], _SEEDS.value,
          _SAMPLER.value, _N.value, _FLOOR.value, _SCORED.value, _STOP.value)


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)

"""Clustering a finished run: `python launch.py --config=... --workdir=W --mode=cluster [--cluster.alpha=1]`.

Loads `W/decomposition`, computes the causal importances of every site on held-out batches of the
run's data (`n_samples` rows: inputs, or token positions for sequence models), binarises them, merges
(`cluster.seeds` seeds), evaluates against the family's ground truth where it has one
(`Experiment.mechanisms`), and writes `W/clustering/` (`spdjax.clustering.output`).
"""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path

import jax
import ml_collections

from spdjax import sharding
from spdjax.clustering import output
from spdjax.clustering.cluster import Clustering, cluster, evaluate
from spdjax.clustering.inputs import binarize, causal_importances
from spdjax.clustering.merge import MergeConfig
from spdjax.config import parse
from spdjax.experiment import Build
from spdjax.fields import dataclass_from
from spdjax.runner import held_out_stream, require_decomposition
from spdjax.workdir import WorkdirLock

OUTDIR = "clustering"


def default_config() -> ml_collections.ConfigDict:
    """The `--cluster.*` settings. alpha 3, the `mcmc` sampler at temperature 1 (nearly greedy) and tau 0.1
    are where the toys' ground truth is best recovered (docs/results.md; clustering.md's tau is 0.01, the
    reference's for LMs 0.1; its samplers `range` and the paper's `exp_rank` are a setting away).
    n_samples: rows of CI (inputs, or token positions of sequence models: `positions_per_sequence` drawn
    per sequence, 0 = all; fewer rows when a family's held-out set ends first)."""
    return ml_collections.ConfigDict(dict(
        alpha=3.0, sampler="mcmc", stop="first_positive", range_fraction=0.05, temperature=1.0, rank_rate=0.2, top=64,
        tau=0.1, freq_floor=0.001, n_samples=8192, positions_per_sequence=8, seeds=1, seed=0, figures=True,
    ))


def merge_config(ccfg) -> MergeConfig:
    """The `MergeConfig` part of the `--cluster.*` settings."""
    names = [f.name for f in dataclasses.fields(MergeConfig)]
    return dataclass_from(MergeConfig, {k: ccfg[k] for k in names}, "cluster").validate()


def cluster_workdir(cfg: ml_collections.ConfigDict, workdir: str | Path, build: Build,
                    ccfg: ml_collections.ConfigDict | None = None) -> dict:
    """Cluster the run in `workdir` (its config `cfg`); returns the written `clusters.json` content."""
    ccfg = default_config() if ccfg is None else ccfg
    mcfg = merge_config(ccfg)
    if int(ccfg.seeds) < 1 or int(ccfg.n_samples) < 1 or int(ccfg.positions_per_sequence) < 0:
        raise ValueError("cluster.seeds and cluster.n_samples must be >= 1, cluster.positions_per_sequence >= 0")
    rc, workdir = parse(cfg), Path(workdir)
    require_decomposition(rc, workdir, "clustering", needs_ci=True)
    with WorkdirLock(workdir):
        exp = build(rc)
        params, _ = rc.method.load(workdir / "decomposition", exp.target)
        clustering, evaluation = cluster_decomposition(params, exp, rc, ccfg, mcfg)
        return output.write(clustering, workdir / OUTDIR, evaluation, figures=bool(ccfg.figures))


def held_out_ci(params, exp, rc, n_samples: int, positions_per_sequence: int | None = None, seed: int = 0):
    """`causal_importances` of `params` on up to `n_samples` rows of `exp`'s held-out stream."""
    mesh = sharding.make_mesh(sharding.MeshConfig(data=1))
    get = held_out_stream(exp, mesh, jax.random.fold_in(jax.random.key(rc.seed), 0xC105))
    batches = itertools.takewhile(lambda b: b is not None, (get(i) for i in itertools.count()))
    return causal_importances(params, exp.target, batches, rc.method.settings.loss.sigmoid, positions_per_sequence,
                              seed=seed, max_rows=n_samples)


def cluster_decomposition(params, exp, rc, ccfg, mcfg: MergeConfig) -> tuple[Clustering, dict | None]:
    """The clustering of `params` on held-out batches of `exp`, and its ground-truth evaluation (None
    when the family has none)."""
    sigmoid = rc.method.settings.loss.sigmoid
    ci = held_out_ci(params, exp, rc, int(ccfg.n_samples), int(ccfg.positions_per_sequence) or None, int(ccfg.seed))
    acts = binarize(ci, float(ccfg.tau), float(ccfg.freq_floor))
    clustering = cluster(acts, mcfg, seeds=[int(ccfg.seed) + i for i in range(int(ccfg.seeds))])
    evaluation = None
    if exp.mechanisms is not None:
        truth = exp.mechanisms(params, exp.target, sigmoid)
        evaluation = evaluate(clustering.labels, acts.members, truth)
    return clustering, evaluation

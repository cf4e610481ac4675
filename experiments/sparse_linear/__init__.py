"""A tiny experiment family read from a host-side dataset: a linear map applied to sparse inputs.

The target is one `nnx.Linear(n_features, d_out)` (`map`) whose kernel rows are random directions; each input
switches on a few of the `n_features` coordinates, so each row is one mechanism and SPD should give each
its own subcomponent. The data are a fixed set of `n_examples` inputs held in memory and read through
Grain (shuffled, repeated, batched): a host-side, checkpointable iterator, whose position the runner
saves with every checkpoint. It is also the README's example of adding a family (this module + a config).
"""

from __future__ import annotations

from pathlib import Path

import grain
import jax
import numpy as np
from flax import nnx

import spdjax
from spdjax import metrics
from spdjax.data import GrainData
from spdjax.experiment import Experiment


class SparseLinear(nnx.Module):
    """The target: `x @ kernel` (one site, `map`)."""

    def __init__(self, n_features: int, d_out: int, *, rngs: nnx.Rngs):
        self.map = nnx.Linear(n_features, d_out, use_bias=False, rngs=rngs)

    def __call__(self, x):
        return self.map(x)


def sparse_inputs(seed: int, n: int, n_features: int, feature_prob: float) -> np.ndarray:
    """`(n, n_features)` float32: each coordinate on with probability `feature_prob`, value U(0, 1)."""
    rng = np.random.default_rng(seed)
    on = rng.random((n, n_features)) < feature_prob
    return (on * rng.random((n, n_features))).astype(np.float32)


def build(run, cache_dir: Path) -> Experiment:
    t = run.target
    model = SparseLinear(t.n_features, t.d_out, rngs=nnx.Rngs(t.seed))
    target = spdjax.from_nnx(model, sites=run.sites, tied=dict(run.tied), identity=run.identity or ())
    n_proc, rank = jax.process_count(), jax.process_index()
    if run.batch_size % n_proc:
        raise ValueError(f"config.batch_size={run.batch_size} is not divisible by the {n_proc} processes")
    data = sparse_inputs(t.seed, t.n_examples, t.n_features, t.feature_prob)
    # each process reads its own rows of every global batch (spdjax.sharding.global_batch joins them)
    train = (
        grain.MapDataset.source(data).shuffle(seed=t.seed).repeat()[rank::n_proc]
        .batch(run.batch_size // n_proc, drop_remainder=True)
    )
    held = sparse_inputs(t.seed + 1, run.eval_batch_size, t.n_features, t.feature_prob)
    kernel = np.asarray(model.map.kernel[...])

    def analyze(params, target, workdir, loss):
        mmcs, ml2r = metrics.mmcs_ml2r(kernel, params.components[target.primary_sites[0].name])
        return {"mmcs": mmcs, "ml2r": ml2r}

    return Experiment(
        target=target,
        host_data=GrainData(train, lambda index: held[rank::n_proc]),
        analyze=analyze,
        info={"n_examples": int(t.n_examples)},
    )

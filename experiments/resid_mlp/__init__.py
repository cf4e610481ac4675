"""ResidMLP (compressed computation): 1, 2 and 3-layer residual MLPs computing y = x + ReLU(x).

`build(run, cache_dir)` trains (or loads from `cache_dir`, or from `run.target.weights_path`) the
target described by `run.target`, wraps it with its sites, and returns the `Experiment` (batch sampler,
ground-truth analysis). The recipes are in configs/resid_mlp.py (and its APD and reference variants).
"""

from __future__ import annotations

import functools
from pathlib import Path

import spdjax
from experiments.resid_mlp.analysis import ONE_HOT_VALUE, make_analyze
from experiments.resid_mlp.model import (
    ResidMLP,
    neuron_contributions,
    random_embedding,
    resid_mlp_forward,
    resid_mlp_from_weights,
)
from experiments.resid_mlp.train_target import (
    ResidMLPTargetConfig,
    load_or_train,
    sample_features,
    train_resid_mlp,
)
from spdjax.clustering import one_hot_mechanisms
from spdjax.experiment import Experiment

__all__ = [
    "ResidMLP",
    "ResidMLPTargetConfig",
    "build",
    "load_or_train",
    "neuron_contributions",
    "random_embedding",
    "resid_mlp_forward",
    "resid_mlp_from_weights",
    "sample_features",
    "train_resid_mlp",
]

def build(run, cache_dir: Path | None) -> Experiment:
    """The ResidMLP experiment for a parsed run config (`spdjax.config.RunConfig`).

    `run.target` fields: see `ResidMLPTargetConfig`. The target's weights are cached in `cache_dir`.
    """
    tcfg = ResidMLPTargetConfig.from_section(run.target)
    weights, info = load_or_train(tcfg, cache_dir)
    model = resid_mlp_from_weights(weights["W_E"], weights["W_in"], weights["W_out"])
    target = spdjax.from_nnx(
        model, sites=run.sites, tied=dict(run.tied), identity=run.identity or ()
    )
    n_f, p = tcfg.n_features, float(tcfg.feature_prob)
    batch_fn = functools.partial(
        sample_features, batch_size=run.batch_size, n_features=n_f, feature_prob=p
    )
    eval_batch_fn = functools.partial(
        sample_features, batch_size=run.eval_batch_size, n_features=n_f, feature_prob=p
    )
    analyze = make_analyze(
        n_features=n_f,
        d_mlp=tcfg.d_mlp,
        feature_prob=p,
        weights=weights,
        eval_batch_fn=eval_batch_fn,
        seed=run.seed,
        info=info,
    )
    keys = ("seed_used", "final_loss", "initial_loss", "train_time_s", "platform")
    flat = {k: info[k] for k in keys}
    flat["cached"] = bool(info.get("cached", False))
    if "cache_file" in info:
        flat["cache_file"] = info["cache_file"]
    mechanisms = functools.partial(one_hot_mechanisms, n_features=n_f, value=ONE_HOT_VALUE, layer_of=site_layer)
    return Experiment(target=target, batch_fn=batch_fn, analyze=analyze, info=flat, mechanisms=mechanisms)


def site_layer(name: str) -> int:
    """`layers.<i>.mlp_in` -> i."""
    return int(name.split(".")[1])

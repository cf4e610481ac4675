"""Toy Models of Superposition (TMS 5-2, 40-10, and their +ID variants).

`build(run, cache_dir)` trains (or loads from `cache_dir`) the target described by `run.target`,
wraps it with its sites, and returns the `Experiment` (batch sampler, ground-truth analysis). The
recipes are in configs/tms_*.py.
"""

from __future__ import annotations

import functools
from pathlib import Path

import spdjax
from experiments.tms.analysis import ONE_HOT_VALUE, make_analyze
from experiments.tms.model import TMS, represented_features, tms_forward, tms_from_weights
from experiments.tms.train_target import (
    TMSTargetConfig,
    load_or_train,
    sample_features,
    train_represented,
    train_tms,
)
from spdjax.clustering import one_hot_mechanisms
from spdjax.experiment import Experiment

__all__ = [
    "TMS",
    "TMSTargetConfig",
    "build",
    "load_or_train",
    "represented_features",
    "sample_features",
    "tms_forward",
    "tms_from_weights",
    "train_represented",
    "train_tms",
]


def build(run, cache_dir: Path | None) -> Experiment:
    """The TMS experiment for a parsed run config (`spdjax.config.RunConfig`).

    `run.target` fields: see `TMSTargetConfig`. The target's W, b are cached in `cache_dir`.
    """
    tcfg = TMSTargetConfig.from_section(run.target)
    W, b, info = load_or_train(tcfg, cache_dir)
    model = tms_from_weights(W, b)
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
        eval_batch_fn=eval_batch_fn,
        seed=run.seed,
        info=info,
    )
    info = flat_info(info)
    mechanisms = functools.partial(one_hot_mechanisms, n_features=n_f, value=ONE_HOT_VALUE)
    return Experiment(target=target, batch_fn=batch_fn, analyze=analyze, info=info, mechanisms=mechanisms)


def flat_info(info: dict) -> dict:
    """Facts about the trained target as flat JSON-able values (ints, floats, strings, flat lists)."""
    out = {k: info[k] for k in ("seed_used", "n_represented", "final_loss", "train_time_s", "platform")}
    out["tried_seeds"] = [t["seed"] for t in info["tries"]]
    out["tried_n_represented"] = [t["n_represented"] for t in info["tries"]]
    out["cached"] = bool(info.get("cached", False))
    if "cache_file" in info:
        out["cache_file"] = info["cache_file"]
    return out

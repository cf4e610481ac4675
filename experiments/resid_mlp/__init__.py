"""ResidMLP (compressed computation): 1, 2 and 3-layer residual MLPs computing y = x + ReLU(x).

`build(run, cache_dir)` trains (or loads from `cache_dir`, or from `run.target.weights_path`) the
target described by `run.target`, wraps it with its sites, and returns the `Experiment` (batch sampler,
ground-truth analysis). `resid_mlp_config(n_layers, smoke)` is the SPD recipe of toy_models.md as a run
config; configs/resid_mlp.py calls it.
"""

from __future__ import annotations

import functools
from pathlib import Path

import ml_collections

import spdjax
from experiments import Experiment
from experiments.resid_mlp.analysis import make_analyze
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
from spdjax.config import run_config as spd_run_config
from spdjax.config import shrink_for_smoke

__all__ = [
    "ResidMLP",
    "ResidMLPTargetConfig",
    "SIZES",
    "build",
    "load_or_train",
    "neuron_contributions",
    "random_embedding",
    "resid_mlp_config",
    "resid_mlp_forward",
    "resid_mlp_from_weights",
    "sample_features",
    "train_resid_mlp",
]

# n_layers -> (n_features, d_mlp per layer)
SIZES = {1: (100, 50), 2: (100, 25), 3: (102, 17)}
# n_layers -> SPD recipe (toy_models.md): lr, minimality coeff, C per site, CI mlp hidden, steps
RECIPES = {
    1: dict(lr=2e-3, minimality=1e-5, C=100, hidden=(16,), steps=20_000, target_steps=1_000),
    2: dict(lr=1e-3, minimality=1e-5, C=400, hidden=(16,), steps=50_000, target_steps=1_000),
    3: dict(lr=1e-3, minimality=1e-5, C=500, hidden=(128,), steps=50_000, target_steps=10_000),
}
# recipe="paper": what the SPD paper's appendix changes (steps; the 3-layer minimality coeff)
PAPER = {1: dict(steps=30_000), 2: dict(steps=50_000), 3: dict(steps=200_000, minimality=0.5e-5)}
VARIANTS = ("main", "paper", "reference")


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
    return Experiment(target=target, batch_fn=batch_fn, analyze=analyze, info=flat)


def resid_mlp_config(
    n_layers: int = 1, smoke: bool = False, recipe: str = "main"
) -> ml_collections.ConfigDict:
    """Run config (layout: spdjax/config.py) with the SPD recipe of toy_models.md for resid_mlp<n_layers>.

    `recipe="main"` (default): Adam with constant lr, batch 2048, S=1, stochastic recon 1 + layerwise
    1, minimality p=2, delta component + 200-step faithfulness warm-up; sites every layer's mlp_in and
    mlp_out with C each. `smoke` shrinks the training to run in seconds on a CPU (no success expected).

    `recipe="paper"` is the SPD paper's appendix recipe: faithfulness 1 in the loss instead of the delta
    component (no warm-up), 30k / 50k / 200k steps for 1 / 2 / 3 layers, minimality 0.5e-5 for 3
    layers; everything else as "main" (like the TMS `paper` recipe).

    `recipe="reference"` (2 layers only) is the PyTorch reference's current recipe instead: CI
    `shared_mlp` with 256 hidden, minimality 1e-4, lr 3e-4, 25k steps, losses stochastic-recon-subset 2
    + PGD-recon-subset 2 (uniform-k routing; 1 PGD step of size 1 from random sources shared across the
    batch) + minimality; everything else as "main".
    """
    if n_layers not in SIZES:
        raise ValueError(f"resid_mlp: n_layers must be one of {sorted(SIZES)}, got {n_layers!r}")
    if recipe not in VARIANTS or (recipe == "reference" and n_layers != 2):
        raise ValueError(
            f"resid_mlp: recipe must be one of {list(VARIANTS)} ('reference' with 2 layers only); got {recipe!r}"
        )
    n_f, d_mlp = SIZES[n_layers]
    r = dict(RECIPES[n_layers], **(PAPER[n_layers] if recipe == "paper" else {}))
    cfg = spd_run_config(
        experiment="resid_mlp",
        target=dict(
            n_features=n_f,
            d_mlp=d_mlp,
            n_layers=n_layers,
            d_embed=1000,
            steps=r["target_steps"],
            batch_size=2048,
            lr=3e-3,
            weight_decay=0.01,
            feature_prob=0.01,
            seed=0,
            weights_path="",
        ),
        sites=(("layers.*.mlp_in", r["C"]), ("layers.*.mlp_out", r["C"])),
        ci_hidden=r["hidden"],
        minimality=r["minimality"],
        pnorm=2.0,
        steps=r["steps"],
        lr=r["lr"],
        schedule="constant",
        batch_size=2048,
    )
    if recipe == "reference":
        cfg.ci.type, cfg.ci.hidden = "shared_mlp", (256,)
        cfg.loss.coeffs = ml_collections.ConfigDict(
            dict(stochastic_recon_subset=2.0, pgd_recon_subset=2.0, importance_minimality=1e-4)
        )
        cfg.loss.subset_routing = "uniform_k"
        cfg.loss.pgd_init, cfg.loss.pgd_n_steps, cfg.loss.pgd_step_size = "random", 1, 1.0
        cfg.loss.pgd_mask_scope = "shared_across_batch"
        cfg.optim.lr, cfg.optim.steps = 3e-4, 25_000
    if recipe == "paper":
        cfg.loss.coeffs = ml_collections.ConfigDict(dict(faithfulness=1.0, **cfg.loss.coeffs.to_dict()))
        cfg.loss.use_delta_component = False
        cfg.optim.faithfulness_warmup_steps = 0
    if smoke:
        cfg.target.steps = 100
        cfg.target.batch_size = 256
        shrink_for_smoke(cfg, steps=10, every=5)
    return cfg

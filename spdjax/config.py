"""ml_collections ConfigDict -> frozen, validated dataclasses. Every error names the field.

Layout of a run config (see configs/*.py):

    experiment: str            # experiment family, e.g. "tms"
    seed: int
    target: ConfigDict         # family-specific target settings
    sites: ((pattern, C), ...) # glob over module paths and C per matched site
    tied: ((site, primary), ...)
    identity: ((pattern, C), ...)   # identity inserted before the matched layers
    ci: {type, hidden}
    loss: {coeffs: {term: coeff}, n_mask_samples, mask_type, use_delta_component, sigmoid,
           output_loss, pnorm, p_anneal_*, minimality_beta, ci_l0_threshold, layerwise_unroll,
           subset_routing, subset_p, pgd_init, pgd_n_steps, pgd_step_size, pgd_mask_scope}
    optim: {steps, lr, schedule, warmup_frac, final_lr_frac, clip_components, clip_ci,
            faithfulness_warmup_steps, faithfulness_warmup_lr, faithfulness_warmup_weight_decay}
    batch_size: int, eval_batch_size: int, log_every: int
    checkpoint_every: int (steps between checkpoints; default 1000), keep_checkpoints: int (default 3)
    eval_every: int (held-out evaluation: every loss term, CI-L0, ground-truth metrics; default 1000)
    figures_every: int (figures during training, into figures/step_N; 0 = only at the end)
    mesh: {data, model}        # device mesh axis sizes, -1 = all remaining devices (spdjax.sharding)
    method: "spd" (default) or "apd" (spdjax.apd; its settings in the `apd` section)
"""

from __future__ import annotations

import dataclasses
import importlib.util
import pathlib
from typing import Any

import ml_collections

from spdjax.ci import CI_KINDS
from spdjax.fields import dataclass_from, to_dict
from spdjax.losses import LossConfig, loss_config_from  # noqa: F401  (re-exported)
from spdjax.sharding import MeshConfig
from spdjax.sites import SitePattern, as_patterns
from spdjax.train import OptimConfig

TOP_LEVEL = {
    "experiment", "seed", "target", "sites", "tied", "identity", "ci", "loss", "optim",
    "batch_size", "eval_batch_size", "log_every", "checkpoint_every", "keep_checkpoints",
    "eval_every", "figures_every", "mesh", "method", "apd",
}
METHODS = ("spd", "apd")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    experiment: str
    seed: int
    target: Any  # ConfigDict, interpreted by the experiment family
    sites: tuple[SitePattern, ...]
    tied: tuple[tuple[str, str], ...]
    identity: tuple[SitePattern, ...]
    ci_type: str
    ci_hidden: tuple[int, ...]
    loss: LossConfig
    optim: OptimConfig
    batch_size: int
    eval_batch_size: int
    log_every: int
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    eval_every: int = 1000
    figures_every: int = 0
    mesh: MeshConfig = MeshConfig()
    method: str = "spd"  # "apd": spdjax.apd (settings in the `apd` section, parsed by spdjax.apd.config)
    apd: Any = None


def load_config_file(spec: str | pathlib.Path, arg: str | None = None) -> ml_collections.ConfigDict:
    """The ConfigDict of a config file, as `--config=path[:arg]` would give it.

    `spec` is `path` or `path:arg` (the part after the first ':' is passed to `get_config`); an
    explicit `arg` may be given instead of the suffix, not with it.
    """
    path, sep, suffix = str(spec).partition(":")
    if sep and arg is not None:
        raise ValueError(f"load_config_file: give the argument once, got {spec!r} and arg={arg!r}")
    arg = suffix if sep else arg
    file = pathlib.Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    module_spec = importlib.util.spec_from_file_location(f"spdjax_config_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"config file {path} has no get_config(arg) function")
    return module.get_config(arg) if arg else module.get_config()


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"config.{name} must be an int >= 1, got {value!r}")
    return value


def _nonneg_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"config.{name} must be an int >= 0, got {value!r}")
    return value


def _method(value) -> str:
    if value not in METHODS:
        raise ValueError(f"config.method: unknown {value!r}; allowed: {list(METHODS)}")
    return value


def parse(cfg: ml_collections.ConfigDict) -> RunConfig:
    """Validate a run config; raises ValueError naming the offending field."""
    unknown = sorted(set(cfg.keys()) - TOP_LEVEL)
    if unknown:
        raise ValueError(f"config: unknown field(s) {unknown}; allowed: {sorted(TOP_LEVEL)}")
    for required in ("experiment", "sites", "optim"):
        if cfg.get(required) is None:
            raise ValueError(f"config.{required} is required")
    ci = to_dict(cfg.get("ci"), "ci")
    bad = sorted(set(ci) - {"type", "hidden"})
    if bad:
        raise ValueError(f"config.ci: unknown field(s) {bad}; allowed: ['hidden', 'type']")
    ci_type = ci.get("type", "mlp")
    if ci_type not in CI_KINDS:
        raise ValueError(f"config.ci.type: unknown CI function {ci_type!r}; allowed: {list(CI_KINDS)}")
    hidden = tuple(ci.get("hidden", (16,)))
    if any(isinstance(h, bool) or not isinstance(h, int) or h < 1 for h in hidden):
        raise ValueError(f"config.ci.hidden must be positive ints, got {hidden!r}")
    try:
        sites = as_patterns(tuple(tuple(s) for s in cfg.sites))
        identity = as_patterns(tuple(tuple(s) for s in cfg.get("identity", ()) or ())) if cfg.get("identity") else ()
    except (TypeError, ValueError) as e:
        raise ValueError(f"config.sites/identity: {e}") from None
    optim_values = to_dict(cfg.get("optim"), "optim")
    try:
        optim = dataclass_from(OptimConfig, optim_values, "optim")
    except TypeError as e:
        raise ValueError(f"config.optim: {e}") from None
    return RunConfig(
        experiment=str(cfg.experiment),
        seed=int(cfg.get("seed", 0)),
        target=cfg.get("target"),
        sites=sites,
        tied=tuple(tuple(t) for t in (cfg.get("tied", ()) or ())),
        identity=identity,
        ci_type=ci_type,
        ci_hidden=hidden,
        loss=loss_config_from(cfg.get("loss")),
        optim=optim,
        batch_size=_positive_int(cfg.get("batch_size", 1024), "batch_size"),
        eval_batch_size=_positive_int(cfg.get("eval_batch_size", cfg.get("batch_size", 1024)), "eval_batch_size"),
        log_every=_positive_int(cfg.get("log_every", 100), "log_every"),
        checkpoint_every=_positive_int(cfg.get("checkpoint_every", 1000), "checkpoint_every"),
        keep_checkpoints=_positive_int(cfg.get("keep_checkpoints", 3), "keep_checkpoints"),
        eval_every=_positive_int(cfg.get("eval_every", 1000), "eval_every"),
        figures_every=_nonneg_int(cfg.get("figures_every", 0), "figures_every"),
        mesh=dataclass_from(MeshConfig, to_dict(cfg.get("mesh"), "mesh"), "mesh"),
        method=_method(cfg.get("method", "spd")),
        apd=cfg.get("apd"),
    )


def run_config(
    *,
    experiment: str,
    target: dict,
    sites: tuple,
    ci_hidden: tuple[int, ...],
    minimality: float,
    pnorm: float,
    steps: int,
    lr: float,
    schedule: str,
    batch_size: int,
    tied: tuple = (),
    identity: tuple = (),
) -> ml_collections.ConfigDict:
    """A run config in the layout above, reference-main recipe (stochastic + layerwise recon, delta
    component, 200-step faithfulness warm-up), with every field present so `--config.*` can override it."""
    from ml_collections.config_dict import placeholder

    cfg = ml_collections.ConfigDict()
    cfg.experiment = experiment
    cfg.seed = 0
    cfg.target = ml_collections.ConfigDict(target)
    cfg.sites = sites
    cfg.tied = tied
    cfg.identity = identity
    cfg.ci = ml_collections.ConfigDict(dict(type="mlp", hidden=ci_hidden))
    cfg.loss = ml_collections.ConfigDict(
        dict(
            coeffs=dict(
                stochastic_recon=1.0, stochastic_recon_layerwise=1.0, importance_minimality=minimality
            ),
            pnorm=pnorm,
            n_mask_samples=1,
            mask_type="continuous",
            use_delta_component=True,
            output_loss="mse",
            sigmoid="leaky_hard",
            p_anneal_start_frac=1.0,
            p_anneal_final_p=placeholder(float),
            p_anneal_end_frac=1.0,
            minimality_beta=0.0,
            ci_l0_threshold=0.1,
            layerwise_unroll=placeholder(int),
            subset_routing="uniform_k",
            subset_p=0.5,
            pgd_init="random",
            pgd_n_steps=1,
            pgd_step_size=1.0,
            pgd_mask_scope="per_example",
        )
    )
    cfg.optim = ml_collections.ConfigDict(
        dict(
            steps=steps,
            lr=lr,
            schedule=schedule,
            warmup_frac=0.0,
            final_lr_frac=0.0,
            faithfulness_warmup_steps=200,
            faithfulness_warmup_lr=0.01,
            faithfulness_warmup_weight_decay=0.1,
            clip_components=placeholder(float),
            clip_ci=placeholder(float),
        )
    )
    cfg.batch_size = batch_size
    cfg.eval_batch_size = batch_size
    cfg.log_every = 100
    cfg.checkpoint_every = 1000
    cfg.keep_checkpoints = 3
    cfg.eval_every = 1000
    cfg.figures_every = 0
    cfg.mesh = ml_collections.ConfigDict(dict(data=1, model=1))
    return cfg


def shrink_for_smoke(cfg: ml_collections.ConfigDict, steps: int, every: int) -> ml_collections.ConfigDict:
    """The `:smoke` variant: a few SPD steps on batches of 256, logging/checkpointing every `every`; a
    faithfulness warm-up, if the recipe has one, shrinks to 10 steps."""
    cfg.optim.steps = steps
    cfg.optim.faithfulness_warmup_steps = min(cfg.optim.faithfulness_warmup_steps, 10)
    cfg.batch_size = cfg.eval_batch_size = 256
    cfg.log_every = cfg.checkpoint_every = cfg.eval_every = every
    return cfg

"""Run configs: ml_collections ConfigDict -> a frozen, validated `RunConfig`. Every error names the field.

Layout of a run config (configs/*.py show every field of their recipe):

    experiment: str            # experiment family: a package under experiments/ (e.g. "tms") or a module path
    method: str                # "spd" (default) or "apd": spdjax.methods.METHODS; it reads its own sections:
      ci, loss                 #   SPD: the CI function {type, hidden} and the loss terms (spdjax.losses)
      apd                      #   APD: spdjax.apd.config
    seed: int
    target: ConfigDict         # family-specific target settings
    sites: ((pattern, C), ...) # glob over module paths and C per matched site
    tied: ((site, primary), ...)
    identity: ((pattern, C), ...)   # identity inserted before the matched layers
    optim: {steps, lr, schedule, warmup_frac, final_lr_frac, ...}  (spdjax.optim.OptimConfig)
    batch_size: int, eval_batch_size: int, log_every: int
    checkpoint_every: int (steps between checkpoints; default 1000), keep_checkpoints: int (default 3)
    eval_every: int (held-out evaluation: every loss term, CI-L0, ground-truth metrics; default 1000)
    figures_every: int (figures during training, into figures/step_N; 0 = only at the end)
    mesh: {data, model, shard_target}  # device mesh axis sizes, target weights sharded over data (spdjax.sharding.MeshConfig)
    precision: {param_dtype, compute_dtype}   # "float32" (default), "bfloat16", "float16"

`parse_arg` is the one parser of config-file arguments (`--config=configs/x.py:2,paper,smoke`).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import pathlib
from types import SimpleNamespace
from typing import Any

import jax.numpy as jnp
import ml_collections

from spdjax import methods
from spdjax.fields import dataclass_from, to_dict
from spdjax.method import Method
from spdjax.optim import OptimConfig
from spdjax.sharding import MeshConfig
from spdjax.sites import SitePattern, as_patterns

GENERIC = {
    "experiment", "method", "seed", "target", "sites", "tied", "identity", "optim", "batch_size",
    "eval_batch_size", "log_every", "checkpoint_every", "keep_checkpoints", "eval_every", "figures_every",
    "mesh", "precision",
}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class PrecisionConfig:
    """`param_dtype`: the trained parameters (and Adam's state); `compute_dtype`: what the loss computes
    in (bf16 compute with float32 master weights is what accelerators want)."""

    param_dtype: str = "float32"
    compute_dtype: str = "float32"

    def __post_init__(self):
        for f in ("param_dtype", "compute_dtype"):
            if getattr(self, f) not in DTYPES:
                raise ValueError(f"config.precision.{f}: unknown {getattr(self, f)!r}; allowed: {list(DTYPES)}")

    @property
    def param(self):
        return DTYPES[self.param_dtype]

    @property
    def compute(self):
        """The compute dtype, or None when it equals the parameter dtype (nothing to cast)."""
        return None if self.compute_dtype == self.param_dtype else DTYPES[self.compute_dtype]


@dataclasses.dataclass(frozen=True)
class RunConfig:
    experiment: str
    method: Method  # the method, holding its parsed settings (`method.settings`)
    seed: int
    target: Any  # ConfigDict, interpreted by the experiment family
    sites: tuple[SitePattern, ...]
    tied: tuple[tuple[str, str], ...]
    identity: tuple[SitePattern, ...]
    optim: OptimConfig
    batch_size: int
    eval_batch_size: int
    log_every: int
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    eval_every: int = 1000
    figures_every: int = 0
    mesh: MeshConfig = MeshConfig()
    precision: PrecisionConfig = PrecisionConfig()


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




def parse_arg(arg: str | None, config: str, flags: tuple[str, ...] = (), named: tuple[str, ...] = (),
              **choices: tuple) -> SimpleNamespace:
    """The argument of a config file's `get_config(arg)`: comma-separated words, each a flag, one value
    of a choice, or `name=value` for a name in `named` (a free string, None when absent). `choices` map a
    name to its allowed values, the first being the default (None: no default). E.g.
    `parse_arg("2,smoke", "resid_mlp", ("smoke", "paper"), layers=("1", "2", "3"))` ->
    `namespace(smoke=True, paper=False, layers="2")`. One-line errors name the config file."""
    parts = [p.strip() for p in str(arg or "").split(",") if p.strip()]
    out = {f: False for f in flags}
    out.update({name: None for name in named})
    out.update({name: values[0] for name, values in choices.items()})
    seen: set[str] = set()
    words = list(flags) + [v for values in choices.values() for v in values if v is not None]
    words += [f"{n}=..." for n in named]
    for p in parts:
        if p in flags:
            out[p] = True
            continue
        name, eq, value = p.partition("=")
        if eq and name.strip() in named:
            name = name.strip()
            if name in seen or not value.strip():
                raise ValueError(f"configs/{config}.py: {name}= needs one non-empty value, got {arg!r}")
            seen.add(name)
            out[name] = value.strip()
            continue
        group = next((name for name, values in choices.items() if p in values), None)
        if group is None:
            raise ValueError(f"configs/{config}.py: unknown argument {p!r}; allowed: {', '.join(words)}")
        if group in seen:
            allowed = ", ".join(v for v in choices[group] if v is not None)
            raise ValueError(f"configs/{config}.py: at most one value of {group!r} ({allowed}), got {arg!r}")
        seen.add(group)
        out[group] = p
    return SimpleNamespace(**out)


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"config.{name} must be an int >= 1, got {value!r}")
    return value


def _nonneg_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"config.{name} must be an int >= 0, got {value!r}")
    return value


def parse(cfg: ml_collections.ConfigDict) -> RunConfig:
    """Validate a run config; raises ValueError naming the offending field."""
    method_cls = methods.get(cfg.get("method", "spd"))
    allowed = GENERIC | set(method_cls.sections)
    unknown = sorted(set(cfg.keys()) - allowed)
    if unknown:
        others = sorted({s for m in methods.METHODS.values() for s in m.sections} - set(method_cls.sections))
        hint = [u for u in unknown if u in others]
        extra = f" ({hint} belong to another method)" if hint else ""
        raise ValueError(f"config: unknown field(s) {unknown} for method {method_cls.name!r}{extra}; allowed: {sorted(allowed)}")
    for required in ("experiment", "sites", "optim"):
        if cfg.get(required) is None:
            raise ValueError(f"config.{required} is required")
    try:
        sites = as_patterns(tuple(tuple(s) for s in cfg.sites))
        identity = as_patterns(tuple(tuple(s) for s in cfg.get("identity", ()) or ())) if cfg.get("identity") else ()
    except (TypeError, ValueError) as e:
        raise ValueError(f"config.sites/identity: {e}") from None
    try:
        optim = dataclass_from(OptimConfig, to_dict(cfg.get("optim"), "optim"), "optim")
    except TypeError as e:
        raise ValueError(f"config.optim: {e}") from None
    return RunConfig(
        experiment=str(cfg.experiment),
        method=method_cls.from_config(cfg, optim),
        seed=int(cfg.get("seed", 0)),
        target=cfg.get("target"),
        sites=sites,
        tied=tuple(tuple(t) for t in (cfg.get("tied", ()) or ())),
        identity=identity,
        optim=optim,
        batch_size=_positive_int(cfg.get("batch_size", 1024), "batch_size"),
        eval_batch_size=_positive_int(cfg.get("eval_batch_size", cfg.get("batch_size", 1024)), "eval_batch_size"),
        log_every=_positive_int(cfg.get("log_every", 100), "log_every"),
        checkpoint_every=_positive_int(cfg.get("checkpoint_every", 1000), "checkpoint_every"),
        keep_checkpoints=_positive_int(cfg.get("keep_checkpoints", 3), "keep_checkpoints"),
        eval_every=_positive_int(cfg.get("eval_every", 1000), "eval_every"),
        figures_every=_nonneg_int(cfg.get("figures_every", 0), "figures_every"),
        mesh=dataclass_from(MeshConfig, to_dict(cfg.get("mesh"), "mesh"), "mesh"),
        precision=dataclass_from(PrecisionConfig, to_dict(cfg.get("precision"), "precision"), "precision"),
    )

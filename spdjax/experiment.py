"""What an experiment family gives the runner: a target, its data and its ground-truth analysis.

A family is any module with `build(run: spdjax.config.RunConfig, cache_dir: pathlib.Path) ->
Experiment`; the entry point (launch.py, via `experiments.builder`) picks it from the config's
`experiment` field and hands the runner a `build(run) -> Experiment` callable, so the library never
imports an experiment.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

from jaxtyping import Array

from spdjax.data import HostData
from spdjax.targets.base import Target


@dataclasses.dataclass(frozen=True)
class TokenInfo:
    """vocab_size; decode: token id -> text shown in the browser; attention: `batch -> {module path:
    (B, heads, T, T)}` the target's attention patterns, for the sites under each module path (e.g.
    `blocks.0.attn` for `blocks.0.attn.q`), None if the family gives none."""

    vocab_size: int
    decode: Callable[[int], str] = str
    attention: Callable[[Any], dict[str, Array]] | None = None


@dataclasses.dataclass
class Experiment:
    """target: the trained target with its sites chosen (from `run.sites`, `run.tied`, `run.identity`).
    batch_fn: `key -> batch` of `run.batch_size` examples, pure and jittable (sampled on device), or
    host_data: a `spdjax.data.HostData` (host-side, checkpointable); exactly one of the two.
    analyze: `(params, target, workdir, loss_config) -> summary dict` of ground-truth metrics of an SPD
      decomposition (flat, JSON-able) and PNG figures in `workdir` (None: no figures); None if the
      family has no ground truth.
    info: facts about the target worth recording (e.g. the seed its training ended up using).
    mechanisms: `(params, target, sigmoid) -> spdjax.clustering.MechanismTruth`, the mechanism each
      subcomponent serves (the ground truth clusterings are scored against); None if unknown.
    tokens: for families whose inputs are token sequences (`TokenInfo`), else None.
    harvest_data: `i -> the i-th held-out batch, None past the end` for the harvest (None: the sampler
      with fresh keys, or the host data's held-out batches).
    """

    target: Target
    batch_fn: Callable[[Array], Any] | None = None
    analyze: Callable[..., dict] | None = None
    info: dict = dataclasses.field(default_factory=dict)
    host_data: HostData | None = None
    mechanisms: Callable[..., Any] | None = None
    tokens: TokenInfo | None = None
    harvest_data: Callable[[int], Any] | None = None

    def __post_init__(self):
        if (self.batch_fn is None) == (self.host_data is None):
            raise ValueError("Experiment: give exactly one of batch_fn (on-device sampler) or host_data")


Build = Callable[[Any], Experiment]  # build(run_config) -> Experiment, the cache directory bound
Family = Callable[[Any, Path], Experiment]

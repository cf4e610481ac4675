"""Experiment families: each builds a target, its data and its ground-truth analysis from a config.

A family module exposes `build(run: spdjax.config.RunConfig, cache_dir: pathlib.Path) -> Experiment`.
"""

from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path
from typing import Any, Callable

from jaxtyping import Array

from spdjax.decomposition import SPDParams
from spdjax.targets.base import Target

FAMILIES = ("tms", "resid_mlp")


@dataclasses.dataclass
class Experiment:
    """What `launch.py` needs from a family.

    target: the trained target with its sites chosen (from `run.sites`, `run.tied`, `run.identity`).
    batch_fn: `key -> batch` of `run.batch_size` examples; pure and jittable (sampled on device).
    analyze: `(params, target, workdir) -> summary dict` of ground-truth metrics (flat, JSON-able
      floats/ints/lists) and figures written as PNG into `workdir`; `workdir=None` skips the figures
      (periodic evaluation).
    info: facts about the target worth recording (e.g. the seed its training ended up using).
    """

    target: Target
    batch_fn: Callable[[Array], Any]
    analyze: Callable[[SPDParams, Target, Path], dict]
    info: dict = dataclasses.field(default_factory=dict)


def build(run, cache_dir: Path) -> Experiment:
    if run.experiment not in FAMILIES:
        raise ValueError(f"config.experiment: unknown family {run.experiment!r}; allowed: {list(FAMILIES)}")
    module = importlib.import_module(f"experiments.{run.experiment}")
    return module.build(run, Path(cache_dir))

"""Experiment families: each builds a target, its data and its ground-truth analysis from a config.

A family is a package here (or any importable module, named by its dotted path in the config's
`experiment` field) with `build(run: spdjax.config.RunConfig, cache_dir: pathlib.Path) ->
spdjax.experiment.Experiment`. `builder(cache_dir)` is what launch.py hands the runner.
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path
from types import ModuleType

from spdjax.experiment import Build, Experiment

__all__ = ["Experiment", "available", "build", "builder", "family"]


def available() -> list[str]:
    """The families in this package: its subpackages with a `build` function."""
    names = sorted(m.name for m in pkgutil.iter_modules(__path__) if m.ispkg)
    return [n for n in names if callable(getattr(importlib.import_module(f"experiments.{n}"), "build", None))]


def family(name: str) -> ModuleType:
    """The family module named `name`: `experiments.<name>`, or a dotted module path of the user's."""
    module_name = name if "." in name else f"experiments.{name}"
    if "." not in name and name not in available():
        raise ValueError(f"config.experiment: unknown family {name!r}; allowed: {available()} or a module path")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        raise ValueError(f"config.experiment: cannot import {module_name!r} ({e})") from None
    if not callable(getattr(module, "build", None)):
        raise ValueError(f"config.experiment: module {module_name!r} has no build(run, cache_dir) function")
    return module


def build(run, cache_dir: Path) -> Experiment:
    return family(run.experiment).build(run, Path(cache_dir))


def builder(cache_dir: str | Path) -> Build:
    """`build(run_config) -> Experiment` with the target cache directory bound (what the runner takes)."""
    return lambda run: build(run, Path(cache_dir))

"""Shared by the tests: run a config through the runner as launch.py does."""

from __future__ import annotations

from pathlib import Path

import experiments
from spdjax.runner import RunOptions, run


def run_config(cfg, workdir: Path, cache: Path, **options):
    """`spdjax.runner.run` with the experiments' builder (target cache `cache`) and `RunOptions(**options)`."""
    return run(cfg, workdir, experiments.builder(cache), RunOptions(**options))

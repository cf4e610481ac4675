"""Shared by the tests: run a config through the runner as launch.py does."""

from __future__ import annotations

from pathlib import Path

import experiments
from spdjax.runner import RunOptions, run


def run_config(cfg, workdir: Path, cache: Path, **options):
    """`spdjax.runner.run` with the experiments' builder (target cache `cache`) and `RunOptions(**options)`."""
    return run(cfg, workdir, experiments.builder(cache), RunOptions(**options))


def edit_json(path: Path, edit) -> None:
    """Rewrite the JSON file `path` after `edit(obj)` changed its object in place."""
    import json

    obj = json.loads(path.read_text())
    edit(obj)
    path.write_text(json.dumps(obj))


def assert_trees_equal(a, b) -> None:
    """Same structure and bitwise equal leaves."""
    import jax
    import numpy as np

    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

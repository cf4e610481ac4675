"""Shared by the tests: run a config through the runner as launch.py does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import experiments
from spdjax.runner import RunOptions, run

ROOT = Path(__file__).resolve().parents[1]
# A subprocess run: one CPU device, the fast-compiling XLA settings of the tests.
SUBPROCESS_ENV = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
                  "JAX_DISABLE_MOST_OPTIMIZATIONS": "1"}


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


# Runs a config (`config` file, its argument, dotted overrides) through the runner and SIGKILLs itself at
# the point named by `kill`: "save:S" right after the asynchronous save of step S started, "eval:S"
# after the evaluation of step S was computed but before its row was written, "log:S" right after the
# metrics line of step S; "" runs to the end.
FAULT_SCRIPT = r"""
import json, os, signal, sys
from pathlib import Path
import experiments
from spdjax import runner
from spdjax.checkpoint import Checkpointer
from spdjax.config import load_config_file

workdir, cache, kill, config, arg, overrides = sys.argv[1:7]
cfg = load_config_file(Path(config), arg)
for dotted, value in json.loads(overrides).items():
    *path, last = dotted.split(".")
    node = cfg
    for part in path:
        node = node[part]
    node[last] = value
kind, _, at = kill.partition(":")
at = int(at or 0)


def die():
    os.kill(os.getpid(), signal.SIGKILL)


if kind == "save":
    save = Checkpointer.save

    def patched(self, state, extra=None):
        save(self, state, extra)
        if int(state.step) == at:
            die()

    Checkpointer.save = patched
elif kind == "eval":
    evaluate = runner.Run.evaluate

    def patched(self, params, step, figures, lead):
        out = evaluate(self, params, step, figures, lead)
        if step == at:
            die()
        return out

    runner.Run.evaluate = patched
elif kind == "log":
    on_log = runner.Session.on_log

    def patched(self, record):
        on_log(self, record)
        if record.step == at:
            die()

    runner.Session.on_log = patched
runner.run(cfg, workdir, experiments.builder(cache), runner.RunOptions(quiet=True))
"""


def fault_session(workdir: Path, cache: Path, kill: str, config: Path, arg: str, overrides: dict,
                  env: dict | None = None) -> subprocess.CompletedProcess:
    """One `FAULT_SCRIPT` process (the repository root as cwd)."""
    return subprocess.run(
        [sys.executable, "-c", FAULT_SCRIPT, str(workdir), str(cache), kill, str(config), arg, json.dumps(overrides)],
        capture_output=True, text=True, timeout=900, cwd=ROOT, env=env or SUBPROCESS_ENV,
    )


def jsonl_records(path: Path) -> list[dict]:
    """The rows of a metrics / eval JSONL file without their wall times (which differ between runs)."""
    out = []
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        rec.pop("wall_time_s", None)
        out.append(rec)
    return out


def saved_params(workdir: Path) -> dict:
    """The final decomposition a run exported (name -> NumPy array)."""
    from safetensors.numpy import load_file

    return load_file(str(workdir / "decomposition" / "decomposition.safetensors"))

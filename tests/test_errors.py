"""Bad input gives a one-line error naming the field (and the allowed values), before any compilation."""

import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import pytest
from flax import nnx

import spdjax
from experiments import Experiment
from spdjax.run import check_batch

ROOT = Path(__file__).resolve().parents[1]

CASES = [
    ("--config.foo=1", "unknown config field 'foo'"),
    ("--config.loss.bogus=1", "unknown config field 'bogus'"),
    ("--config.optim.lr=abc", "could not convert string to float: 'abc'"),
    ("--config.loss.n_mask_samples=0", "loss.n_mask_samples must be an int >= 1, got 0"),
    ("--config.loss.pnorm=0.0", "loss.pnorm must be > 0"),
    ("--config.ci.type=foo", "config.ci.type: unknown CI function 'foo'; allowed: ['mlp', 'vector_mlp', 'shared_mlp']"),
    ("--config.loss.sigmoid=tanh", "sigmoid: unknown sigmoid 'tanh'; allowed:"),
    ("--config.loss.output_loss=l1", "loss.output_loss: unknown 'l1'; allowed: ['mse', 'kl']"),
    ("--config.optim.schedule=exp", "optim.schedule: unknown 'exp'; allowed:"),
    ("--config.target.weights_path=/nonexistent/w.npz", "config.target.weights_path: target file '/nonexistent/w.npz' does not exist"),
]


@pytest.mark.parametrize("override,message", CASES, ids=[c[0] for c in CASES])
def test_launch_one_line_errors(tmp_path, override, message):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "launch.py"), f"--config={ROOT / 'configs' / 'tms_5-2.py'}:smoke",
         f"--workdir={tmp_path / 'wd'}", f"--cache_dir={tmp_path / 'cache'}", "--quiet", override],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )
    assert proc.returncode == 1
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith("error: ") and message in lines[0], lines[0]
    assert not (tmp_path / "cache").exists()  # refused before the target was trained


class Model(nnx.Module):
    def __init__(self, rngs):
        self.fc = nnx.Linear(4, 3, rngs=rngs)

    def __call__(self, x):
        return self.fc(x)


def test_batch_that_does_not_fit_the_target():
    target = spdjax.from_nnx(Model(nnx.Rngs(0)), {"fc": 2})
    good = Experiment(target, lambda k: jnp.zeros((8, 4)), analyze=None)
    check_batch(good)
    bad = Experiment(target, lambda k: jnp.zeros((8, 5)), analyze=None)
    with pytest.raises(ValueError, match=r"batch float32\[8, 5\] does not fit the target: .*") as e:
        check_batch(bad)
    assert "\n" not in str(e.value)

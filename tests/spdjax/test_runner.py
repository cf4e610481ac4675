"""Checkpoints: exact resume, config-change refusal, corrupt-checkpoint fall-back, NaN stop."""

from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from helpers import run_config as run
from safetensors.numpy import load_file

from spdjax.config import load_config_file
from spdjax.runner import ConfigMismatchError
from spdjax.train import Cadence, Hooks, NonFiniteError, run_steps

ROOT = Path(__file__).resolve().parents[2]


def smoke_config(**overrides):
    cfg = load_config_file(ROOT / "configs" / "tms_5-2.py", "smoke")
    cfg.optim.steps = 24
    cfg.log_every = 4
    cfg.checkpoint_every = 8
    for k, v in overrides.items():
        node = cfg
        *path, last = k.split(".")
        for p in path:
            node = node[p]
        node[last] = v
    return cfg


def final_params(workdir: Path) -> dict:
    return load_file(str(workdir / "decomposition" / "decomposition.safetensors"))


def assert_bitwise_equal(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert np.array_equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    base = tmp_path_factory.mktemp("resume")
    run(smoke_config(), base / "full", base / "cache", quiet=True)
    return base


def test_interrupted_and_resumed_equals_uninterrupted(uninterrupted):
    base = uninterrupted
    wd = base / "interrupted"
    assert run(smoke_config(), wd, base / "cache", quiet=True, stop_at_step=8) is None
    assert run(smoke_config(), wd, base / "cache", quiet=True, stop_at_step=16) is None
    summary = run(smoke_config(), wd, base / "cache", quiet=True)
    assert summary["steps"] == 24
    assert_bitwise_equal(final_params(base / "full"), final_params(wd))
    steps = [int(line.split('"step": ')[1].split(",")[0]) for line in (wd / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(4, 25, 4))  # one line per log step, none duplicated by the resumes


def test_changed_config_is_refused_then_allowed_or_fresh(uninterrupted, tmp_path):
    base = uninterrupted
    wd = tmp_path / "wd"
    run(smoke_config(), wd, base / "cache", quiet=True, stop_at_step=8)
    changed = smoke_config(**{"loss.terms.importance_minimality.pnorm": 2.0, "optim.lr": 0.01})
    with pytest.raises(ConfigMismatchError, match=r"loss\.terms\.importance_minimality\.pnorm: 1\.0 -> 2\.0.*optim\.lr: 0\.001 -> 0\.01"):
        run(changed, wd, base / "cache", quiet=True)
    assert run(changed, wd, base / "cache", quiet=True, allow_config_change=True)["steps"] == 24
    fresh = run(smoke_config(), wd, base / "cache", quiet=True, fresh=True)
    assert fresh["steps"] == 24
    assert_bitwise_equal(final_params(base / "full"), final_params(wd))


def test_corrupt_latest_checkpoint_falls_back(uninterrupted, tmp_path, capsys):
    base = uninterrupted
    wd = tmp_path / "wd"
    run(smoke_config(), wd, base / "cache", quiet=True, stop_at_step=16)
    latest = wd / "checkpoints" / "16"
    for f in (latest / "state").rglob("*"):
        if f.is_file():
            f.write_bytes(b"")  # truncated
    capsys.readouterr()
    run(smoke_config(), wd, base / "cache", quiet=True)
    out = capsys.readouterr().out
    assert "checkpoint at step 16" in out and "falling back to step 8" in out
    assert_bitwise_equal(final_params(base / "full"), final_params(wd))


def test_nan_stops_with_step_and_term_and_is_not_checkpointed():
    saved = []

    class S:
        def __init__(self, step):
            self.step = jnp.asarray(step)
            self.params = {"w": jnp.ones(3)}

    def step_fn(state, target, batch):
        n = int(state.step) + 1
        bad = jnp.nan if n >= 6 else 1.0
        return S(n), {"loss/total": jnp.asarray(bad), "loss/stochastic_recon": jnp.asarray(bad), "loss/ok": jnp.asarray(1.0)}

    class Saves(Hooks):
        checkpoints = True

        def on_checkpoint(self, state):
            saved.append(int(state.step))

    with pytest.raises(NonFiniteError, match=r"step 6: non-finite value in loss/stochastic_recon, loss/total"):
        run_steps(S(0), step_fn, None, Cadence(20, log_every=3, checkpoint_every=4), Saves())
    assert saved == [4]

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


# ----------------------------------------------------------------------------- issue 24: damaged files, locks


def _flip_byte(path: Path, at: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * at)] ^= 0x40
    path.write_bytes(bytes(data))


def _data_files(checkpoint: Path) -> list[Path]:
    return [f for f in (checkpoint / "state").rglob("*") if f.is_file() and f.parent.name == "d"]


def test_flipped_byte_is_damage_and_falls_back(uninterrupted, tmp_path, capsys):
    base = uninterrupted
    wd = tmp_path / "wd"
    run(smoke_config(), wd, base / "cache", quiet=True, stop_at_step=16)
    for f in _data_files(wd / "checkpoints" / "16"):  # a few single-bit flips in the array data
        for at in (0.1, 0.3, 0.5):
            _flip_byte(f, at)
    capsys.readouterr()
    run(smoke_config(), wd, base / "cache", quiet=True)
    out = capsys.readouterr().out
    assert "checkpoint at step 16" in out and "damaged" in out and "falling back to step 8" in out
    assert_bitwise_equal(final_params(base / "full"), final_params(wd))


def test_config_change_that_cannot_resume_moves_nothing(uninterrupted, tmp_path):
    """A new C with --allow_config_change: one-line error, healthy checkpoints stay, config.json unchanged,
    and the original command still resumes."""
    from spdjax.checkpoint import CheckpointMismatchError

    base = uninterrupted
    wd = tmp_path / "wd"
    run(smoke_config(), wd, base / "cache", quiet=True, stop_at_step=16)
    saved_config = (wd / "config.json").read_text()
    steps = sorted(p.name for p in (wd / "checkpoints").iterdir())
    changed = smoke_config(sites=(("linear1", 24), ("linear2", 24)))
    with pytest.raises(CheckpointMismatchError, match=r"does not fit this run \(\['params'\].*: saved float32\[.*20.*\], this run float32\[.*24.*\]\)") as e:
        run(changed, wd, base / "cache", quiet=True, allow_config_change=True)
    assert "\n" not in str(e.value)
    assert sorted(p.name for p in (wd / "checkpoints").iterdir()) == steps
    assert not (wd / "checkpoints_unreadable").exists()
    assert (wd / "config.json").read_text() == saved_config
    run(smoke_config(), wd, base / "cache", quiet=True)
    assert_bitwise_equal(final_params(base / "full"), final_params(wd))


def test_every_checkpoint_damaged_is_refused_until_fresh(uninterrupted, tmp_path):
    from spdjax.checkpoint import CheckpointError

    base = uninterrupted
    wd = tmp_path / "wd"
    run(smoke_config(), wd, base / "cache", quiet=True, stop_at_step=16)
    for step in ("8", "16"):
        for f in (wd / "checkpoints" / step / "state").rglob("*"):
            if f.is_file():
                f.write_bytes(b"")
    metrics_before = (wd / "metrics.jsonl").read_text()
    with pytest.raises(CheckpointError, match=r"every checkpoint in .* is damaged .*pass --fresh"):
        run(smoke_config(), wd, base / "cache", quiet=True)
    # again: refused (not restarted at step 0 over the earlier outputs)
    with pytest.raises(CheckpointError, match=r"holds no readable checkpoint, only damaged ones"):
        run(smoke_config(), wd, base / "cache", quiet=True)
    assert (wd / "metrics.jsonl").read_text() == metrics_before
    run(smoke_config(), wd, base / "cache", quiet=True, fresh=True)
    assert_bitwise_equal(final_params(base / "full"), final_params(wd))


def test_garbled_config_json_and_metrics_line(uninterrupted, tmp_path):
    from spdjax.workdir import WorkdirError

    base = uninterrupted
    wd = tmp_path / "wd"
    run(smoke_config(), wd, base / "cache", quiet=True, stop_at_step=8)
    (wd / "config.json").write_text('{"experiment": "tms", ')
    with pytest.raises(WorkdirError, match=r"config.json \(the saved config of the run in this workdir\) is unreadable"):
        run(smoke_config(), wd, base / "cache", quiet=True)
    run(smoke_config(), wd, base / "cache", quiet=True, fresh=True)
    with (wd / "metrics.jsonl").open("a") as f:
        f.write('{"step": 99, "loss/total": \n')  # a garbled (partial) last line
    import experiments
    from spdjax.runner import analyze

    with pytest.warns(UserWarning, match="dropping unparsable line"):
        (wd / "metrics.jsonl").write_text((wd / "metrics.jsonl").read_text() + "garbage\n")
        summary = analyze(smoke_config(), wd, experiments.builder(base / "cache"))
    assert summary["steps"] == 24
    (wd / "summary.json").write_text("{")
    with pytest.raises(WorkdirError, match=r"summary.json \(the run's summary\) is unreadable"):
        analyze(smoke_config(), wd, experiments.builder(base / "cache"))


def test_workdir_that_is_a_file_and_checkpoints_that_cannot_be_written(uninterrupted, tmp_path):
    from spdjax.checkpoint import CheckpointError
    from spdjax.workdir import WorkdirError

    base = uninterrupted
    (tmp_path / "file").write_text("x")
    with pytest.raises(WorkdirError, match=r"workdir .*file exists and is not a directory"):
        run(smoke_config(), tmp_path / "file", base / "cache", quiet=True)
    wd = tmp_path / "wd"
    wd.mkdir()
    (wd / "checkpoints").write_text("not a directory")
    with pytest.raises(CheckpointError, match=r"the checkpoint directory .*checkpoints is not a directory; move it away"):
        run(smoke_config(), wd, base / "cache", quiet=True)
    assert not (wd / "metrics.jsonl").exists()  # refused before training


def test_evaluation_row_is_written_before_the_checkpoint(uninterrupted, tmp_path):
    """eval_every == checkpoint_every: the row of step 8 exists once the checkpoint of step 8 does; after
    resuming there is exactly one row per evaluation step."""
    import json

    base = uninterrupted
    wd = tmp_path / "wd"
    cfg = lambda: smoke_config(eval_every=8)  # noqa: E731
    run(cfg(), wd, base / "cache", quiet=True, stop_at_step=8)
    rows = [json.loads(x)["step"] for x in (wd / "eval.jsonl").read_text().splitlines()]
    assert rows == [8]
    run(cfg(), wd, base / "cache", quiet=True)
    rows = [json.loads(x)["step"] for x in (wd / "eval.jsonl").read_text().splitlines()]
    assert rows == [8, 16, 24]


def test_non_finite_is_caught_at_the_first_bad_step_between_log_steps():
    class S:
        def __init__(self, step):
            self.step = jnp.asarray(step)
            self.params = {"w": jnp.ones(3)}

    def step_fn(state, target, batch):
        n = int(state.step) + 1
        return S(n), {"loss/a": jnp.asarray(jnp.inf if n == 3 else 1.0), "loss/b": jnp.asarray(1.0)}

    with pytest.raises(NonFiniteError, match=r"^step 3: non-finite value in loss/a$"):
        run_steps(S(0), step_fn, None, Cadence(20, log_every=10))

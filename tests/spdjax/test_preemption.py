"""Runs that survive the cluster, tested as they happen: SIGKILL at several points (during a checkpoint
save, during an evaluation, after a log line), SIGTERM / SIGINT, and a second launch on a busy workdir.
Every run here is a `launch.py`-like subprocess on the tms_5-2 smoke config."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import ROOT, SUBPROCESS_ENV, fault_session, jsonl_records, saved_params

# The tms_5-2 smoke config, 24 steps; log every 4, checkpoint and evaluate every 8.
SMOKE = (ROOT / "configs" / "tms_5-2.py", "smoke", {"optim.steps": 24, "log_every": 4, "checkpoint_every": 8,
                                                    "eval_every": 8})


def _session(workdir: Path, cache: Path, kill: str = "") -> subprocess.CompletedProcess:
    return fault_session(workdir, cache, kill, *SMOKE, env=SUBPROCESS_ENV)


def test_fault_injection_matches_an_uninterrupted_run(tmp_path):
    cache = tmp_path / "cache"
    full = _session(tmp_path / "full", cache)
    assert full.returncode == 0, full.stderr[-2000:]
    wd = tmp_path / "killed"
    for kill in ("eval:8", "save:16", "log:20"):
        proc = _session(wd, cache, kill)
        assert proc.returncode == -signal.SIGKILL, (kill, proc.stderr[-2000:])
    last = _session(wd, cache)
    assert last.returncode == 0, last.stderr[-2000:]
    a, b = saved_params(tmp_path / "full"), saved_params(wd)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    for name in ("metrics.jsonl", "eval.jsonl"):
        want, got = jsonl_records(tmp_path / "full" / name), jsonl_records(wd / name)
        assert [r["step"] for r in got] == [r["step"] for r in want], name
        assert got == want, name
    assert [r["step"] for r in jsonl_records(wd / "eval.jsonl")] == [8, 16, 24]
    assert not list((wd / "checkpoints").glob("*tmp*"))


LONG = ["--config.optim.steps=400", "--config.log_every=10", "--config.checkpoint_every=1000", "--config.eval_every=1000"]


def _launch(workdir: Path, cache: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(ROOT / "launch.py"), f"--config={ROOT / 'configs' / 'tms_5-2.py'}:smoke",
         f"--workdir={workdir}", f"--cache_dir={cache}", "--quiet", *LONG, *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=SUBPROCESS_ENV,
    )


def _wait_for_step(workdir: Path, step: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        f = workdir / "metrics.jsonl"
        if f.exists() and any(json.loads(x)["step"] >= step for x in f.read_text().splitlines() if x.endswith("}")):
            return
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        time.sleep(0.2)
    raise AssertionError(f"no step {step} within {timeout} s")


@pytest.fixture(scope="module")
def uninterrupted_long(tmp_path_factory):
    base = tmp_path_factory.mktemp("long")
    proc = _launch(base / "full", base / "cache")
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-2000:]
    return base


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_checkpoints_and_exits_for_requeue(uninterrupted_long, tmp_path, sig):
    base = uninterrupted_long
    wd = tmp_path / "run"
    proc = _launch(wd, base / "cache")
    _wait_for_step(wd, 20, proc)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, err[-2000:]
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines[-1].startswith(f"stopped by {sig.name} after step ") and "checkpoint written" in lines[-1], lines[-3:]
    step = int(lines[-1].split("after step ")[1].split(":")[0])
    assert 20 <= step < 400
    assert (wd / "checkpoints" / str(step)).is_dir()
    assert not [p for p in (wd / "checkpoints").iterdir() if "tmp" in p.name]
    assert json.loads((wd / "metrics.jsonl").read_text().splitlines()[-1])["step"] == step  # flushed
    resumed = _launch(wd, base / "cache")
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-2000:]
    assert f"resuming from the checkpoint at step {step}" in out
    a, b = saved_params(base / "full"), saved_params(wd)
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_second_launch_on_a_busy_workdir_is_refused(tmp_path):
    wd = tmp_path / "run"
    wd.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from spdjax.workdir import WorkdirLock; "
         "WorkdirLock(Path(sys.argv[1])).acquire(); print('held', flush=True); time.sleep(300)", str(wd)],
        stdout=subprocess.PIPE, text=True, cwd=ROOT, env=SUBPROCESS_ENV,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        second = _launch(wd, tmp_path / "cache")
        out, err = second.communicate(timeout=300)
        assert second.returncode == 1
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith(f"error: workdir {wd} is in use by another run (host ")
        assert f"pid {holder.pid})" in lines[0]
        assert not (wd / "metrics.jsonl").exists() and not (tmp_path / "cache").exists()
    finally:
        holder.kill()
        holder.wait()
    # the holder is gone (even killed): its stale lock file does not block the next run
    again = _launch(wd, tmp_path / "cache", "--config.optim.steps=4")
    out, err = again.communicate(timeout=300)
    assert again.returncode == 0, err[-2000:]

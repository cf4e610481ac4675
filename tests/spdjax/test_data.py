"""A host-side (Grain) data iterator is checkpointed with the training state: a run killed with SIGKILL
mid-training resumes reading exactly the batches an uninterrupted run reads, and ends bit-for-bit equal."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

ROOT = Path(__file__).resolve().parents[2]

# Runs configs/sparse_linear.py:smoke (12 steps, checkpoints every 4) with the family's host data wrapped
# so that every batch read is logged (its sum) and the process SIGKILLs itself when it asks for batch
# number KILL_AT of this session (0: never).
SCRIPT = r"""
import json, os, signal, sys
from pathlib import Path
import numpy as np
import experiments
from spdjax.config import load_config_file
from spdjax.runner import RunOptions, run

workdir, log, kill_at = sys.argv[1], sys.argv[2], int(sys.argv[3])
cfg = load_config_file(Path(sys.argv[4]) / "configs" / "sparse_linear.py", "smoke")


class Logged:
    def __init__(self, it):
        self.it, self.n = it, 0

    def __next__(self):
        self.n += 1
        if self.n == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        batch = next(self.it)
        with open(log, "a") as f:
            f.write(json.dumps(float(np.asarray(batch, np.float64).sum())) + "\n")
        return batch

    def get_state(self):
        return self.it.get_state()

    def set_state(self, state):
        self.it.set_state(state)


class LoggedData:
    def __init__(self, data):
        self.data = data

    def train_iterator(self):
        return Logged(self.data.train_iterator())

    def held_out(self, index):
        return self.data.held_out(index)


def build(rc):
    exp = experiments.build(rc, Path(workdir) / "cache")
    exp.host_data = LoggedData(exp.host_data)
    return exp


run(cfg, workdir, build, RunOptions(quiet=False))
"""


def _run(tmp: Path, name: str, kill_at: int = 0) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp / name), str(tmp / f"{name}.log"), str(kill_at), str(ROOT)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )


def test_host_iterator_resumes_at_its_position_after_sigkill(tmp_path):
    full = _run(tmp_path, "full")
    assert full.returncode == 0, full.stderr[-2000:]
    killed = _run(tmp_path, "killed", kill_at=11)  # dies asking for batch 11: checkpoint 4 is complete
    assert killed.returncode == -9, killed.stderr[-2000:]
    resumed = _run(tmp_path, "killed")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    m = re.search(r"resuming from the checkpoint at step (\d+)", resumed.stdout + resumed.stderr)
    assert m, resumed.stdout[-2000:]
    start = int(m.group(1))
    assert start in (4, 8)

    full_log = [json.loads(x) for x in (tmp_path / "full.log").read_text().split()]
    killed_log = [json.loads(x) for x in (tmp_path / "killed.log").read_text().split()]
    assert len(full_log) == 12
    # the killed session read batches 1..10, the resumed one read full_log[start:] after them
    assert killed_log[:10] == full_log[:10]
    assert killed_log[10:] == full_log[start:]

    a = load_file(str(tmp_path / "full" / "decomposition" / "decomposition.safetensors"))
    b = load_file(str(tmp_path / "killed" / "decomposition" / "decomposition.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert np.array_equal(a[k], b[k]), k

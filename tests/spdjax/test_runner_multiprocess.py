"""A real two-process run on localhost (jax.distributed with a local coordinator, CPU collectives over
gloo, 2 CPU devices per process, the C axis sharded over `model`) gives the same decomposition and
summary as one process on one device; only process 0 writes the outputs."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

ROOT = Path(__file__).resolve().parents[2]
CONFIG = f"--config={ROOT / 'configs' / 'resid_mlp.py'}:1,smoke"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _env(n_devices: int) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={n_devices}"
    env["JAX_PLATFORMS"] = "cpu"
    env["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"  # small compiles (as conftest.py does in-process)
    return env


def _cmd(workdir: Path, cache: Path, *extra: str) -> list[str]:
    return [sys.executable, str(ROOT / "launch.py"), CONFIG, f"--workdir={workdir}", f"--cache_dir={cache}",
            "--quiet", *extra]


def test_two_processes_equal_one(tmp_path):
    cache = tmp_path / "cache"
    one = subprocess.run(_cmd(tmp_path / "one", cache), env=_env(1), capture_output=True, text=True,
                         timeout=300, cwd=ROOT)
    assert one.returncode == 0, one.stderr[-3000:]

    port = _free_port()
    procs = [
        subprocess.Popen(
            _cmd(tmp_path / "two", cache, "--config.mesh.data=-1", "--config.mesh.model=2",
                 f"--coordinator_address=localhost:{port}", "--num_processes=2", f"--process_id={i}"),
            env=_env(2), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        )
        for i in range(2)
    ]
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=300))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    assert "summary:" in outs[0][0] and "summary:" not in outs[1][0]  # only process 0 reports

    a = load_file(str(tmp_path / "one" / "decomposition" / "decomposition.safetensors"))
    b = load_file(str(tmp_path / "two" / "decomposition" / "decomposition.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-4, atol=1e-5, err_msg=k)
    sa = json.loads((tmp_path / "one" / "summary.json").read_text())
    sb = json.loads((tmp_path / "two" / "summary.json").read_text())
    for k in ("final/loss/total", "final/loss/stochastic_recon", "final/loss/importance_minimality"):
        np.testing.assert_allclose(sb[k], sa[k], rtol=1e-4, err_msg=k)
    lines = lambda d: (d / "metrics.jsonl").read_text().strip().splitlines()  # noqa: E731
    assert len(lines(tmp_path / "two")) == len(lines(tmp_path / "one"))  # written once, by process 0
    assert sorted(p.name for p in (tmp_path / "two" / "checkpoints").iterdir() if p.name.isdigit()) == ["10", "5"]

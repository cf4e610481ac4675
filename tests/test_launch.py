"""End-to-end smoke runs of launch.py, one per TMS config; the target cache is reused."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ["tms_5-2", "tms_5-2_id", "tms_40-10", "tms_40-10_id"]


def launch(config: str, workdir: Path, cache: Path, *extra: str) -> dict:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "launch.py"), f"--config={ROOT / 'configs' / config}.py:smoke",
         f"--workdir={workdir}", f"--cache_dir={cache}", "--quiet", *extra],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "summary:" in proc.stdout
    return json.loads((workdir / "summary.json").read_text())


@pytest.mark.parametrize("config", CONFIGS)
def test_smoke_launch(tmp_path, config):
    s = launch(config, tmp_path / "run", tmp_path / "cache")
    for key in ("mmcs", "ml2r", "n_alive", "identity_ci_error", "wall_time_s", "ci_l0/linear1"):
        assert key in s, key
    if config.endswith("_id"):
        assert "ci_l0/linear2.pre_identity" in s
    run = tmp_path / "run"
    lines = (run / "metrics.jsonl").read_text().strip().splitlines()
    assert len(lines) >= 1 and "loss/total" in json.loads(lines[-1])
    assert (run / "decomposition" / "decomposition.safetensors").exists()
    assert list(run.glob("*.png"))
    assert s["target/cached"] is False


def test_second_launch_reuses_cached_target(tmp_path):
    first = launch("tms_5-2", tmp_path / "a", tmp_path / "cache")
    second = launch("tms_5-2", tmp_path / "b", tmp_path / "cache", "--config.optim.steps=5")
    assert first["target/cached"] is False and second["target/cached"] is True
    assert first["target/seed_used"] == second["target/seed_used"]
    assert second["steps"] == 5

"""End-to-end smoke runs of launch.py (TMS and ResidMLP configs, clustering and report modes)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from browser import check_report

ROOT = Path(__file__).resolve().parents[1]
# One end-to-end run per kind of config (every variant parses in test_configs.py): TMS, TMS with identity
# and tied sites (its clustering and report too), and the 40-10 size with identity.
CONFIGS = ["tms_5-2", "tms_5-2_id", "tms_40-10_id"]


def launch(config: str, workdir: Path, cache: Path, *extra: str) -> dict:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "launch.py"), f"--config={ROOT / 'configs' / config}.py:smoke",
         f"--workdir={workdir}", f"--cache_dir={cache}", "--quiet", *extra],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "summary:" in proc.stdout
    # the first line names the mesh: by default every device (8 simulated ones here) on the data axis
    assert proc.stdout.splitlines()[0].startswith("spd on mesh data=8 x model=1 over 8 of 8 cpu devices")
    return json.loads((workdir / "summary.json").read_text())


@pytest.mark.parametrize("config", CONFIGS)
def test_smoke_launch(tmp_path, config, request):
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
    if config == "tms_5-2_id":
        clusters = cluster(config + ".py:smoke", run, tmp_path / "cache")
        assert {m[0] for g in clusters["groups"] for m in g["members"]} <= {"linear1", "linear2", "linear2.pre_identity"}
        assert {"ari", "purity", "separated"} <= set(clusters["evaluation"])
        report = write_report(config + ".py:smoke", run, tmp_path / "cache")
        best = check_report(request.getfixturevalue("driver"), report, tmp_path / "report.png")
        assert best["one_hot"] is not None and best["weight"] is not None and best["cluster"] is not None


def write_report(config_arg: str, workdir: Path, cache: Path) -> Path:
    """launch.py --mode=report on a finished run: the harvest file and the page written."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "launch.py"), f"--config={ROOT / 'configs' / config_arg}", f"--workdir={workdir}",
         f"--cache_dir={cache}", "--mode=report", "--harvest.n_rows=4096"],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (workdir / "harvest" / "harvest.sqlite").stat().st_size > 0
    assert str(workdir / "report.html") in proc.stdout
    return workdir / "report.html"


def cluster(config_arg: str, workdir: Path, cache: Path) -> dict:
    """launch.py --mode=cluster on a finished run: clusters.json, history and figures written."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "launch.py"), f"--config={ROOT / 'configs' / config_arg}", f"--workdir={workdir}",
         f"--cache_dir={cache}", "--mode=cluster", "--cluster.seeds=2", "--cluster.n_samples=2000"],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "truth/ari" in proc.stdout and "stability/stop/mean" in proc.stdout
    out = workdir / "clustering"
    for name in ("merge_history.npz", "cost_curve.png", "coactivation.png"):
        assert (out / name).stat().st_size > 0, name
    clusters = json.loads((out / "clusters.json").read_text())
    assert clusters["n_samples"] == 2000 and sum(g["size"] for g in clusters["groups"]) == clusters["n_subcomponents"]
    return clusters


def test_second_launch_reuses_cached_target(tmp_path):
    first = launch("tms_5-2", tmp_path / "a", tmp_path / "cache")
    second = launch("tms_5-2", tmp_path / "b", tmp_path / "cache", "--config.optim.steps=5")
    assert first["target/cached"] is False and second["target/cached"] is True
    assert first["target/seed_used"] == second["target/seed_used"]
    assert second["steps"] == 5


# 1 layer (paper recipe) and 2 layers (the reference recipe: subset and PGD losses, its clustering and
# report); deeper stacks run the same per-layer code.
RESID_CONFIGS = [("resid_mlp", "1,paper,smoke", 1), ("resid_mlp2_reference", "smoke", 2)]


@pytest.mark.parametrize("config,arg,n_layers", RESID_CONFIGS, ids=[f"{c}:{a}" for c, a, _ in RESID_CONFIGS])
def test_smoke_launch_resid_mlp(tmp_path, config, arg, n_layers):
    import os

    run = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "launch.py"), f"--config={ROOT / 'configs' / config}.py:{arg}",
         f"--workdir={run}", f"--cache_dir={tmp_path / 'cache'}", "--quiet"],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
        env={**os.environ, "JAX_DISABLE_MOST_OPTIMIZATIONS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = json.loads((run / "summary.json").read_text())
    for key in ("identity_ci_error", "identity_ci_error_tol0.2", "n_features_with_own_w_in", "wall_time_s"):
        assert key in s, key
    for layer in range(n_layers):
        assert f"ci_l0/layers.{layer}.mlp_in" in s and f"ci_l0/layers.{layer}.mlp_out" in s
    metrics = json.loads((run / "metrics.jsonl").read_text().strip().splitlines()[-1])
    assert ("loss/faithfulness" in metrics) == ("paper" in arg)
    if config == "resid_mlp2_reference":
        assert {"loss/stochastic_recon_subset", "loss/pgd_recon_subset"} <= set(metrics)
        assert "loss/stochastic_recon_layerwise" not in metrics
    assert "eval/loss/pgd_recon_layerwise" in (run / "eval.jsonl").read_text()
    assert list(run.glob("*.png"))
    if config == "resid_mlp2_reference":
        clusters = cluster(f"{config}.py:{arg}", run, tmp_path / "cache")
        assert "cross_layer" in clusters["evaluation"] or all(g["size"] == 1 for g in clusters["groups"])
        assert write_report(f"{config}.py:{arg}", run, tmp_path / "cache").stat().st_size > 0


def test_analyze_mode_regenerates_the_summary(tmp_path):
    """launch.py --mode=analyze rebuilds summary.json from the exported decomposition (host-data family)."""
    cmd = [sys.executable, str(ROOT / "launch.py"), f"--config={ROOT / 'configs' / 'sparse_linear.py'}:smoke",
           f"--workdir={tmp_path / 'run'}", f"--cache_dir={tmp_path / 'cache'}", "--quiet"]
    assert subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT).returncode == 0
    first = json.loads((tmp_path / "run" / "summary.json").read_text())
    (tmp_path / "run" / "summary.json").unlink()
    proc = subprocess.run(cmd + ["--mode=analyze"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    second = json.loads((tmp_path / "run" / "summary.json").read_text())
    for k in ("mmcs", "ml2r", "n_alive", "n_alive/map", "n_alive_norm", "steps"):
        assert second[k] == first[k], k

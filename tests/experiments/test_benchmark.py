"""The benchmark script measures SPD and APD steps (one in-process call each, tiny configs)."""

import jax
import pytest

from experiments.benchmark import bench_one


@pytest.mark.parametrize("config", ["configs/tms_5-2.py:smoke", "configs/apd_tms_5-2.py:smoke"])
def test_bench_one(tmp_path, config):
    r = bench_one(config, steps=3, warmup=1, cache_dir=str(tmp_path))
    assert r["method"] == ("apd" if "apd_" in config else "spd")
    # 5-2 smoke: SPD has U, V per site plus CI MLPs; APD has A, B per component; both are > 0 and small
    assert 0 < r["n_params"] < 100_000
    assert r["step_ms_median"] > 0 and r["steps_per_s"] == pytest.approx(1e3 / r["step_ms_median"])
    assert r["gflop_per_step"] > 0 and r["peak_rss_mib"] > 0 and r["compile_s"] > 0


def test_bench_apd_on_a_mesh(tmp_path):
    """One benchmark path for every method: APD steps shard over the data axis like SPD's."""
    r = bench_one("configs/apd_tms_5-2.py:smoke", steps=1, warmup=1, cache_dir=str(tmp_path), n_devices=len(jax.devices()))
    assert r["method"] == "apd" and r["mesh"] == f"data={len(jax.devices())} x model=1"


def test_bench_counts_tokens_of_sequence_targets(tmp_path):
    r = bench_one("configs/ih.py:smoke", steps=2, warmup=1, cache_dir=str(tmp_path))
    assert r["tokens_per_step"] == 8 * 64  # smoke batch 8 x 64 positions
    assert r["tokens_per_s"] == pytest.approx(r["tokens_per_step"] * r["steps_per_s"])
    assert bench_one("configs/tms_5-2.py:smoke", steps=1, warmup=1, cache_dir=str(tmp_path))["tokens_per_s"] is None

"""experiments.plan compiles a config's step from abstract shapes (no target trained) and reports what
XLA says it needs per device."""

import jax
import pytest

from experiments.plan import plan


def test_plan_of_the_smoke_lm_on_the_simulated_mesh(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may be written (no corpus, no target cache)
    from pathlib import Path

    cfg = str(Path(__file__).resolve().parents[2] / "configs" / "lm.py") + ":smoke"
    n = len(jax.devices())
    one = plan(cfg, {"data": 1, "model": 1}, False)
    fsdp = plan(cfg, {"data": n, "model": 1}, True)
    assert list(tmp_path.iterdir()) == []
    assert one["trainable_params"] == fsdp["trainable_params"] > 0
    assert fsdp["mesh"] == f"data={n} x model=1 (target sharded)"
    # the target's frozen weights are split over data: less per device than replicated
    assert fsdp["target_gib_per_device"] < one["target_gib_per_device"]
    assert fsdp["params_gib_per_device"] == pytest.approx(one["params_gib_per_device"])  # replicated over data
    for r in (one, fsdp):
        assert r["xla_argument_gib"] > 0 and r["xla_temp_gib"] > 0 and r["tflop_per_step_per_device"] > 0
    assert fsdp["tflop_per_step_per_device"] < one["tflop_per_step_per_device"]  # the batch is split

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


def test_plan_applies_the_large_shapes_memory_levers_to_the_lm(tmp_path, monkeypatch):
    """`lm.py:1b,smoke`: the pod sizes' remat of the masked forwards, bf16 compute over float32 master
    weights and the KL in vocabulary chunks, on the tiny model: the step compiles from abstract shapes."""
    from pathlib import Path

    from spdjax.config import load_config_file, parse

    monkeypatch.chdir(tmp_path)
    path = str(Path(__file__).resolve().parents[2] / "configs" / "lm.py")
    rc = parse(load_config_file(path, "1b,smoke"))
    loss = rc.method.settings.loss
    assert loss.remat and loss.vocab_chunk == 64 and rc.precision.compute_dtype == "bfloat16"
    r = plan(path + ":1b,smoke", {"data": 2, "model": 1}, True)
    assert r["trainable_params"] > 0 and r["xla_temp_gib"] > 0 and r["tflop_per_step_per_device"] > 0

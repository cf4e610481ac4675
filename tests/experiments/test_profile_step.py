"""experiments.profile_step: exclusive times resolve nesting per thread, HLO text parses into shapes
and sources, and a smoke config's step profiles end to end with the matmuls named."""

import pytest

from experiments import profile_step as ps

HLO = """
ENTRY %main.1 (p0: f32[8,4], p1: f32[4,2]) -> f32[8,2] {
  %p0 = f32[8,4]{1,0} parameter(0)
  %p1 = f32[4,2]{1,0} parameter(1)
  %dot.3 = f32[8,2]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}, metadata={op_name="jit(f)/dot_general"}
  ROOT %multiply_erf_fusion = f32[8,2]{1,0} fusion(%dot.3), kind=kLoop, calls=%fused.1, metadata={op_name="jit(f)/erf"}
}
"""


def test_hlo_ops_shapes_operands_and_classes():
    ops = ps.hlo_ops(HLO)
    assert ops["dot.3"]["shape"] == "f32[8,2]{1,0}"
    assert ops["dot.3"]["operand_shapes"] == ["f32[8,4]{1,0}", "f32[4,2]{1,0}"]
    assert ops["dot.3"]["op_name"] == "jit(f)/dot_general"
    assert ps.op_class("dot.3", ops["dot.3"]) == "matmul"
    assert ps.op_class("multiply_erf_fusion", ops["multiply_erf_fusion"]) == "elementwise fusion"
    assert ps.op_class("nope", None) == "other"


def test_exclusive_times_subtract_nested_events_per_thread():
    ev = [
        dict(ph="X", name="while.1", ts=0, dur=100, pid=1, tid=1),
        dict(ph="X", name="body", ts=10, dur=30, pid=1, tid=1),
        dict(ph="X", name="inner", ts=15, dur=5, pid=1, tid=1),
        dict(ph="X", name="body", ts=50, dur=20, pid=1, tid=1),
        dict(ph="X", name="other_thread", ts=10, dur=70, pid=1, tid=2),
        dict(ph="X", name="$python frame", ts=0, dur=1000, pid=1, tid=1),
        dict(ph="i", name="instant", ts=0, pid=1, tid=1),
    ]
    ex = ps.exclusive_times(ev)
    assert ex == pytest.approx({"while.1": 50, "body": 45, "inner": 5, "other_thread": 70})


def test_profile_smoke_config_names_its_matmuls():
    r = ps.profile("configs/tms_5-2.py:smoke", steps=2, cache_dir=".cache/targets")
    assert r["step_ms_median"] > 0 and r["gflop_per_step"] > 0
    assert r["profiled_ms"] > 0 and abs(sum(r["classes"].values()) - r["profiled_ms"]) < 1e-6
    assert "matmul" in r["classes"] and any(row["cls"] == "matmul" and row["operand_shapes"] for row in r["ops"])

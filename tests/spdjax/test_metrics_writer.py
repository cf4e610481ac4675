"""MetricsWriter: metrics.jsonl + TensorBoard event files (+ optional W&B), crash-safe resume."""

from __future__ import annotations

import json
import math
import os
import signal
import struct
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest

from spdjax.metrics_writer import MetricsWriter, read_metrics


def _strict_lines(path: Path) -> list[dict]:
    """Every line must be strict JSON (no NaN/Infinity literals) and the file must end with a newline."""
    text = path.read_text()
    assert text == "" or text.endswith("\n")

    def bad_constant(c):
        raise ValueError(f"non-standard JSON constant {c}")

    return [json.loads(line, parse_constant=bad_constant) for line in text.splitlines()]


def _steps(path: Path) -> list[int]:
    return [rec["step"] for rec in _strict_lines(path)]


# ---- minimal TensorBoard event-file reader (TFRecord: u64 length, u32 crc, data, u32 crc) -------------

def _read_events(path: Path):
    from tensorboardX.proto.event_pb2 import Event

    data = path.read_bytes()
    events, pos = [], 0
    while pos < len(data):
        (n,) = struct.unpack("<Q", data[pos : pos + 8])
        ev = Event()
        ev.ParseFromString(data[pos + 12 : pos + 12 + n])
        events.append(ev)
        pos += 12 + n + 4
    assert pos == len(data), "truncated record"
    return events


def _event_files(workdir: Path) -> list[Path]:
    return sorted((workdir / "tensorboard").glob("events.out.tfevents.*"))


def _tb_scalars(workdir: Path) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} as TensorBoard would show it: files in name order, and a SessionLog.START
    at step s purges the earlier events with step >= s (what purge_step relies on)."""
    from tensorboardX.proto.event_pb2 import SessionLog

    out: dict[str, list[tuple[int, float]]] = {}
    for f in _event_files(workdir):
        for ev in _read_events(f):
            if ev.HasField("session_log") and ev.session_log.status == SessionLog.START:
                out = {t: [(s, v) for s, v in pts if s < ev.step] for t, pts in out.items()}
            if ev.HasField("summary"):
                for val in ev.summary.value:
                    out.setdefault(val.tag, []).append((ev.step, val.simple_value))
    return out


# ---- jsonl ----------------------------------------------------------------------------------------------

def test_one_json_line_per_write(tmp_path):
    with MetricsWriter(tmp_path) as mw:
        mw.write(10, {"loss/total": 1.5, "ci_l0/linear1": 3.0, "lr": 1e-3}, wall_time_s=0.25)
        mw.write(20, {"loss/total": 1.25, "ci_l0/linear1": 2.0, "lr": 1e-3}, wall_time_s=0.5)
        mw.write(30, {"grad_norm/ci": 7})
    recs = _strict_lines(tmp_path / "metrics.jsonl")
    assert recs == [
        {"step": 10, "wall_time_s": 0.25, "loss/total": 1.5, "ci_l0/linear1": 3.0, "lr": 1e-3},
        {"step": 20, "wall_time_s": 0.5, "loss/total": 1.25, "ci_l0/linear1": 2.0, "lr": 1e-3},
        {"step": 30, "grad_norm/ci": 7.0},
    ]


def test_data_on_disk_when_write_returns(tmp_path):
    mw = MetricsWriter(tmp_path)
    mw.write(1, {"loss/total": 2.0})
    # not closed: another reader must already see the line and the TensorBoard record
    assert _steps(tmp_path / "metrics.jsonl") == [1]
    assert _tb_scalars(tmp_path) == {"loss/total": [(1, 2.0)]}
    mw.close()
    mw.close()  # idempotent
    with pytest.raises(RuntimeError):
        mw.write(2, {"loss/total": 1.0})


def test_prefix(tmp_path):
    with MetricsWriter(tmp_path) as mw:
        mw.write(5, {"loss/total": 1.0})
        mw.write(5, {"loss/total": 0.5, "loss/stoch_recon": 0.25}, prefix="eval/")
    recs = _strict_lines(tmp_path / "metrics.jsonl")
    assert recs[1] == {"step": 5, "eval/loss/total": 0.5, "eval/loss/stoch_recon": 0.25}
    tb = _tb_scalars(tmp_path)
    assert tb["loss/total"] == [(5, 1.0)]
    assert tb["eval/loss/total"] == [(5, 0.5)]
    assert tb["eval/loss/stoch_recon"] == [(5, 0.25)]


def test_nonfinite_values(tmp_path):
    with MetricsWriter(tmp_path) as mw:
        mw.write(1, {"a": math.nan, "b": math.inf, "c": -math.inf, "d": 1.0})
    (rec,) = _strict_lines(tmp_path / "metrics.jsonl")  # strict: no NaN/Infinity literals
    assert rec == {"step": 1, "a": "nan", "b": "inf", "c": "-inf", "d": 1.0}
    (back,) = read_metrics(tmp_path)
    assert math.isnan(back["a"]) and back["b"] == math.inf and back["c"] == -math.inf
    assert _tb_scalars(tmp_path) == {"d": [(1, 1.0)]}  # non-finite values are not sent to TensorBoard


def test_reserved_and_non_numeric_names(tmp_path):
    with MetricsWriter(tmp_path) as mw:
        with pytest.raises(ValueError, match="reserved"):
            mw.write(1, {"step": 1.0})
        with pytest.raises(TypeError, match="not a number"):
            mw.write(1, {"x": "abc"})


# ---- resume ---------------------------------------------------------------------------------------------

def test_resume_truncates_past_checkpoint(tmp_path):
    with MetricsWriter(tmp_path) as mw:
        for s in range(1, 6):
            mw.write(s, {"loss/total": float(s)})
    with MetricsWriter(tmp_path, resume_step=3) as mw:
        mw.write(4, {"loss/total": 40.0})
    recs = _strict_lines(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    assert [r["loss/total"] for r in recs] == [1.0, 2.0, 3.0, 40.0]
    assert not (tmp_path / "metrics.jsonl.tmp").exists()
    # TensorBoard: a second event file (restart in the same second must not clobber the first) whose
    # SessionLog.START at step 4 purges the crashed run's steps 4, 5
    assert len(_event_files(tmp_path)) == 2
    assert _tb_scalars(tmp_path)["loss/total"] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]


def test_resume_drops_trailing_partial_line(tmp_path):
    with MetricsWriter(tmp_path) as mw:
        mw.write(1, {"loss/total": 1.0})
        mw.write(2, {"loss/total": 2.0})
    with (tmp_path / "metrics.jsonl").open("a") as f:  # SIGKILL mid-write
        f.write('{"step": 3, "loss/tot')
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]
    with MetricsWriter(tmp_path, resume_step=10) as mw:
        mw.write(3, {"loss/total": 3.0})
    assert _steps(tmp_path / "metrics.jsonl") == [1, 2, 3]


def test_sigkill_keeps_written_steps(tmp_path):
    """A process SIGKILLed right after write() returns (no close, no atexit) has every step on disk."""
    code = textwrap.dedent(f"""
        import os, signal
        from spdjax.metrics_writer import MetricsWriter
        mw = MetricsWriter({str(tmp_path)!r})
        for s in (1, 2, 3):
            mw.write(s, {{"loss/total": float(s)}})
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=repo, capture_output=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    assert _steps(tmp_path / "metrics.jsonl") == [1, 2, 3]
    assert _tb_scalars(tmp_path) == {"loss/total": [(1, 1.0), (2, 2.0), (3, 3.0)]}
    with MetricsWriter(tmp_path, resume_step=2) as mw:  # checkpoint was at step 2
        mw.write(3, {"loss/total": 30.0})
    assert _steps(tmp_path / "metrics.jsonl") == [1, 2, 3]
    assert _tb_scalars(tmp_path) == {"loss/total": [(1, 1.0), (2, 2.0), (3, 30.0)]}


def test_resume_without_existing_file(tmp_path):
    with MetricsWriter(tmp_path, resume_step=7) as mw:
        mw.write(8, {"x": 1.0})
    assert _steps(tmp_path / "metrics.jsonl") == [8]


def test_fresh_run_replaces_old_outputs(tmp_path):
    with MetricsWriter(tmp_path) as mw:
        mw.write(1, {"old": 1.0})
    with MetricsWriter(tmp_path) as mw:
        mw.write(1, {"new": 2.0})
    assert _strict_lines(tmp_path / "metrics.jsonl") == [{"step": 1, "new": 2.0}]
    assert len(_event_files(tmp_path)) == 1
    assert _tb_scalars(tmp_path) == {"new": [(1, 2.0)]}


# ---- TensorBoard via the real reader, when the tensorboard package is installed -------------------------

def test_tensorboard_event_accumulator(tmp_path):
    ea_mod = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    with MetricsWriter(tmp_path) as mw:
        mw.write(1, {"loss/total": 1.0, "lr": 0.5})
        mw.write(2, {"loss/total": 0.5, "lr": 0.25})
        mw.write(3, {"loss/total": 0.25, "lr": 0.125})
    with MetricsWriter(tmp_path, resume_step=2) as mw:  # crash after step 3, checkpoint at 2
        mw.write(3, {"loss/total": 0.3, "lr": 0.125})
    acc = ea_mod.EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert set(acc.Tags()["scalars"]) == {"loss/total", "lr"}
    assert [(e.step, e.value) for e in acc.Scalars("loss/total")] == [(1, 1.0), (2, 0.5), (3, pytest.approx(0.3))]


# ---- W&B ------------------------------------------------------------------------------------------------

def test_wandb_requested_but_missing(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` raise ImportError
    with pytest.raises(ImportError, match="pip install wandb"):
        MetricsWriter(tmp_path, wandb_project="spd")
    assert not (tmp_path / "metrics.jsonl").exists()
    with MetricsWriter(tmp_path) as mw:  # no project: wandb is never imported
        mw.write(1, {"x": 1.0})


def test_wandb_fake_module(tmp_path, monkeypatch):
    calls = {"init": [], "log": [], "finish": 0}

    class Run:
        def __init__(self, id):
            self.id = id

        def log(self, data, step=None):
            calls["log"].append((step, dict(data)))

        def finish(self):
            calls["finish"] += 1

    fake = types.ModuleType("wandb")
    fake.util = types.SimpleNamespace(generate_id=lambda: "abc123")

    def init(**kw):
        calls["init"].append(kw)
        return Run(kw["id"])

    fake.init = init
    monkeypatch.setitem(sys.modules, "wandb", fake)

    with MetricsWriter(tmp_path, wandb_project="spd", wandb_run_name="r", config={"seed": 0}) as mw:
        mw.write(1, {"loss/total": 1.0}, prefix="eval/")
    assert calls["init"][0]["project"] == "spd" and calls["init"][0]["name"] == "r"
    assert calls["init"][0]["config"] == {"seed": 0} and calls["init"][0]["id"] == "abc123"
    assert calls["log"] == [(1, {"eval/loss/total": 1.0})]
    assert calls["finish"] == 1

    fake.util.generate_id = lambda: "other"
    with MetricsWriter(tmp_path, resume_step=1, wandb_project="spd"):
        pass
    assert calls["init"][1]["id"] == "abc123"  # resumed run continues the same W&B run

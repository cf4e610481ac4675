"""Scalar metrics sinks for a run: `metrics.jsonl`, TensorBoard event files and (optionally) W&B.

    with MetricsWriter(workdir, resume_step=restored_step_or_None, wandb_project=None) as mw:
        mw.write(rec.step, rec.metrics, rec.wall_time_s)            # train metrics, e.g. "loss/total"
        mw.write(step, eval_metrics, prefix="eval/")                  # -> "eval/loss/total"

Crash safety: every `write()` reaches the OS before it returns (jsonl flushed, the TensorBoard record
written synchronously and flushed), so a SIGKILL loses at most the line being written. On resume
(`resume_step` = the step of the restored checkpoint) lines past that step, left by the crashed run,
are dropped from `metrics.jsonl` (together with a trailing partial line) and TensorBoard is told to
purge them (a `SessionLog.START` at `resume_step + 1`, what tensorboardX's `purge_step` writes).

TensorBoard files are written with tensorboardX's synchronous `EventsWriter` rather than its
`SummaryWriter`: the latter hands events to a background thread, and its `flush()` does not wait for
that queue, so a crash right after `write()` could lose already-"written" steps.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from pathlib import Path
from typing import Any, Mapping

__all__ = ["MetricsWriter", "read_metrics"]

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
WANDB_ID_FILE = "wandb_run_id.txt"
_RESERVED = ("step", "wall_time_s")


def _json_value(v: float) -> float | str:
    """Finite floats as numbers; NaN/inf as the strings "nan"/"inf"/"-inf" (keeps every line valid JSON)."""
    if math.isnan(v):
        return "nan"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return v


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Parse a metrics.jsonl (a workdir or the file itself): one dict per complete line, with the
    "nan"/"inf"/"-inf" strings turned back into floats. A trailing partial line is ignored."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    special = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}
    out = []
    for rec in _complete_records(path.read_text()):
        out.append({k: special.get(v, v) if isinstance(v, str) else v for k, v in rec.items()})
    return out


def _complete_records(text: str):
    """Yield the JSON objects of the newline-terminated lines of `text` (a trailing unterminated line is
    a crash mid-write and is skipped; so is any unparsable line, with a warning)."""
    lines = text.split("\n")
    for i, line in enumerate(lines[:-1]):  # lines[-1] is "" or the partial last line
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            warnings.warn(f"metrics.jsonl: dropping unparsable line {i + 1}: {line[:80]!r}", stacklevel=3)
            continue
        if isinstance(rec, dict):
            yield rec
        else:
            warnings.warn(f"metrics.jsonl: dropping non-object line {i + 1}", stacklevel=3)


def _truncate_jsonl(path: Path, resume_step: int) -> int:
    """Atomically rewrite `path` keeping the complete lines with step <= resume_step; returns lines kept."""
    kept = []
    for rec in _complete_records(path.read_text()):
        step = rec.get("step")
        if isinstance(step, int) and not isinstance(step, bool) and step <= resume_step:
            kept.append(json.dumps(rec) + "\n")
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        f.writelines(kept)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return len(kept)


class _TensorBoardSink:
    """Synchronous TensorBoard event-file writer (one event per `write()` call, flushed)."""

    def __init__(self, logdir: Path, resume_step: int | None):
        try:
            from tensorboardX.event_file_writer import EventsWriter
            from tensorboardX.proto.event_pb2 import Event, SessionLog
            from tensorboardX.proto.summary_pb2 import Summary
            from tensorboardX.summary import scalar
        except ImportError as e:  # a declared dependency, but say what to do if it is missing
            raise ImportError(
                "MetricsWriter needs tensorboardX for TensorBoard logging: pip install 'tensorboardX>=2.6'"
            ) from e
        self._Event, self._Summary, self._scalar = Event, Summary, scalar
        logdir.mkdir(parents=True, exist_ok=True)
        if resume_step is None:  # fresh run: old event files would mix into the new curves
            for old in logdir.glob("events.out.tfevents.*"):
                old.unlink()
        # EventsWriter names files events.out.tfevents.<unix seconds>.<host><suffix>: the ns suffix keeps a
        # restart within the same second from truncating the previous file (open "wb") and sorts after it.
        self._writer = EventsWriter(str(logdir / "events"), filename_suffix=f".{time.time_ns()}.{os.getpid()}")
        if resume_step is not None:
            # Exactly what tensorboardX's SummaryWriter(purge_step=...) writes: TensorBoard drops the events
            # with step >= purge_step that came before this SessionLog.START (the crashed run's tail).
            purge_step = resume_step + 1
            self._writer.write_event(Event(step=purge_step, wall_time=time.time(), file_version="brain.Event:2"))
            self._writer.write_event(
                Event(step=purge_step, wall_time=time.time(), session_log=SessionLog(status=SessionLog.START))
            )
        self._writer.flush()

    def write(self, step: int, scalars: Mapping[str, float], wall_time: float) -> None:
        values = []
        for tag, v in scalars.items():
            values.extend(self._scalar(tag, v).value)  # scalar() also sanitises the tag like SummaryWriter
        if values:
            summary = self._Summary(value=values)
            self._writer.write_event(self._Event(step=int(step), wall_time=wall_time, summary=summary))
            self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class MetricsWriter:
    """Writes scalar metrics to metrics.jsonl (always), TensorBoard event files (always, via tensorboardX,
    no TensorFlow needed), and Weights & Biases (only when `wandb_project` is given AND the `wandb`
    package is importable; if a project was requested but wandb is missing, raises an ImportError that
    names the fix).

    Args:
      workdir: run directory; writes `workdir/metrics.jsonl` and `workdir/tensorboard/events.out.tfevents.*`.
      resume_step: step of the checkpoint the run resumes from. None = fresh run: an existing
        metrics.jsonl and old TensorBoard event files are replaced. Otherwise metrics.jsonl keeps the
        lines with step <= resume_step (atomic rewrite; a trailing partial line is dropped) and appends,
        and TensorBoard purges the crashed run's steps > resume_step.
      wandb_project / wandb_run_name / config: W&B run settings (`config` is the run config dict). The W&B
        run id is kept in `workdir/wandb_run_id.txt`, so a resumed run continues the same W&B run.
    """

    def __init__(
        self,
        workdir: str | Path,
        *,
        resume_step: int | None = None,
        wandb_project: str | None = None,
        wandb_run_name: str | None = None,
        config: dict | None = None,
        metrics_file: str = METRICS_FILE,
        tensorboard_dir: str = TENSORBOARD_DIR,
    ):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and int(resume_step) < 0:
            raise ValueError(f"MetricsWriter: resume_step must be >= 0, got {resume_step}")
        self.resume_step = None if resume_step is None else int(resume_step)
        self._closed = False
        self._wandb_run = None
        self._jsonl = None
        self._tb = None

        wandb = None
        if wandb_project is not None:  # check first: fail before touching any file
            try:
                import wandb
            except ImportError as e:
                raise ImportError(
                    f"MetricsWriter: wandb_project={wandb_project!r} was given but the `wandb` package is not "
                    "installed. Install it (`pip install wandb`, then `wandb login`) or leave wandb_project "
                    "unset to log to metrics.jsonl and TensorBoard only."
                ) from e

        self.metrics_path = self.workdir / metrics_file
        self._tb_dir = self.workdir / tensorboard_dir
        if self.resume_step is not None and self.metrics_path.exists():
            _truncate_jsonl(self.metrics_path, self.resume_step)
            mode = "a"
        else:
            mode = "w"
        self._jsonl = self.metrics_path.open(mode)
        try:
            self._tb = _TensorBoardSink(self.workdir / tensorboard_dir, self.resume_step)
            if wandb is not None:
                self._wandb_run = self._init_wandb(wandb, wandb_project, wandb_run_name, config)
        except BaseException:
            self.close()
            raise

    def _init_wandb(self, wandb, project: str, name: str | None, config: dict | None):
        id_file = self.workdir / WANDB_ID_FILE
        run_id = None
        if self.resume_step is not None and id_file.exists():
            run_id = id_file.read_text().strip() or None
        if run_id is None:
            run_id = wandb.util.generate_id() if hasattr(wandb, "util") else None
        run = wandb.init(
            project=project, name=name, config=config, dir=str(self.workdir), id=run_id, resume="allow",
        )
        rid = getattr(run, "id", None) or run_id
        if rid:
            id_file.write_text(str(rid) + "\n")
        return run

    @property
    def tensorboard_dir(self) -> Path:
        return self._tb_dir

    def write(
        self, step: int, metrics: Mapping[str, float], wall_time_s: float | None = None, prefix: str = ""
    ) -> None:
        """Log `metrics` (name -> number) at `step` to every sink; names become `prefix + name`.

        Appends one JSON line {"step", "wall_time_s" (if given), **metrics} to metrics.jsonl (NaN/inf as the
        strings "nan"/"inf"/"-inf") and flushes; adds the finite values as TensorBoard scalars (tag =
        prefix + name) and flushes; logs everything to W&B when enabled.
        """
        if self._closed:
            raise RuntimeError("MetricsWriter.write() after close()")
        step = int(step)
        values: dict[str, float] = {}
        for k, v in metrics.items():
            name = f"{prefix}{k}"
            if name in _RESERVED:
                raise ValueError(f"MetricsWriter: metric name {name!r} clashes with a reserved jsonl key")
            try:
                values[name] = float(v)
            except (TypeError, ValueError) as e:
                raise TypeError(f"MetricsWriter: metric {name!r} is not a number: {v!r}") from e

        line: dict[str, Any] = {"step": step}
        if wall_time_s is not None:
            line["wall_time_s"] = float(wall_time_s)
        line.update({k: _json_value(v) for k, v in values.items()})
        self._jsonl.write(json.dumps(line, allow_nan=False) + "\n")
        self._jsonl.flush()

        self._tb.write(step, {k: v for k, v in values.items() if math.isfinite(v)}, time.time())

        if self._wandb_run is not None:
            self._wandb_run.log(values, step=step)

    def flush(self) -> None:
        if not self._closed:
            self._jsonl.flush()

    def close(self) -> None:
        """Flush and close every sink (idempotent)."""
        if self._closed:
            return
        self._closed = True
        errors = []
        for fn in (
            self._jsonl.close if self._jsonl is not None else None,
            self._tb.close if self._tb is not None else None,
            self._wandb_run.finish if self._wandb_run is not None else None,
        ):
            if fn is None:
                continue
            try:
                fn()
            except Exception as e:  # close the rest regardless
                errors.append(e)
        if errors:
            raise errors[0]

    def __enter__(self) -> "MetricsWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

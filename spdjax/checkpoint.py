"""Orbax checkpoints of the full training state, behind one small class.

A checkpoint holds `TrainState` (step, params, optimiser state, PRNG key as raw key data) plus a
JSON dict of extras. The data stream is a pure function of (seed, step), so the step is its position.
Orbax writes each checkpoint into a temporary directory and renames it when complete, so a save cut
short (even by SIGKILL) never shows up as a checkpoint; a checkpoint that is damaged later is skipped
by `restore_latest`, which falls back to the previous one and says so.

Sharded and multi-host states: every process calls `save` and `restore` (Orbax writes each array's
shards collectively into the shared directory). `restore` takes the target shardings (e.g.
`spdjax.sharding.state_shardings(template, mesh)`), so a checkpoint saved on one mesh restores onto
another (a different device count, data/model split or number of hosts).
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from spdjax.train import TrainState

log = logging.getLogger("spdjax")


def _to_tree(state: TrainState) -> dict:
    return {
        "step": state.step,
        "params": state.params,
        "opt_state": state.opt_state,
        "key": jax.random.key_data(state.key),
    }


def _key_impl(key):
    return jax.random.key_impl(key) if isinstance(key, jax.Array) else key.dtype._impl  # noqa: SLF001


def _abstract(template: TrainState, shardings: Any) -> dict:
    """ShapeDtypeStructs of the checkpoint tree, each with its target sharding."""
    default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

    def sds(x, s=None):
        if s is None:
            s = x.sharding if isinstance(x, jax.Array) else (getattr(x, "sharding", None) or default)
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)

    tree = {
        "step": template.step,
        "params": template.params,
        "opt_state": template.opt_state,
        "key": jax.eval_shape(jax.random.key_data, template.key),
    }
    if shardings is None:
        if isinstance(template.key, jax.Array):
            tree["key"] = jax.ShapeDtypeStruct(tree["key"].shape, tree["key"].dtype, sharding=template.key.sharding)
        return jax.tree.map(sds, tree)
    sh = {"step": shardings.step, "params": shardings.params, "opt_state": shardings.opt_state, "key": shardings.key}
    return jax.tree.map(sds, tree, sh)


def _from_tree(tree: dict, template: TrainState) -> TrainState:
    impl = _key_impl(template.key)
    return TrainState(
        tree["step"], tree["params"], tree["opt_state"], jax.random.wrap_key_data(tree["key"], impl=impl)
    )


class Checkpointer:
    """Periodic checkpoints in `directory` (newest `max_to_keep` kept), saved asynchronously."""

    def __init__(self, directory: str | Path, max_to_keep: int = 3, async_save: bool = True):
        self.directory = Path(directory).absolute()
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep,
                create=True,
                enable_async_checkpointing=async_save,
                cleanup_tmp_directories=True,
            ),
        )

    def steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, state: TrainState, extra: dict[str, Any] | None = None) -> None:
        """Save `state` at its step. The arrays are copied first: the train step donates its state."""
        tree = jax.tree.map(jnp.copy, _to_tree(state))
        step = int(state.step)
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(tree), extra=ocp.args.JsonSave(extra or {})
            ),
            force=True,
        )

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def restore(self, step: int, template: TrainState, shardings: Any = None) -> tuple[TrainState, dict]:
        """The checkpoint at `step`, laid out like `template` (a TrainState of arrays, or its
        `jax.eval_shape` twin). `shardings` (a tree like `template`, e.g. from
        `spdjax.sharding.state_shardings`) places every array on the current mesh, whatever mesh
        the checkpoint was saved from; without it a concrete template's own shardings are used."""
        out = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(_abstract(template, shardings)), extra=ocp.args.JsonRestore()
            ),
        )
        return _from_tree(out["state"], template), dict(out["extra"] or {})

    def restore_latest(self, template: TrainState, shardings: Any = None) -> tuple[TrainState, dict] | None:
        """The newest readable checkpoint, or None if there is none. Unreadable ones are skipped, loudly."""
        steps = self.steps()
        for i, step in enumerate(reversed(steps)):
            try:
                return self.restore(step, template, shardings)
            except Exception as e:  # noqa: BLE001  (any damage: missing files, bad metadata, ...)
                older = steps[: len(steps) - 1 - i]
                where = f"falling back to step {older[-1]}" if older else "no older checkpoint left"
                moved = self._quarantine(step)
                msg = (
                    f"checkpoint at step {step} in {self.directory} is unreadable ({type(e).__name__}: "
                    f"{(str(e).splitlines() or [''])[0][:200]}); moved to {moved}; {where}"
                )
                log.warning(msg)
                print(f"WARNING: {msg}", flush=True)
        if steps:
            raise RuntimeError(
                f"every checkpoint in {self.directory} is unreadable; move the directory away or pass "
                "--fresh to start over"
            )
        return None

    def _quarantine(self, step: int) -> Path:
        """Move an unreadable checkpoint out of the manager's sight (kept for inspection)."""
        dest_root = self.directory.parent / (self.directory.name + "_unreadable")
        dest = dest_root / f"{step}"
        if jax.process_index() == 0:  # the checkpoint directory is shared by every process
            dest_root.mkdir(parents=True, exist_ok=True)
            dest = dest_root / f"{step}-{time.time_ns()}"
            shutil.move(str(self.directory / str(step)), dest)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"spdjax_quarantine_{step}")
        self._manager.reload()
        return dest

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

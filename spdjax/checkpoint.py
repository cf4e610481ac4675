"""Orbax checkpoints of the full training state, behind one small class.

A checkpoint holds `TrainState` (step, params, optimiser state, PRNG key as raw key data) plus a
JSON dict of extras. The data stream is a pure function of (seed, step), so the step is its position.
Orbax writes each checkpoint into a temporary directory and renames it when complete, so a save cut
short (even by SIGKILL) never shows up as a checkpoint; a checkpoint that is damaged later is skipped
by `restore_latest`, which falls back to the previous one and says so.

Integrity: every checkpoint's JSON extras carry a manifest of the state (each leaf's path, shape, dtype
and a 32-bit fingerprint of its bits, computed on device, so also for sharded and multi-host arrays).
`restore` compares the manifest with the run's template first: a checkpoint of another shape (the config
changed) raises `CheckpointMismatchError` and moves nothing; then it restores and recomputes the
fingerprints: unreadable data or metadata, or a fingerprint mismatch (a flipped byte), is damage, and
only damage is quarantined (moved to `<dir>_unreadable/`) by `restore_latest`, which falls back to the
previous checkpoint. When every checkpoint is damaged it raises `CheckpointError` (one line).

Sharded and multi-host states: every process calls `save` and `restore` (Orbax writes each array's
shards collectively into the shared directory). `restore` takes the target shardings (e.g.
`spdjax.sharding.state_shardings(template, mesh)`), so a checkpoint saved on one mesh restores onto
another (a different device count, data/model split or number of hosts).
"""

from __future__ import annotations

import logging
import os
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
MANIFEST = "manifest"


class CheckpointError(RuntimeError):
    """No usable checkpoint (every one damaged), or a checkpoint could not be written. One line."""


class CheckpointMismatchError(CheckpointError):
    """A readable checkpoint whose state does not fit this run (shapes, dtypes or structure differ)."""


class _Damaged(Exception):
    pass


def _u32(x):
    """The bits of `x` as a flat uint32 vector (1-, 2- and 4-byte dtypes)."""
    x = jnp.asarray(x)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32).ravel()
    size = x.dtype.itemsize
    if size == 4:
        return jax.lax.bitcast_convert_type(x, jnp.uint32).ravel()
    if size in (1, 2):
        u = jnp.uint8 if size == 1 else jnp.uint16
        return jax.lax.bitcast_convert_type(x, u).astype(jnp.uint32).ravel()
    return jax.lax.bitcast_convert_type(x, jnp.uint32).ravel()  # 8-byte dtypes: two words each


def _fingerprint(x):
    """A uint32 fingerprint of `x`'s bits: sum_i ((u_i * (2i + 1)) ^ (i * golden)) mod 2^32. Changing any
    one element always changes it (odd multipliers are invertible mod 2^32); the sum is exact integer
    arithmetic, so it is the same for any sharding."""
    u = _u32(x)
    i = jnp.arange(u.size, dtype=jnp.uint32)
    return jnp.sum((u * (2 * i + 1)) ^ (i * jnp.uint32(0x9E3779B9)), dtype=jnp.uint32)


_fingerprints = jax.jit(lambda tree: jax.tree.map(_fingerprint, tree))


def manifest(tree: dict) -> dict[str, list]:
    """`{leaf path: [shape, dtype, fingerprint]}` of a checkpoint tree (every process gets the same)."""
    fps = jax.device_get(_fingerprints(tree))
    out = {}
    for (path, x), fp in zip(jax.tree_util.tree_leaves_with_path(tree), jax.tree.leaves(fps)):
        out[jax.tree_util.keystr(path)] = [list(x.shape), str(x.dtype), int(fp)]
    return out


def _layout(tree) -> dict[str, list]:
    return {jax.tree_util.keystr(p): [list(x.shape), str(x.dtype)] for p, x in jax.tree_util.tree_leaves_with_path(tree)}


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
        if self.directory.exists() and not self.directory.is_dir():
            raise CheckpointError(f"the checkpoint directory {self.directory} is not a directory; move it away")
        if self.directory.is_dir() and not os.access(self.directory, os.W_OK | os.X_OK):
            raise CheckpointError(f"the checkpoint directory {self.directory} is not writable; fix its permissions")
        try:
            self._manager = ocp.CheckpointManager(
                self.directory,
                options=ocp.CheckpointManagerOptions(
                    max_to_keep=max_to_keep,
                    create=True,
                    enable_async_checkpointing=async_save,
                    cleanup_tmp_directories=True,
                ),
            )
        except Exception as e:  # noqa: BLE001  (not a directory, no permission, ...)
            raise CheckpointError(f"cannot use the checkpoint directory {self.directory}: {_first_line(e)}") from None

    def steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, state: TrainState, extra: dict[str, Any] | None = None) -> None:
        """Save `state` at its step, with its manifest in the extras. The arrays are copied first: the
        train step donates its state. A failure to write is a one-line `CheckpointError`."""
        tree = jax.tree.map(jnp.copy, _to_tree(state))
        step = int(state.step)
        extra = {**(extra or {}), MANIFEST: manifest(tree)}
        try:
            self._manager.save(
                step,
                args=ocp.args.Composite(state=ocp.args.StandardSave(tree), extra=ocp.args.JsonSave(extra)),
                force=True,
            )
        except Exception as e:  # noqa: BLE001  (permissions, a full disk, ...)
            raise CheckpointError(f"could not write the checkpoint at step {step} into {self.directory}: {_first_line(e)}") from None

    def wait(self) -> None:
        try:
            self._manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001  (an asynchronous save failed)
            raise CheckpointError(f"could not write a checkpoint into {self.directory}: {_first_line(e)}") from None

    def restore(self, step: int, template: TrainState, shardings: Any = None) -> tuple[TrainState, dict]:
        """The checkpoint at `step`, laid out like `template` (a TrainState of arrays, or its
        `jax.eval_shape` twin). `shardings` (a tree like `template`, e.g. from
        `spdjax.sharding.state_shardings`) places every array on the current mesh, whatever mesh
        the checkpoint was saved from; without it a concrete template's own shardings are used.

        Raises `CheckpointMismatchError` when the checkpoint's manifest does not fit `template`, and
        `_Damaged` when its data or metadata cannot be read or do not match their fingerprints."""
        abstract = _abstract(template, shardings)
        try:
            extra = dict(self._manager.restore(step, args=ocp.args.Composite(extra=ocp.args.JsonRestore()))["extra"] or {})
        except Exception as e:  # noqa: BLE001
            raise _Damaged(f"its metadata is unreadable ({_first_line(e)})") from None
        saved = extra.pop(MANIFEST, None)
        if saved is not None:
            want = _layout(abstract)
            have = {k: v[:2] for k, v in saved.items()}
            if have != want:
                diff = sorted(set(have) ^ set(want)) or [k for k in sorted(want) if have[k] != want[k]]
                k = next((d for d in diff if d.startswith("['params']")), diff[0])  # the parameters say it best
                raise CheckpointMismatchError(
                    f"the checkpoint at step {step} in {self.directory} does not fit this run ({k}: saved "
                    f"{_fmt(have.get(k))}, this run {_fmt(want.get(k))}); the config changed in a way a run "
                    "cannot resume from: pass --fresh or use another --workdir"
                )
        try:
            out = self._manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), extra=ocp.args.JsonRestore())
            )
        except Exception as e:  # noqa: BLE001  (missing files, bad metadata, truncated data, ...)
            raise _Damaged(f"{type(e).__name__}: {_first_line(e)}") from None
        if saved is not None:
            got = manifest(out["state"])
            bad = [k for k in saved if got[k][2] != saved[k][2]]
            if bad:
                raise _Damaged(f"the data of {bad[0]} do not match their fingerprint")
        return _from_tree(out["state"], template), extra

    def restore_latest(self, template: TrainState, shardings: Any = None) -> tuple[TrainState, dict] | None:
        """The newest readable checkpoint, or None if there is none. Damaged ones are moved aside and
        skipped, loudly; a mismatch with `template` raises (nothing moved); `CheckpointError` when every
        checkpoint is damaged."""
        steps = self.steps()
        for i, step in enumerate(reversed(steps)):
            try:
                return self.restore(step, template, shardings)
            except _Damaged as e:
                older = steps[: len(steps) - 1 - i]
                where = f"falling back to step {older[-1]}" if older else "no older checkpoint left"
                moved = self._quarantine(step)
                msg = f"checkpoint at step {step} in {self.directory} is damaged ({str(e)[:200]}); moved to {moved}; {where}"
                log.warning(msg)
                print(f"WARNING: {msg}", flush=True)
        if steps:
            raise CheckpointError(
                f"every checkpoint in {self.directory} is damaged (moved to {self.quarantine_dir}); pass --fresh "
                "to start over"
            )
        return None

    @property
    def quarantine_dir(self) -> Path:
        return self.directory.parent / (self.directory.name + "_unreadable")

    def _quarantine(self, step: int) -> Path:
        """Move an unreadable checkpoint out of the manager's sight (kept for inspection)."""
        dest_root = self.quarantine_dir
        dest = dest_root / f"{step}"
        if jax.process_index() == 0:  # the checkpoint directory is shared by every process
            dest = dest_root / f"{step}-{time.time_ns()}"
            try:
                dest_root.mkdir(parents=True, exist_ok=True)
                shutil.move(str(self.directory / str(step)), dest)
            except OSError as e:
                raise CheckpointError(
                    f"the checkpoint at step {step} in {self.directory} is damaged and could not be moved to "
                    f"{dest_root}: {e.strerror or e}"
                ) from None
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"spdjax_quarantine_{step}")
        self._manager.reload()
        return dest

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._manager.close()


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


def _fmt(entry) -> str:
    return "nothing" if entry is None else f"{entry[1]}{entry[0]}"

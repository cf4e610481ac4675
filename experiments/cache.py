"""Shared by the experiment families: crash-safe writes of cached target files, and checked reads of
target .npz files (a cache entry or a user's `weights_path`)."""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
import zlib
from pathlib import Path
from typing import BinaryIO, Callable

import numpy as np

# what np.load and NpzFile raise for a file that is not a readable .npz (not a zip, truncated, a bad CRC, ...)
_UNREADABLE = (OSError, ValueError, EOFError, KeyError, NotImplementedError, zipfile.BadZipFile, zlib.error)


def atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Write `path` through a temporary file in the same directory and `os.replace` it into place."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def cache_remedy(sidecar: Path) -> str:
    """What to do about a damaged target cache entry."""
    return f"delete it and {sidecar.name} to retrain the target"


def file_remedy(shapes: dict[str, tuple[tuple[int, ...], str]]) -> str:
    """What to do about a bad user-given target file."""
    return "give an .npz (numpy.savez) with arrays " + ", ".join(f"{k} {d}" for k, (_, d) in shapes.items())


def read_npz(path: Path, shapes: dict[str, tuple[tuple[int, ...], str]], what: str, remedy: str) -> dict[str, np.ndarray]:
    """The arrays named in `shapes` (`{name: (shape, "(n_hidden, n_features)")}`) from the .npz file `path`,
    as float32. A file that is not a readable .npz (not a zip, truncated, a damaged member), a missing
    array, a non-numeric or wrongly shaped array, or non-finite values give one-line ValueErrors
    `<what>: '<path>' ...; <remedy>`."""
    where = f"{what}: {str(path)!r}"
    try:
        data = np.load(path, allow_pickle=False)
    except _UNREADABLE as e:
        raise ValueError(f"{where} is damaged, not a readable .npz file ({_one_line(e)}); {remedy}") from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise ValueError(f"{where} is a single .npy array, not an .npz file of arrays {list(shapes)}; {remedy}")
    out = {}
    with data:
        missing = [k for k in shapes if k not in data.files]
        if missing:
            raise ValueError(f"{where} must hold arrays {list(shapes)} (missing {missing}); {remedy}")
        for k in shapes:
            try:
                a = data[k]
            except _UNREADABLE as e:
                raise ValueError(f"{where} is damaged: array {k!r} is unreadable ({_one_line(e)}); {remedy}") from None
            if not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):
                raise ValueError(f"{where}: array {k!r} has dtype {a.dtype}, not a number type; {remedy}")
            out[k] = a.astype(np.float32)
    bad = [f"{k} {out[k].shape}, the config needs {desc} = {shape}"
           for k, (shape, desc) in shapes.items() if out[k].shape != tuple(shape)]
    if bad:
        raise ValueError(f"{where} has the wrong shapes: {', and '.join(bad)}; {remedy}")
    nonfinite = [k for k in shapes if not np.isfinite(out[k]).all()]
    if nonfinite:
        raise ValueError(f"{where}: array(s) {nonfinite} hold non-finite values; {remedy}")
    return out


def read_sidecar(sidecar: Path, npz: Path) -> dict:
    """The `info` of a cache entry's JSON sidecar; a damaged one is a one-line ValueError saying to delete
    the entry."""
    remedy = f"delete it and {npz.name} to retrain the target"
    try:
        meta = json.loads(sidecar.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"target cache sidecar {str(sidecar)!r} is damaged, not valid JSON ({_one_line(e)}); "
                         f"{remedy}") from None
    info = meta.get("info") if isinstance(meta, dict) else None
    if not isinstance(info, dict):
        raise ValueError(f"target cache sidecar {str(sidecar)!r} is damaged: no 'info' object; {remedy}")
    return info


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def nnx_arrays(model) -> dict[str, np.ndarray]:
    """An NNX model's parameters as `{keystr(path): array}` (what a cached target .npz holds)."""
    import jax
    from flax import nnx

    leaves = jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))[0]
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in leaves}


def set_nnx_arrays(model, arrays: dict[str, np.ndarray]):
    """`model` with its parameters replaced by `arrays` (as `nnx_arrays` names them); returns it."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    leaves, treedef = jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))
    new = []
    for p, old in leaves:
        a = arrays[jax.tree_util.keystr(p)]
        if a.shape != old.shape:
            raise ValueError(f"{jax.tree_util.keystr(p)}: cached shape {a.shape}, the model needs {old.shape}")
        new.append(jnp.asarray(a, old.dtype))
    nnx.update(model, jax.tree_util.tree_unflatten(treedef, new))
    return model


def cached_nnx_target(prefix: str, config: dict, cache_dir: Path, make: Callable, train: Callable) -> tuple:
    """`(model, info)` from `cache_dir/<prefix>-<hash(config)>.npz` (+ `.json` sidecar with the config and
    `info`) when present, else `train() -> (model, info)` and cached atomically. `make()` builds an
    untrained model of the right shapes. `info` gains `cached` and `cache_file`."""
    import hashlib

    key = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]
    npz, sidecar = Path(cache_dir) / f"{prefix}-{key}.npz", Path(cache_dir) / f"{prefix}-{key}.json"
    if npz.exists() and sidecar.exists():
        info = read_sidecar(sidecar, npz)
        try:
            with np.load(npz, allow_pickle=False) as data:
                arrays = {k: data[k] for k in data.files}
            model = set_nnx_arrays(make(), arrays)
        except (*_UNREADABLE, TypeError) as e:
            raise ValueError(f"target cache: {str(npz)!r} is damaged ({_one_line(e)}); {cache_remedy(sidecar)}") from None
        return model, {**info, "cached": True, "cache_file": str(npz)}
    model, info = train()
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    arrays = nnx_arrays(model)
    atomic_write(npz, lambda f: np.savez(f, **arrays))
    atomic_write(sidecar, lambda f: f.write(json.dumps({"config": config, "info": info}).encode()))
    return model, {**info, "cached": False, "cache_file": str(npz)}

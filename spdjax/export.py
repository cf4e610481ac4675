"""Framework-neutral export of a decomposition: safetensors tensors + a JSON description.

A saved decomposition is a directory holding
- `decomposition.safetensors`: `components/<site>/V` (d_in, C), `components/<site>/U` (C, d_out) for
  every primary site; `ci/<site>/weights/<i>` and `ci/<site>/biases/<i>` for every site's CI function
  (shapes in spdjax.ci.CIParams);
- `decomposition.json`: `{"format": "spdjax-decomposition", "format_version": 1, "spdjax_version",
  "ci_type", "ci_hidden", "sites": [{name, kind, in_shape, out_shape, C, d_in, tied_to, einsum_str}],
  "extra": {...}}`. Site kernels follow Flax: `kernel (d_in, d_out) ~ V @ U`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file, save_file

from spdjax.ci import CIParams
from spdjax.components import Components
from spdjax.decomposition import SPDParams
from spdjax.sites import SiteSpec
from spdjax.version import __version__

FORMAT = "spdjax-decomposition"
FORMAT_VERSION = 1
TENSORS = "decomposition.safetensors"
META = "decomposition.json"


class Decomposition(NamedTuple):
    params: SPDParams
    sites: tuple[SiteSpec, ...]
    ci_type: str
    ci_hidden: tuple[int, ...]
    extra: dict


def flatten_params(params: SPDParams) -> dict[str, np.ndarray]:
    """`{"components/<site>/V": ..., "ci/<site>/weights/0": ...}` as host arrays."""
    out = {}
    for site, c in params.components.items():
        out[f"components/{site}/V"] = np.asarray(c.V)
        out[f"components/{site}/U"] = np.asarray(c.U)
    for site, p in params.ci.items():
        for i, (w, b) in enumerate(zip(p.weights, p.biases)):
            out[f"ci/{site}/weights/{i}"] = np.asarray(w)
            out[f"ci/{site}/biases/{i}"] = np.asarray(b)
    return out


def current_umask() -> int:
    """The process umask, read without changing it where /proc allows (else set and restored at once)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def save_tensors(tensors: dict[str, np.ndarray], path: str | Path) -> None:
    """`safetensors.numpy.save_file`, with the file mode a plain `open()` would give (0666 & ~umask,
    e.g. 0644): safetensors itself creates its files readable by their owner only (0600)."""
    save_file(tensors, str(path))
    os.chmod(path, 0o666 & ~current_umask())


def save(
    path: str | Path,
    params: SPDParams,
    sites: tuple[SiteSpec, ...],
    ci_type: str,
    ci_hidden: tuple[int, ...],
    extra: dict | None = None,
) -> Path:
    """Write the decomposition into directory `path` (files replaced atomically; modes follow the umask)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "spdjax_version": __version__,
        "ci_type": ci_type,
        "ci_hidden": list(ci_hidden),
        "sites": [dataclasses.asdict(s) for s in sites],
        "extra": extra or {},
    }
    tmp = path / (TENSORS + ".tmp")
    save_tensors(flatten_params(params), tmp)
    os.replace(tmp, path / TENSORS)
    tmp = path / (META + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2))
    os.replace(tmp, path / META)
    return path


def load(path: str | Path) -> Decomposition:
    """Read a decomposition written by `save`; params come back as jax arrays, ready for `loss_fn`."""
    path = Path(path)
    if not (path / META).exists() or not (path / TENSORS).exists():
        raise FileNotFoundError(f"{path} is not a saved spdjax decomposition (needs {META} and {TENSORS})")
    meta: dict[str, Any] = json.loads((path / META).read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path / META}: format {meta.get('format')!r} is not {FORMAT!r}")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{path / META}: format_version {meta['format_version']} is newer than this spdjax")
    tensors = load_file(str(path / TENSORS))
    sites = tuple(
        SiteSpec(**{**s, "in_shape": tuple(s["in_shape"]), "out_shape": tuple(s["out_shape"])})
        for s in meta["sites"]
    )
    components, ci = {}, {}
    for s in sites:
        if s.tied_to is None:
            components[s.name] = Components(
                V=jnp.asarray(tensors[f"components/{s.name}/V"]),
                U=jnp.asarray(tensors[f"components/{s.name}/U"]),
            )
        n = sum(1 for k in tensors if k.startswith(f"ci/{s.name}/weights/"))
        ci[s.name] = CIParams(
            tuple(jnp.asarray(tensors[f"ci/{s.name}/weights/{i}"]) for i in range(n)),
            tuple(jnp.asarray(tensors[f"ci/{s.name}/biases/{i}"]) for i in range(n)),
            meta["ci_type"],
        )
    return Decomposition(
        SPDParams(components, ci), sites, meta["ci_type"], tuple(meta["ci_hidden"]), meta.get("extra", {})
    )

"""The saved APD decomposition: `apd.safetensors` (`components/<site>/A` (C, d_in, m),
`components/<site>/B` (C, m, d_out) per primary site) and `apd.json` (format, sites, APD settings,
extras). Kernel layout as the library's: component c at site l is `A[c] @ B[c]` (d_in, d_out)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file

from spdjax.apd.components import APDComponents, APDParams
from spdjax.apd.losses import APDConfig
from spdjax.export import save_tensors

FORMAT = "spdjax-apd-decomposition"
TENSORS = "apd.safetensors"
META = "apd.json"


def save(path: str | Path, params: APDParams, sites, config: APDConfig, extra: dict | None = None) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, c in params.components.items():
        tensors[f"components/{name}/A"] = np.ascontiguousarray(np.asarray(c.A))
        tensors[f"components/{name}/B"] = np.ascontiguousarray(np.asarray(c.B))
    save_tensors(tensors, path / (TENSORS + ".tmp"))  # mode 0666 & ~umask, as apd.json's
    (path / (TENSORS + ".tmp")).replace(path / TENSORS)
    meta = {
        "format": FORMAT,
        "format_version": 1,
        "sites": [dataclasses.asdict(s) for s in sites],
        "apd": {k: v for k, v in dataclasses.asdict(config).items()},
        "extra": extra or {},
    }
    (path / META).write_text(json.dumps(meta, indent=2, default=float))
    return path


def load(path: str | Path) -> tuple[APDParams, dict]:
    path = Path(path)
    meta = json.loads((path / META).read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path / META} is not an APD decomposition")
    t = load_file(str(path / TENSORS))
    names = sorted({k.split("/")[1] for k in t})
    params = APDParams({
        n: APDComponents(A=jnp.asarray(t[f"components/{n}/A"]), B=jnp.asarray(t[f"components/{n}/B"]))
        for n in names
    })
    return params, meta

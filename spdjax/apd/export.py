"""The saved APD decomposition: `apd.safetensors` (`components/<site>/A` (C, d_in, m),
`components/<site>/B` (C, m, d_out) per primary site) and `apd.json` (format, format_version 2, sites,
APD settings, `tensors`: each tensor's dtype, shape and sha256, extras). Kernel layout as the library's:
component c at site l is `A[c] @ B[c]` (d_in, d_out).

`load` checks the files as `spdjax.export.load` does (field types, the tensors the sites and the APD
settings imply, their shapes, and the checksums; version 1 files have none): a damaged or inconsistent
file is a one-line ValueError naming the file and the field or tensor."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from spdjax.apd.components import APDComponents, APDParams, site_m
from spdjax.apd.losses import APDConfig
from spdjax.export import (
    bad_field,
    check_format,
    is_int,
    parse_records,
    parse_sites,
    read_meta,
    read_tensors,
    tensor_records,
    write_files,
)

FORMAT = "spdjax-apd-decomposition"
FORMAT_VERSION = 2  # 2: per-tensor dtype, shape and sha256 in "tensors" (1 still loads)
TENSORS = "apd.safetensors"
META = "apd.json"


def save(path: str | Path, params: APDParams, sites, config: APDConfig, extra: dict | None = None) -> Path:
    """Write the decomposition into directory `path` (each file replaced atomically; modes follow the umask)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, c in params.components.items():
        tensors[f"components/{name}/A"] = np.ascontiguousarray(np.asarray(c.A))
        tensors[f"components/{name}/B"] = np.ascontiguousarray(np.asarray(c.B))
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "sites": [dataclasses.asdict(s) for s in sites],
        "apd": {k: v for k, v in dataclasses.asdict(config).items()},
        "tensors": tensor_records(tensors),
        "extra": extra or {},
    }
    write_files(path, TENSORS, tensors, META, meta)
    return path


def load(path: str | Path) -> tuple[APDParams, dict]:
    """`(params, the apd.json description)`, checked first (see the module docstring)."""
    path = Path(path)
    if not (path / META).is_file() or not (path / TENSORS).is_file():
        raise FileNotFoundError(f"{path} is not a saved APD decomposition (needs {META} and {TENSORS})")
    meta_file = path / META
    meta = read_meta(meta_file)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{meta_file} is not an APD decomposition (format {meta.get('format')!r}, not {FORMAT!r})")
    version = check_format(meta_file, meta, FORMAT, FORMAT_VERSION)
    apd = meta.get("apd")
    if not isinstance(apd, dict):
        bad_field(meta_file, "apd", "an object (the APD settings)", apd)
    C, m = apd.get("C"), apd.get("m")
    if not is_int(C) or C < 1:
        bad_field(meta_file, "apd.C", "an int >= 1", C)
    if m is not None and (not is_int(m) or m < 1):
        bad_field(meta_file, "apd.m", "null or an int >= 1", m)
    if not isinstance(meta.get("extra", {}), dict):
        bad_field(meta_file, "extra", "an object", meta["extra"])
    sites = parse_sites(meta_file, meta.get("sites"))
    expected = {}
    for s in sites:
        if s.tied_to is None:
            mm = site_m(s, m)
            expected[f"components/{s.name}/A"] = (C, s.d_in, mm)
            expected[f"components/{s.name}/B"] = (C, mm, s.d_out)
    records = parse_records(meta_file, meta.get("tensors")) if version >= 2 else None
    t = read_tensors(path / TENSORS, meta_file, expected, records)
    params = APDParams({
        s.name: APDComponents(A=jnp.asarray(t[f"components/{s.name}/A"]), B=jnp.asarray(t[f"components/{s.name}/B"]))
        for s in sites if s.tied_to is None
    })
    return params, meta

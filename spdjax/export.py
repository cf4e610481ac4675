"""Framework-neutral export of a decomposition: safetensors tensors + a JSON description.

A saved decomposition is a directory holding
- `decomposition.safetensors`: `components/<site>/V` (d_in, C), `components/<site>/U` (C, d_out) for
  every primary site; `ci/<site>/weights/<i>` and `ci/<site>/biases/<i>` for every site's CI function
  (shapes in spdjax.ci.CIParams);
- `decomposition.json`: `{"format": "spdjax-decomposition", "format_version": 2, "spdjax_version",
  "ci_type", "ci_hidden", "sites": [{name, kind, in_shape, out_shape, C, d_in, tied_to, einsum_str}],
  "tensors": {<name>: {"dtype", "shape", "sha256"}}, "extra": {...}}`. Site kernels follow Flax:
  `kernel (d_in, d_out) ~ V @ U`.

`load` checks everything before returning: the JSON's field types, that the tensor file holds exactly
the tensors the sites imply with the shapes they imply, and (format_version 2; version 1 files have no
checksums) each tensor's dtype, shape and sha256 of its bytes against the record. A damaged or
inconsistent file is a one-line ValueError naming the file and the field or tensor.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from spdjax.ci import CI_KINDS, CIParams, ci_shapes
from spdjax.components import Components
from spdjax.decomposition import SPDParams
from spdjax.sites import KINDS, SiteSpec
from spdjax.version import __version__

FORMAT = "spdjax-decomposition"
FORMAT_VERSION = 2  # 2: per-tensor dtype, shape and sha256 in "tensors" (1 still loads)
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
    tensors = flatten_params(params)
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "spdjax_version": __version__,
        "ci_type": ci_type,
        "ci_hidden": list(ci_hidden),
        "sites": [dataclasses.asdict(s) for s in sites],
        "tensors": tensor_records(tensors),
        "extra": extra or {},
    }
    write_files(path, TENSORS, tensors, META, meta)
    return path


def load(path: str | Path) -> Decomposition:
    """Read a decomposition written by `save`; params come back as jax arrays, ready for `loss_fn`.

    Everything is checked first (see the module docstring); a damaged or inconsistent file is a one-line
    ValueError naming it and the field or tensor."""
    path = Path(path)
    if not (path / META).is_file() or not (path / TENSORS).is_file():
        raise FileNotFoundError(f"{path} is not a saved spdjax decomposition (needs {META} and {TENSORS})")
    meta_file = path / META
    meta = read_meta(meta_file)
    version = check_format(meta_file, meta, FORMAT, FORMAT_VERSION)
    ci_type = meta.get("ci_type")
    if not isinstance(ci_type, str) or ci_type not in CI_KINDS:
        bad_field(meta_file, "ci_type", f"one of {list(CI_KINDS)}", ci_type)
    ci_hidden = meta.get("ci_hidden")
    if not isinstance(ci_hidden, list) or not all(is_int(h) and h >= 1 for h in ci_hidden):
        bad_field(meta_file, "ci_hidden", "a list of ints >= 1", ci_hidden)
    if not isinstance(meta.get("spdjax_version", ""), str):
        bad_field(meta_file, "spdjax_version", "a str", meta["spdjax_version"])
    extra = meta.get("extra", {})
    if not isinstance(extra, dict):
        bad_field(meta_file, "extra", "an object", extra)
    sites = parse_sites(meta_file, meta.get("sites"))
    expected = {}
    for s in sites:
        if s.tied_to is None:
            expected[f"components/{s.name}/V"] = (s.d_in, s.C)
            expected[f"components/{s.name}/U"] = (s.C, s.d_out)
    for s in sites:
        for i, (w, b) in enumerate(ci_shapes(ci_type, s.d_in, s.C, tuple(ci_hidden))):
            expected[f"ci/{s.name}/weights/{i}"] = w
            expected[f"ci/{s.name}/biases/{i}"] = b
    records = parse_records(meta_file, meta.get("tensors")) if version >= 2 else None
    tensors = read_tensors(path / TENSORS, meta_file, expected, records)
    components, ci = {}, {}
    for s in sites:
        if s.tied_to is None:
            components[s.name] = Components(
                V=jnp.asarray(tensors[f"components/{s.name}/V"]),
                U=jnp.asarray(tensors[f"components/{s.name}/U"]),
            )
        n = len(ci_hidden) + 1
        ci[s.name] = CIParams(
            tuple(jnp.asarray(tensors[f"ci/{s.name}/weights/{i}"]) for i in range(n)),
            tuple(jnp.asarray(tensors[f"ci/{s.name}/biases/{i}"]) for i in range(n)),
            ci_type,
        )
    return Decomposition(SPDParams(components, ci), sites, ci_type, tuple(ci_hidden), extra)


# ----------------------------------------------------------------------------- shared with spdjax.apd.export


def tensor_sha256(a: np.ndarray) -> str:
    """sha256 of the array's bytes in C order (what safetensors stores, little-endian)."""
    a = np.ascontiguousarray(a)
    if a.dtype.byteorder == ">":
        a = a.astype(a.dtype.newbyteorder("<"))
    return hashlib.sha256(a.reshape(-1).view(np.uint8)).hexdigest()


def tensor_records(tensors: dict[str, np.ndarray]) -> dict[str, dict]:
    """`{name: {"dtype", "shape", "sha256"}}` of the tensors written, for the JSON description."""
    return {
        name: {"dtype": str(a.dtype), "shape": list(a.shape), "sha256": tensor_sha256(a)}
        for name, a in tensors.items()
    }


def write_files(path: Path, tensors_name: str, tensors: dict[str, np.ndarray], meta_name: str, meta: dict) -> None:
    """The tensor file, then the JSON (which holds the tensors' checksums), each through a temporary
    file replaced into place: a reader sees either file whole, and a pair left mismatched by a crash
    between the two fails its checksums loudly."""
    tmp = path / (tensors_name + ".tmp")
    save_tensors(tensors, tmp)
    os.replace(tmp, path / tensors_name)
    tmp = path / (meta_name + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2, default=float))
    os.replace(tmp, path / meta_name)


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _show(v: object) -> str:
    r = repr(v)
    return _one_line(r if len(r) <= 80 else r[:77] + "...")


def bad_field(file: Path, field: str, want: str, got: object):
    """Raise the one-line error for a JSON field of the wrong type or value."""
    raise ValueError(f"{file}: field '{field}' must be {want}, got {_show(got)} ({type(got).__name__})")


def read_meta(file: Path) -> dict:
    """The JSON description as a dict; a file that is not a JSON object is a one-line ValueError."""
    try:
        meta = json.loads(file.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{file}: damaged, not valid JSON ({_one_line(e)})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{file}: damaged, expected a JSON object, got a {type(meta).__name__}")
    return meta


def check_format(file: Path, meta: dict, fmt: str, newest: int) -> int:
    """`format` must be `fmt` and `format_version` an int in 1..newest; returns the version."""
    if meta.get("format") != fmt:
        raise ValueError(f"{file}: format {meta.get('format')!r} is not {fmt!r}")
    version = meta.get("format_version")
    if not is_int(version) or version < 1:
        bad_field(file, "format_version", "an int >= 1", version)
    if version > newest:
        raise ValueError(f"{file}: format_version {version} is newer than this spdjax reads ({newest}); upgrade spdjax")
    return version


def _int_list(v: object, least: int) -> bool:
    return isinstance(v, list) and all(is_int(x) and x >= least for x in v)


def parse_sites(file: Path, raw: object) -> tuple[SiteSpec, ...]:
    """The `sites` field: a non-empty list of SiteSpec objects with the right keys and types."""
    if not isinstance(raw, list) or not raw:
        bad_field(file, "sites", "a non-empty list of site objects", raw)
    keys = [f.name for f in dataclasses.fields(SiteSpec)]
    sites = []
    for i, s in enumerate(raw):
        at = f"sites[{i}]"
        if not isinstance(s, dict):
            bad_field(file, at, f"an object with keys {keys}", s)
        if sorted(s) != sorted(keys):
            missing, unknown = sorted(set(keys) - set(s)), sorted(set(s) - set(keys))
            raise ValueError(f"{file}: field {at!r} must have the keys {keys}"
                             + (f"; missing {missing}" if missing else "") + (f"; unknown {unknown}" if unknown else ""))
        checks = (
            ("name", lambda v: isinstance(v, str) and v != "", "a non-empty str"),
            ("kind", lambda v: isinstance(v, str) and v in KINDS, f"one of {list(KINDS)}"),
            ("in_shape", lambda v: _int_list(v, 1), "a list of ints >= 1"),
            ("out_shape", lambda v: _int_list(v, 1), "a list of ints >= 1"),
            ("C", lambda v: is_int(v) and v >= 1, "an int >= 1"),
            ("d_in", lambda v: is_int(v) and v >= 1, "an int >= 1"),
            ("tied_to", lambda v: v is None or isinstance(v, str), "null or a site name"),
            ("einsum_str", lambda v: v is None or isinstance(v, str), "null or a str"),
        )
        for key, ok, want in checks:
            if not ok(s[key]):
                bad_field(file, f"{at}.{key}", want, s[key])
        sites.append(SiteSpec(**{**s, "in_shape": tuple(s["in_shape"]), "out_shape": tuple(s["out_shape"])}))
    names = [s.name for s in sites]
    primary = {s.name for s in sites if s.tied_to is None}
    for i, s in enumerate(sites):
        if names.count(s.name) > 1:
            raise ValueError(f"{file}: field 'sites[{i}].name': site {s.name!r} is listed twice")
        if s.tied_to is not None and s.tied_to not in primary:
            bad_field(file, f"sites[{i}].tied_to", f"null or one of the untied sites {sorted(primary)}", s.tied_to)
    return tuple(sites)


def parse_records(file: Path, raw: object) -> dict[str, dict]:
    """The `tensors` field (format_version >= 2): `{name: {"dtype": str, "shape": [int], "sha256": hex}}`."""
    if not isinstance(raw, dict):
        bad_field(file, "tensors", 'an object {name: {"dtype", "shape", "sha256"}}', raw)
    for name, r in raw.items():
        at = f'tensors["{name}"]'
        if not isinstance(r, dict) or sorted(r) != ["dtype", "sha256", "shape"]:
            bad_field(file, at, 'an object with keys ["dtype", "shape", "sha256"]', r)
        if not isinstance(r["dtype"], str):
            bad_field(file, f"{at}.dtype", "a str", r["dtype"])
        if not _int_list(r["shape"], 0):
            bad_field(file, f"{at}.shape", "a list of ints >= 0", r["shape"])
        sha = r["sha256"]
        if not (isinstance(sha, str) and len(sha) == 64 and all(c in "0123456789abcdef" for c in sha)):
            bad_field(file, f"{at}.sha256", "64 lowercase hex digits", sha)
    return raw


def read_tensors(
    file: Path, meta_file: Path, expected: dict[str, tuple[int, ...]], records: dict[str, dict] | None
) -> dict[str, np.ndarray]:
    """The tensors of `file`, checked: exactly the `expected` names with the expected shapes and, with
    `records` (from the JSON), the recorded dtype, shape and sha256. One-line ValueErrors name the file
    and the tensor."""
    try:
        tensors = load_file(str(file))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{file}: damaged or truncated, not a readable safetensors file ({_one_line(e)})") from None
    missing = [n for n in expected if n not in tensors]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ValueError(f"{file}: tensor {missing[0]!r} is missing{more}; {meta_file.name} implies it")
    unknown = [n for n in tensors if n not in expected]
    if unknown:
        raise ValueError(f"{file}: unexpected tensor {unknown[0]!r}; {meta_file.name} implies no such tensor")
    if records is not None:
        for n in expected:
            if n not in records:
                raise ValueError(f"{meta_file}: field 'tensors' has no record of tensor {n!r}")
        for n in records:
            if n not in expected:
                raise ValueError(f"{meta_file}: field 'tensors' records tensor {n!r}, which its sites do not imply")
    for name, shape in expected.items():
        a = tensors[name]
        if records is not None:
            r = records[name]
            if str(a.dtype) != r["dtype"] or list(a.shape) != r["shape"]:
                raise ValueError(f"{file}: tensor {name!r} is {a.dtype}{list(a.shape)}, {meta_file.name} records "
                                 f"{r['dtype']}{r['shape']}")
        if tuple(a.shape) != tuple(shape):
            raise ValueError(f"{file}: tensor {name!r} has shape {tuple(a.shape)}; {meta_file.name} implies "
                             f"{tuple(shape)}")
        if records is not None and tensor_sha256(a) != records[name]["sha256"]:
            raise ValueError(f"{file}: tensor {name!r} fails its checksum (sha256 differs from the one recorded in "
                             f"{meta_file.name}): the file is damaged")
    return tensors

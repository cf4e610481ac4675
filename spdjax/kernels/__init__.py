"""Hand-written CPU kernels, registered with XLA through its FFI and used where XLA:CPU's own code is
far from the floor:
- `scalar_mlp.cc`: the backward of the per-subcomponent CI MLP (`spdjax.ci.scalar_mlp`), which XLA:CPU
  runs as several memory-bound passes over the (rows, C, H) hidden layer;
- `threefry.cc`: Threefry-2x32, the hash behind every `jax.random` draw (masks, data), bit for bit
  JAX's; registered as the CPU lowering of its primitive by `spdjax.cpu_tuning`.

The C++ sources ship with the package and are compiled on first use with the system's C++ compiler
(`$CXX`, else `c++`, `g++` or `clang++`) against the FFI headers of the installed jaxlib, for this
machine's CPU (`-march=native`). The library is cached under `$SPDJAX_KERNEL_CACHE` (default
`~/.cache/spdjax/kernels`), keyed by the source, the flags, the compiler, jaxlib's version and the CPU's
features, so a shared home directory on mixed hosts gets one build per kind of CPU.

`SPDJAX_NO_CPU_KERNELS=1` keeps the pure-JAX paths. Where the kernel cannot be built (no compiler, a
failed build), spdjax warns once and uses the pure-JAX paths; with `SPDJAX_REQUIRE_CPU_KERNELS=1` it
raises instead (CI sets it). `status()` says which happened. `python -m spdjax.kernels` builds the
kernel and prints the status.

The kernels run on the CPU backend only, in float32; other dtypes and backends take the pure-JAX path.
XLA cannot split a custom call across devices, so under a multi-device CPU mesh its inputs are gathered
and each device computes the whole result (same values; the JAX path avoids the gather).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

HERE = Path(__file__).parent
SOURCES = ("scalar_mlp.cc", "threefry.cc")
HEADERS = ("kernels_common.h",)
FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-w")
TARGETS = {"spdjax_scalar_mlp_bwd": "SpdjaxScalarMlpBackward", "spdjax_threefry2x32": "SpdjaxThreefry2x32"}

_lock = threading.Lock()
_state: dict[str, object] = {}


def _cpu_features() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _compiler() -> str | None:
    if os.environ.get("CXX"):
        return shutil.which(os.environ["CXX"])
    for name in ("c++", "g++", "clang++"):
        if found := shutil.which(name):
            return found
    return None


def cache_dir() -> Path:
    return Path(os.environ.get("SPDJAX_KERNEL_CACHE") or Path.home() / ".cache" / "spdjax" / "kernels")


def _build(cxx: str) -> Path:
    import jax
    import jaxlib

    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=True).stdout
    arch = ("-march=native",) if platform.machine() in ("x86_64", "AMD64", "i686") else ("-mcpu=native",)
    flags = (*FLAGS, *arch)
    key = hashlib.sha256(
        b"\0".join(
            s.encode()
            for s in (
                *((HERE / f).read_text() for f in SOURCES + HEADERS),
                " ".join(flags), version, jaxlib.__version__, _cpu_features(),
            )
        )
    ).hexdigest()[:24]
    out = cache_dir() / f"spdjax_kernels_{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    cmd = [cxx, *flags, f"-I{jax.ffi.include_dir()}", *(str(HERE / f) for f in SOURCES), "-o", tmp]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        os.unlink(tmp)
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
    os.replace(tmp, out)  # atomic: concurrent builders (pytest workers) never see half a file
    return out


def load() -> bool:
    """Build (once per machine), load and register the kernels; True when they are usable."""
    with _lock:
        if "ok" in _state:
            return bool(_state["ok"])
        ok, detail = False, ""
        if os.environ.get("SPDJAX_NO_CPU_KERNELS") == "1":
            detail = "off (SPDJAX_NO_CPU_KERNELS=1)"
        elif (cxx := _compiler()) is None:
            detail = "unavailable: no C++ compiler found ($CXX, c++, g++, clang++)"
        else:
            try:
                import jax

                path = _build(cxx)
                lib = ctypes.cdll.LoadLibrary(str(path))
                for target, symbol in TARGETS.items():
                    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
                ok, detail = True, f"loaded {path}"
            except Exception as e:  # noqa: BLE001 - any build or load failure is reported the same way
                detail = f"unavailable: {type(e).__name__}: {e}"
        _state.update(ok=ok, detail=detail)
        if not ok and not detail.startswith("off"):
            if os.environ.get("SPDJAX_REQUIRE_CPU_KERNELS") == "1":
                raise RuntimeError(f"spdjax CPU kernels {detail} (SPDJAX_REQUIRE_CPU_KERNELS=1)")
            warnings.warn(f"spdjax CPU kernels {detail}; using the slower pure-JAX paths", stacklevel=2)
        return ok


def status() -> str:
    """One line: whether the kernels were loaded, switched off or unavailable (and why)."""
    return str(_state.get("detail", "not loaded yet"))


def threefry2x32(k1, k2, x1, x2):
    """Threefry-2x32-20 of uint32 arrays broadcast together -> `(y1, y2)`, as one CPU kernel (JAX's
    `threefry2x32_p`, bit for bit). Call only when `load()` is True."""
    import jax
    import jax.numpy as jnp

    shape = jnp.broadcast_shapes(*(jnp.shape(v) for v in (k1, k2, x1, x2)))
    # the kernel broadcasts single elements itself; anything else is broadcast here
    args = [v if jnp.size(v) == 1 or jnp.shape(v) == shape else jnp.broadcast_to(v, shape) for v in (k1, k2, x1, x2)]
    out = jax.ShapeDtypeStruct(shape, jnp.uint32)
    return tuple(jax.ffi.ffi_call("spdjax_threefry2x32", (out, out), vmap_method="broadcast_all")(*args))


def scalar_mlp_grads(w1, b1, w2, h, dz):
    """The backward of `spdjax.ci.scalar_mlp` as one CPU kernel: (dw1, db1, dw2, dh) for w1, b1, w2:
    (C, H), h, dz: (N, C), float32. Call only when `load()` is True."""
    import jax

    w = jax.ShapeDtypeStruct(w1.shape, w1.dtype)
    call = jax.ffi.ffi_call(
        "spdjax_scalar_mlp_bwd", (w, w, w, jax.ShapeDtypeStruct(h.shape, h.dtype)), vmap_method="sequential"
    )
    return call(w1, b1, w2, h, dz)

"""What spdjax sets for CPU speed when it is imported (before JAX starts its backend): XLA flags,
glibc's malloc settings and the CPU lowering of JAX's Threefry hash. `SPDJAX_NO_CPU_TUNING=1` leaves
all three alone. None changes a result: the same bits, the same values.

**XLA flags** (`SPDJAX_NO_XLA_FLAGS=1` leaves only these alone):

`--xla_cpu_enable_concurrency_optimized_scheduler=false`: XLA:CPU's default scheduler interleaves
independent work (e.g. the CI functions of different sites) so their large temporaries are live at
once; on a 2-core machine that made one TMS 5-2 training step 2-3x slower than running them one
after another.

`--xla_cpu_experimental_ynn_fusion_type=`: switches off XLA:CPU's experimental YNNPACK fusions. They
materialise full-size broadcasts around every reduction, so the (batch, C, hidden) CI-MLP temporaries
went through memory several extra times: with them off one resid_mlp:2 step went from 1.22 s to 0.82 s
and the CI-only part of tms_40-10_id from ~370 ms to ~140 ms (2026-12-03, with the chunked CI-MLP
backward of `spdjax.ci`). Both flags only affect the CPU backend.

XLA aborts on a flag it does not know, so a flag is only added for jaxlib versions it was checked on.
Nothing is changed when `XLA_FLAGS` already mentions the flag, or when `SPDJAX_NO_XLA_FLAGS=1`.
Flags set after JAX has initialised its CPU backend have no effect (import spdjax first).

**malloc** (`SPDJAX_NO_MALLOC_TUNING=1` leaves only this alone): XLA:CPU allocates each execution's
temporaries afresh. glibc serves blocks above its mmap threshold (at most 32 MiB) with a fresh `mmap`
and unmaps them on free, so every step page-faulted its temporaries in again: a resid_mlp:1 step
(44.6 MiB of temporaries) took 11,400 page faults and ~15 ms of kernel time out of ~120 ms. spdjax
sets `M_MMAP_MAX = 0` (blocks come from the heap, reused step after step), a 2 GiB
`M_TRIM_THRESHOLD` (freed memory stays with the process) and `M_ARENA_MAX = 1` (XLA's threads
allocate from the main heap too: a thread arena's heaps hold at most 64 MiB, so bigger blocks were
mapped afresh anyway; resid_mlp2's 217 MiB of temporaries took 55,600 faults and 75 ms of kernel
time per ~520 ms step) through `mallopt`: the faults are gone and those steps are ~10% faster. The process keeps its peak heap instead of returning it to the system. Only
on Linux with glibc (`MALLOC_TUNED` says whether it was applied); elsewhere nothing changes.

**Threefry** (`SPDJAX_NO_FAST_THREEFRY=1` leaves only this alone): every random draw (masks, data) runs
JAX's Threefry-2x32 hash. On CPU JAX lowers it as a loop of 5 x 4 rounds whose two state arrays XLA
computes in two fused kernels, each redoing the other's rounds, and copies every iteration; 491,520
uniforms took 4.2 ms on one core. `threefry2x32` below computes the same 20 rounds (bit-identical,
checked against Random123's known-answer vectors and a NumPy implementation) with its state packed
into one uint64 array, so each block of rounds is one kernel: 1.4 ms for the same draw, and the
TMS 5-2 step went from ~13.0 to ~10.8 ms on one core. Where spdjax's CPU kernels are built
(`spdjax.kernels`), the lowering calls their C++ Threefry instead (the same bits; a uniform draw of
(8, 4096, 20): 1.83 -> 1.22 ms, the rest being JAX's counters and bits-to-float conversion; TMS 5-2
~7.1 -> ~6.5 ms on one core). Registered as the CPU lowering of `jax.extend.random.threefry2x32_p`
(`FAST_THREEFRY` says whether it was); other backends keep JAX's.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import os
import re
import sys

import numpy as np

from spdjax import kernels

# (flag, oldest jaxlib version it was checked on)
CPU_FLAGS = (
    ("--xla_cpu_enable_concurrency_optimized_scheduler=false", (0, 0, 0)),
    ("--xla_cpu_experimental_ynn_fusion_type=", (0, 10, 2)),
)


def _jaxlib_version() -> tuple[int, ...]:
    try:
        v = importlib.metadata.version("jaxlib")
    except importlib.metadata.PackageNotFoundError:
        return (0, 0, 0)
    return tuple(int(x) for x in re.findall(r"\d+", v)[:3])


def apply(version: tuple[int, ...] | None = None) -> None:
    """Adds `CPU_FLAGS` to `XLA_FLAGS` (those checked on this jaxlib `version`)."""
    if os.environ.get("SPDJAX_NO_XLA_FLAGS") == "1" or os.environ.get("SPDJAX_NO_CPU_TUNING") == "1":
        return
    version = _jaxlib_version() if version is None else version
    flags = os.environ.get("XLA_FLAGS", "")
    for f, since in CPU_FLAGS:
        if version >= since and f.split("=")[0] not in flags:
            flags = f"{flags} {f}".strip()
    os.environ["XLA_FLAGS"] = flags


M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8  # glibc's malloc.h
TRIM_THRESHOLD = 2**31 - 1


def tune_malloc() -> bool:
    """`mallopt(M_MMAP_MAX, 0)`, `mallopt(M_TRIM_THRESHOLD, 2 GiB)` and `mallopt(M_ARENA_MAX, 1)` on
    Linux with glibc; True if applied."""
    if os.environ.get("SPDJAX_NO_MALLOC_TUNING") == "1" or os.environ.get("SPDJAX_NO_CPU_TUNING") == "1":
        return False
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # glibc; musl and other C libraries have no mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return all(mallopt(o, v) == 1 for o, v in ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, TRIM_THRESHOLD), (M_ARENA_MAX, 1)))


_U32 = np.uint32
_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_PARITY = 0x1BD11BDA


def threefry2x32(k1, k2, x1, x2):
    """Threefry-2x32 with 20 rounds (Salmon et al. 2011; JAX's `threefry2x32_p`), uint32 arrays
    broadcast together -> `(y1, y2)`. Rounds 5-20 run as a 2-iteration loop over one uint64 array
    holding both words, so XLA fuses each iteration into a single kernel."""
    import jax

    with jax.enable_x64(True):  # uint64 state inside the lowering only
        return _threefry2x32(k1, k2, x1, x2)


def _threefry2x32(k1, k2, x1, x2):
    import jax.numpy as jnp
    from jax import lax

    def rotl(x, d):
        return lax.shift_left(x, _U32(d)) | lax.shift_right_logical(x, _U32(32 - d))

    def rounds(a, b, rotations):
        for d in rotations:
            a = a + b
            b = rotl(b, d) ^ a
        return a, b

    def pack(a, b):
        return lax.shift_left(a.astype(jnp.uint64), jnp.uint64(32)) | b.astype(jnp.uint64)

    def unpack(p):
        return lax.shift_right_logical(p, jnp.uint64(32)).astype(jnp.uint32), p.astype(jnp.uint32)

    ks = (k1, k2, k1 ^ k2 ^ _U32(_PARITY))

    def key(j):  # ks[j % 3] for a traced block number j
        m = j % 3
        return jnp.where(m == 0, ks[0], jnp.where(m == 1, ks[1], ks[2]))

    shape = jnp.broadcast_shapes(*(jnp.shape(v) for v in (k1, k2, x1, x2)))
    a, b = rounds(jnp.broadcast_to(x1 + ks[0], shape), jnp.broadcast_to(x2 + ks[1], shape), _ROTATIONS[0])
    a, b = a + ks[1], b + ks[2] + _U32(1)

    def two_blocks(i, p):  # blocks 2 + 2i and 3 + 2i of 4 rounds each, then their key injections
        a, b = unpack(p)
        for t, rotations in enumerate((_ROTATIONS[1], _ROTATIONS[0])):
            j = (2 + 2 * i + t).astype(jnp.uint32)
            a, b = rounds(a, b, rotations)
            a, b = a + key(j), b + key(j + 1) + j
        return pack(a, b)

    return unpack(lax.fori_loop(0, 2, two_blocks, pack(a, b)))


def _threefry_cpu(k1, k2, x1, x2):
    """The CPU lowering: `spdjax.kernels`' C++ kernel when it is built, else `threefry2x32`."""
    if kernels.load():
        return kernels.threefry2x32(k1, k2, x1, x2)
    return threefry2x32(k1, k2, x1, x2)


def use_fast_threefry() -> bool:
    """Registers `_threefry_cpu` as the CPU lowering of JAX's Threefry primitive; True if registered."""
    if os.environ.get("SPDJAX_NO_FAST_THREEFRY") == "1" or os.environ.get("SPDJAX_NO_CPU_TUNING") == "1":
        return False
    try:
        from jax.extend.random import threefry2x32_p
        from jax.interpreters import mlir
    except ImportError:
        return False
    mlir.register_lowering(threefry2x32_p, mlir.lower_fun(_threefry_cpu, multiple_results=True), platform="cpu")
    return True


apply()
MALLOC_TUNED = tune_malloc()
FAST_THREEFRY = use_fast_threefry()

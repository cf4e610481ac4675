"""What spdjax sets for CPU speed when it is imported (before JAX starts its backend): XLA flags and
glibc's malloc settings. `SPDJAX_NO_CPU_TUNING=1` leaves both alone.

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
sets `M_MMAP_MAX = 0` (blocks come from the heap, reused step after step) and a 2 GiB
`M_TRIM_THRESHOLD` (freed memory stays with the process) through `mallopt`: the faults are gone and
that step is ~10% faster. The process keeps its peak heap instead of returning it to the system. Only
on Linux with glibc (`MALLOC_TUNED` says whether it was applied); elsewhere nothing changes.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import os
import re
import sys

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


M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's malloc.h
TRIM_THRESHOLD = 2**31 - 1


def tune_malloc() -> bool:
    """`mallopt(M_MMAP_MAX, 0)` and `mallopt(M_TRIM_THRESHOLD, 2 GiB)` on Linux with glibc; True if applied."""
    if os.environ.get("SPDJAX_NO_MALLOC_TUNING") == "1" or os.environ.get("SPDJAX_NO_CPU_TUNING") == "1":
        return False
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # glibc; musl and other C libraries have no mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1


apply()
MALLOC_TUNED = tune_malloc()

"""XLA flags spdjax sets for CPU speed, applied when spdjax is imported (before JAX starts its backend).

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
"""

from __future__ import annotations

import importlib.metadata
import os
import re

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
    if os.environ.get("SPDJAX_NO_XLA_FLAGS") == "1":
        return
    version = _jaxlib_version() if version is None else version
    flags = os.environ.get("XLA_FLAGS", "")
    for f, since in CPU_FLAGS:
        if version >= since and f.split("=")[0] not in flags:
            flags = f"{flags} {f}".strip()
    os.environ["XLA_FLAGS"] = flags


apply()

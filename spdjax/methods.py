"""The table of decomposition methods: the config's `method` field names one (default `spd`)."""

from __future__ import annotations

from spdjax.apd.method import APD
from spdjax.method import Method
from spdjax.spd import SPD

METHODS: dict[str, type[Method]] = {"spd": SPD, "apd": APD}


def get(name: str) -> type[Method]:
    if name not in METHODS:
        raise ValueError(f"config.method: unknown {name!r}; allowed: {list(METHODS)}")
    return METHODS[name]

"""Targets: models whose chosen linear maps (sites) are decomposed."""

from spdjax.targets.base import Target, call_site, intercept
from spdjax.targets.nnx import from_nnx
from spdjax.targets.pure import from_apply, linear

__all__ = ["Target", "call_site", "intercept", "from_nnx", "from_apply", "linear"]

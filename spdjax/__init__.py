"""spdjax: Stochastic Parameter Decomposition in JAX.

The core is pure: parameters are pytrees, every operation a function of (params, batch, key).
"""

from spdjax import cpu_tuning  # noqa: F401  (must run before JAX initialises its backend)
from spdjax.ci import CIParams, init_ci
from spdjax.components import Components, masked_site_output, materialised_kernel
from spdjax.decomposition import SPDParams, init_decomposition
from spdjax.export import load
from spdjax.losses import LossConfig, loss_fn
from spdjax.sites import SitePattern, SiteSpec
from spdjax.targets import Target, from_apply, from_nnx
from spdjax.version import __version__

__all__ = [
    "__version__",
    "CIParams",
    "Components",
    "LossConfig",
    "SPDParams",
    "SitePattern",
    "SiteSpec",
    "Target",
    "from_apply",
    "from_nnx",
    "init_ci",
    "init_decomposition",
    "load",
    "loss_fn",
    "masked_site_output",
    "materialised_kernel",
]

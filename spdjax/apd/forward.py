"""Forward passes of the APD model through the target's site-handler mechanism.

`masked_forward` runs the target with every site replaced by its masked factored APD map
`sum_c mask_c (x A_c) B_c + b` (`mask=None`: the full APD model, every component). The mask has the
batch's leading axes: `(*lead, C)`; it is shared by every site (a component spans all sites).
"""

from __future__ import annotations

from typing import Any

import jax
from jaxtyping import Array

from spdjax.apd.components import APDParams, masked_site_output, site_components
from spdjax.losses.forward import clean_forward as spd_clean_forward
from spdjax.targets.base import Target


def masked_forward(
    params: APDParams, target: Target, batch: Any, mask: Array | None, record: dict | None = None
) -> Array:
    """Target forward with every site computing `sum_c mask_c (x A_c) B_c + b`.

    `record`, when given, receives every site's input in this pass (in call order).
    """

    def handler(spec, a, kernel, bias, layer_call):
        if record is not None:
            record[spec.name] = a
        return masked_site_output(spec, a, site_components(params, spec), mask, bias)

    return target.run(batch, handler)


def clean_forward(target: Target, batch: Any) -> tuple[Array, dict[str, Array]]:
    """Target output and every site's input in the target's own forward pass (gradients stopped)."""
    out, inputs = spd_clean_forward(target, batch)
    return jax.lax.stop_gradient(out), inputs

"""The `apd` section of a run config -> `APDConfig`.

    method: "apd"
    apd: {C, m, topk, batch_topk, attribution, coeffs: {faithfulness, topk_recon, act_recon, schatten,
          lp_sparsity}, schatten_p, schatten_eps, lp_p, unit_norm_A, init_scale, init_type}
    optim: {steps, lr, schedule (constant, or the reference's apd_cosine / apd_linear: spdjax.optim),
            warmup_frac, faithfulness_warmup_steps=0}

Coefficients must be finite and >= 0; a coefficient of 0 leaves its term out.
"""

from __future__ import annotations

import math

from spdjax.apd.losses import APDConfig
from spdjax.fields import dataclass_from, to_dict


def apd_config_from(section) -> APDConfig:
    values = to_dict(section, "apd")
    coeffs = values.pop("coeffs", None)
    if coeffs is not None:
        coeffs = to_dict(coeffs, "apd.coeffs")
        for k, v in coeffs.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ValueError(f"config.apd.coeffs.{k} must be a number, got {v!r}")
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"config.apd.coeffs.{k} must be finite and >= 0, got {v!r}")
        values["coeffs"] = tuple((k, float(v)) for k, v in coeffs.items() if float(v) != 0.0)
    if isinstance(values.get("topk"), int) and not isinstance(values.get("topk"), bool):
        values["topk"] = float(values["topk"])
    try:
        return dataclass_from(APDConfig, values, "apd")
    except TypeError as e:
        raise ValueError(f"config.apd: {e}") from None

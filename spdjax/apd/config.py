"""The `apd` section of a run config -> `APDConfig`, and `to_apd`, which turns an SPD run config of the
same experiment into an APD one (same target section, same data, same run settings).

    method: "apd"
    apd: {C, m, topk, batch_topk, attribution, coeffs: {faithfulness, topk_recon, act_recon, schatten,
          lp_sparsity}, schatten_p, schatten_eps, lp_p, unit_norm_A, init_scale, init_type}
    optim: {steps, lr, schedule (constant / cosine / linear, see spdjax.apd.train), warmup_frac}
"""

from __future__ import annotations

import ml_collections

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
        values["coeffs"] = tuple((k, float(v)) for k, v in coeffs.items() if float(v) != 0.0)
    if isinstance(values.get("topk"), int) and not isinstance(values.get("topk"), bool):
        values["topk"] = float(values["topk"])
    try:
        return dataclass_from(APDConfig, values, "apd")
    except TypeError as e:
        raise ValueError(f"config.apd: {e}") from None


def to_apd(
    cfg: ml_collections.ConfigDict,
    *,
    C: int,
    m: int | None,
    topk: float,
    coeffs: dict,
    schatten_p: float,
    lr: float,
    schedule: str,
    warmup_frac: float,
    steps: int,
    batch_size: int,
    unit_norm_A: bool = False,
    init_scale: float = 1.0,
    init_type: str = "kaiming_uniform",
    attribution: str = "gradient",
    batch_topk: bool = True,
) -> ml_collections.ConfigDict:
    """`cfg` (an SPD run config from the experiment's builder) switched to APD with these settings.

    The target section, sites (their C set to the APD C; it is unused by APD), tying, seed and run
    cadence stay; the SPD-only `ci` and `loss` sections are dropped; the faithfulness warm-up is off.
    """
    from ml_collections.config_dict import placeholder

    cfg.method = "apd"
    cfg.sites = tuple((pattern, C) for pattern, _ in cfg.sites)
    cfg.identity = tuple((pattern, C) for pattern, _ in (cfg.identity or ()))
    for name in ("ci", "loss"):
        if name in cfg:
            del cfg[name]
    all_coeffs = dict(faithfulness=0.0, topk_recon=0.0, act_recon=0.0, schatten=0.0, lp_sparsity=0.0)
    all_coeffs.update(coeffs)
    cfg.apd = ml_collections.ConfigDict(
        dict(
            C=C,
            m=placeholder(int) if m is None else m,
            topk=topk,
            batch_topk=batch_topk,
            attribution=attribution,
            coeffs=all_coeffs,
            schatten_p=schatten_p,
            schatten_eps=1e-16,  # guards (0)^(p/2) gradients (a collapsed rank direction); as the reference
            lp_p=1.0,
            unit_norm_A=unit_norm_A,
            init_scale=init_scale,
            init_type=init_type,
        )
    )
    cfg.optim = ml_collections.ConfigDict(
        dict(steps=steps, lr=lr, schedule=schedule, warmup_frac=warmup_frac, faithfulness_warmup_steps=0)
    )
    cfg.batch_size = cfg.eval_batch_size = batch_size
    return cfg


def shrink_for_smoke(cfg: ml_collections.ConfigDict, steps: int = 20, every: int = 10) -> ml_collections.ConfigDict:
    """The `:smoke` variant of an APD config: a few steps on small batches."""
    cfg.optim.steps = steps
    cfg.batch_size = cfg.eval_batch_size = min(cfg.batch_size, 128)
    cfg.log_every = cfg.checkpoint_every = every
    cfg.eval_every = steps  # one held-out evaluation, at the end
    return cfg

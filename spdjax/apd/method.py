"""APD (Attribution-based Parameter Decomposition) as a `spdjax.method.Method`.

Config section `apd` (see `spdjax.apd.config`). The APD reference trains with plain Adam (no faithfulness
warm-up, no clipping: such settings are refused) and its own schedules (`optim.schedule` `apd_cosine`
or `apd_linear`, see `spdjax.optim`). With `apd.unit_norm_A` every column `A_{c,l,:,m}` is normalised
over d_in before each step and the radial part of A's gradient is projected out, `g <- g - <g, a> a`.
"""

from __future__ import annotations

import dataclasses
import resource
from pathlib import Path

import jax.numpy as jnp
import ml_collections
from jaxtyping import Array

from spdjax.apd import analysis, export
from spdjax.apd.components import APDComponents, APDParams, init_apd
from spdjax.apd.config import apd_config_from
from spdjax.apd.losses import APDConfig, apd_loss_fn
from spdjax.experiment import Experiment
from spdjax.method import Method
from spdjax.optim import OptimConfig
from spdjax.targets.base import Target


@dataclasses.dataclass(frozen=True)
class APDSettings:
    apd: APDConfig
    n_features: int | None = None  # the target's feature count (one-hot analyses), if it has one


def normalize_A(params: APDParams) -> APDParams:
    """Every column `A_{c,l,:,m}` scaled to unit norm over d_in."""
    return APDParams({
        n: APDComponents(A=c.A / jnp.linalg.norm(c.A, axis=1, keepdims=True), B=c.B)
        for n, c in params.components.items()
    })


def project_A_grads(grads: APDParams, params: APDParams) -> APDParams:
    """Remove the radial part of A's gradient (A's columns unit norm): `g - <g, a> a` per column."""
    out = {}
    for n, g in grads.components.items():
        a = params.components[n].A
        out[n] = APDComponents(A=g.A - jnp.sum(g.A * a, axis=1, keepdims=True) * a, B=g.B)
    return APDParams(out)


def check_optim(optim: OptimConfig) -> None:
    """APD has no faithfulness warm-up and no gradient clipping: refuse settings that would be ignored."""
    if optim.faithfulness_warmup_steps:
        raise ValueError("optim.faithfulness_warmup_steps must be 0 for APD (faithfulness is a loss term)")
    if optim.clip_components is not None or optim.clip_ci is not None:
        raise ValueError("optim.clip_components / clip_ci are not supported for APD; leave them unset")


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (MiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class APD(Method):
    name = "apd"
    sections = ("apd",)
    params_type = APDParams

    @classmethod
    def from_config(cls, cfg: ml_collections.ConfigDict, optim: OptimConfig) -> "APD":
        check_optim(optim)
        target = cfg.get("target")
        n = target.get("n_features") if target is not None else None
        return cls(APDSettings(apd_config_from(cfg.get("apd")), int(n) if n else None))

    def init_params(self, key: Array, target: Target, dtype=jnp.float32) -> APDParams:
        a = self.settings.apd
        return init_apd(key, target, a.C, a.m, a.init_scale, dtype=dtype, init_type=a.init_type)

    def loss(self, params, target, batch, key, progress):
        return apd_loss_fn(params, target, batch, key, self.settings.apd)

    def constrain(self, params: APDParams) -> APDParams:
        return normalize_A(params) if self.settings.apd.unit_norm_A else params

    def project_grads(self, grads: APDParams, params: APDParams) -> APDParams:
        return project_A_grads(grads, params) if self.settings.apd.unit_norm_A else grads

    def analyze(self, params, exp: Experiment, batch, workdir: Path | None) -> dict:
        out = {"method": "apd"} if workdir is not None else {}
        out.update(analysis.analyze(params, exp.target, self.settings.apd, self.settings.n_features, batch, workdir))
        if workdir is not None:
            out["peak_rss_mib"] = peak_rss_mib()
        return out

    def export(self, path: Path, params, target: Target, extra: dict) -> None:
        export.save(path, params, target.sites, self.settings.apd, extra=extra)

    def load(self, path: Path, target: Target):
        params, meta = export.load(path)
        return params, meta.get("extra", {})

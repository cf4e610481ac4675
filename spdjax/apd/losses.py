"""APD loss terms, one pure function each, and `apd_loss_fn` composing them from an `APDConfig`.

N is the number of decomposed target weights (every primary site's kernel once); B the number of
leading positions of the batch (batch x positions).

| term | value |
|---|---|
| `faithfulness` | `sum_l ||W*_l - sum_c P_{c,l}||_F^2 / N` |
| `topk_recon` | `mean((f(x; top-k components) - f(x; W*))^2)` over positions and outputs |
| `act_recon` | MSE of the hidden activations (site inputs downstream of a decomposed site) in the top-k pass vs the target's; mean over those sites of each site's MSE |
| `schatten` | `sum_b sum_c mask_bc sum_l sum_m (||A_{c,l,:,m}||^2 ||B_{c,l,m,:}||^2)^(p/2) / (N B)` (mask: top-k, or all ones without top-k) |
| `lp_sparsity` | `mean_b sum_c |attr_c(x) / d_out|^(p/2)` (the L_p alternative to top-k; differentiable attributions) |
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from spdjax.apd.attributions import ATTRIBUTIONS, attributions
from spdjax.apd.components import INIT_TYPES, APDParams, faithfulness_loss, n_target_params
from spdjax.apd.forward import clean_forward, masked_forward
from spdjax.apd.topk import topk_mask
from spdjax.targets.base import Target

TERMS = ("faithfulness", "topk_recon", "act_recon", "schatten", "lp_sparsity")
TOPK_TERMS = ("topk_recon", "act_recon")


@dataclasses.dataclass(frozen=True)
class APDConfig:
    """Static APD settings (hashable, a leafless pytree: pass it to `jit` as is).

    C: components (each spans every site); m: rank per site (None: min(d_in, d_out) per site);
    topk: k of the top-k selection (batch top-k: a fraction of B per position, e.g. 0.211; per-sample:
    a whole number), None for no top-k (then `schatten` uses all components and `lp_sparsity` is the
    minimality term); attribution: `gradient` / `activation` / `ablation`; coeffs: `(term, coeff)`
    pairs (terms in `TERMS`); schatten_p, lp_p: the p of those terms; unit_norm_A: normalise A's
    columns before every step and project the radial part out of A's gradient; init_type:
    `kaiming_uniform` or `xavier_normal` (see `spdjax.apd.components.init_apd`); init_scale: its scale.
    """

    C: int = 5
    m: int | None = None
    topk: float | None = 1.0
    batch_topk: bool = True
    attribution: str = "gradient"
    coeffs: tuple[tuple[str, float], ...] = (("faithfulness", 1.0), ("topk_recon", 1.0), ("schatten", 1.0))
    schatten_p: float = 1.0
    schatten_eps: float = 0.0
    lp_p: float = 1.0
    unit_norm_A: bool = False
    init_scale: float = 1.0
    init_type: str = "kaiming_uniform"

    def __post_init__(self):
        if isinstance(self.C, bool) or not isinstance(self.C, int) or self.C < 1:
            raise ValueError(f"apd.C must be an int >= 1, got {self.C!r}")
        if self.m is not None and (isinstance(self.m, bool) or not isinstance(self.m, int) or self.m < 1):
            raise ValueError(f"apd.m must be None or an int >= 1, got {self.m!r}")
        for name, c in self.coeffs:
            if name not in TERMS:
                raise ValueError(f"apd.coeffs: unknown term {name!r}; allowed: {list(TERMS)}")
            if isinstance(c, bool) or not isinstance(c, (int, float)) or not (math.isfinite(c) and c >= 0):
                raise ValueError(f"apd.coeffs.{name} must be a finite number >= 0, got {c!r}")
        if self.attribution not in ATTRIBUTIONS:
            raise ValueError(f"apd.attribution: unknown {self.attribution!r}; allowed: {list(ATTRIBUTIONS)}")
        if self.topk is not None:
            if not self.topk > 0:
                raise ValueError(f"apd.topk must be > 0 or None, got {self.topk!r}")
            if not self.batch_topk and float(self.topk) != int(self.topk):
                raise ValueError(f"apd.topk: per-sample top-k (batch_topk=False) needs a whole number, got {self.topk!r}")
        elif any(n in TOPK_TERMS for n, _ in self.coeffs):
            raise ValueError(f"apd.coeffs: {list(TOPK_TERMS)} need apd.topk (got None)")
        if self.init_type not in INIT_TYPES:
            raise ValueError(f"apd.init_type: unknown {self.init_type!r}; allowed: {list(INIT_TYPES)}")
        for f in ("schatten_p", "lp_p", "init_scale"):
            if not getattr(self, f) > 0:
                raise ValueError(f"apd.{f} must be > 0, got {getattr(self, f)!r}")

    @property
    def coeff_dict(self) -> dict[str, float]:
        return dict(self.coeffs)


jax.tree_util.register_dataclass(
    APDConfig, data_fields=[], meta_fields=[f.name for f in dataclasses.fields(APDConfig)]
)


def _pow(x, p):
    """x ** p, as multiplications for integral p."""
    return x ** (int(p) if float(p).is_integer() else float(p))


def topk_recon_loss(pred: Array, out: Array) -> Float[Array, ""]:
    return jnp.mean((pred - out) ** 2)


def act_recon_loss(acts: dict[str, Array], clean: dict[str, Array]) -> Float[Array, ""]:
    """Mean over the given sites of `mean((acts_l - clean_l)^2)` (0 for no sites)."""
    terms = [jnp.mean((acts[n] - clean[n]) ** 2) for n in acts]
    return sum(terms) / len(terms) if terms else jnp.zeros((), jnp.float32)


def schatten_per_component(params: APDParams, p: float, eps: float = 0.0) -> Float[Array, " C"]:
    """`sum_l sum_m (||A_{c,l,:,m}||^2 ||B_{c,l,m,:}||^2 + eps)^(p/2)` per component c."""
    total = 0.0
    for comp in params.components.values():
        sa = jnp.sum(comp.A**2, axis=1)  # (C, m)
        sb = jnp.sum(comp.B**2, axis=2)  # (C, m)
        total = total + jnp.sum(_pow(sa * sb + eps, p / 2), axis=-1)
    return total


def schatten_loss(params: APDParams, mask: Array, n_params: int, p: float, eps: float = 0.0) -> Float[Array, ""]:
    """`sum_b sum_c mask_bc S_c / (N B)`; `mask: (*lead, C)`."""
    s = schatten_per_component(params, p, eps)
    n_pos = math.prod(mask.shape[:-1])
    return jnp.sum(mask.astype(s.dtype) * s) / (n_params * n_pos)


def lp_sparsity_loss(attr: Array, d_out: int, p: float) -> Float[Array, ""]:
    """`mean_b sum_c |attr_c / d_out|^(p/2)`."""
    return jnp.mean(jnp.sum(_pow(jnp.abs(attr / d_out), p / 2), axis=-1))


def downstream_inputs(params: APDParams, target: Target, batch: Any, mask: Array) -> tuple[Array, dict[str, Array]]:
    """Output of the masked pass and the inputs of the sites called after a decomposed site ran."""
    seen: dict[str, Array] = {}
    out = masked_forward(params, target, batch, mask, record=seen)
    names = list(seen)
    return out, {n: seen[n] for n in names[1:] if jnp.issubdtype(seen[n].dtype, jnp.floating)}


def apd_loss_fn(
    params: APDParams,
    target: Target,
    batch: Any,
    key: Array | None = None,
    config: APDConfig = APDConfig(),
    extra_terms: tuple[str, ...] = (),
) -> tuple[Float[Array, ""], dict[str, Array]]:
    """The APD loss `sum_i coeff_i * term_i` over `config.coeffs`, and its metrics.

    Pure, jittable and differentiable in `params` (like `spdjax.loss_fn`); `key` is unused (APD is
    deterministic) and accepted for the same call signature. `extra_terms` are computed for the
    metrics only. Metrics: `loss/<term>`, `loss/total`, `topk/l0` (mean components kept per
    position), `topk/n_used` (components kept anywhere in the batch), `attr/mean`.
    """
    del key
    coeffs = config.coeff_dict
    names = list(coeffs) + [t for t in extra_terms if t not in coeffs]
    for n in names:
        if n not in TERMS:
            raise ValueError(f"unknown APD loss term {n!r}; allowed: {list(TERMS)}")
    if config.topk is None:
        names = [n for n in names if n not in TOPK_TERMS or n in coeffs]
    out, inputs = clean_forward(target, batch)
    metrics: dict[str, Array] = {}
    N = n_target_params(target)
    attr = mask = None
    if any(n in names for n in ("topk_recon", "act_recon", "schatten", "lp_sparsity")):
        attr = attributions(config.attribution, params, target, batch, inputs)
        metrics["attr/mean"] = jnp.mean(jax.lax.stop_gradient(attr))
        if config.topk is not None:
            mask = topk_mask(attr, config.topk, config.batch_topk).astype(out.dtype)
        else:
            mask = jnp.ones(attr.shape, out.dtype)
        metrics["topk/l0"] = jnp.mean(jnp.sum(mask, axis=-1))
        metrics["topk/n_used"] = jnp.sum(jnp.any(mask.reshape(-1, mask.shape[-1]) > 0, axis=0)).astype(jnp.float32)
    values: dict[str, Array] = {}
    if any(n in names for n in TOPK_TERMS):
        pred, acts = downstream_inputs(params, target, batch, mask)
        values["topk_recon"] = topk_recon_loss(pred, out)
        values["act_recon"] = act_recon_loss(acts, {n: inputs[n] for n in acts})
    if "faithfulness" in names:
        values["faithfulness"] = faithfulness_loss(params, target.kernels(), target)
    if "schatten" in names:
        values["schatten"] = schatten_loss(params, mask, N, config.schatten_p, config.schatten_eps)
    if "lp_sparsity" in names:
        values["lp_sparsity"] = lp_sparsity_loss(attr, out.shape[-1], config.lp_p)
    total = jnp.zeros((), out.dtype)
    for n in names:
        metrics[f"loss/{n}"] = values[n]
        if coeffs.get(n, 0.0) != 0.0:
            total = total + coeffs[n] * values[n]
    metrics["loss/total"] = total
    return total, metrics

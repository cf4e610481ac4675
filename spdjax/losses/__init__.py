"""SPD loss terms and `loss_fn`, which composes the terms a `LossConfig` lists.

Layout:
- `registry`: `TermOptions` (every term's options: `coeff` + its own fields), `register_term`, `TERMS`
  (name -> `fn(ctx, opts) -> scalar`), `TERM_OPTIONS` (name -> options class), `LossContext`.
- `forward`: the clean pass, the CI function and the masked forward passes (`remat` = `jax.checkpoint`).
- `terms`: the built-in terms: `RECON_TERMS` (each reconstruction term as (masks, sites) and its PRNG salts),
  their options classes, and the building-block loss functions.
- `config`: `LossConfig` (terms + shared settings; the old flat keywords as an alias) and `loss_config_from`.
- `loss`: `loss_fn` and `ci_l0`.

Divergences compare the masked model's output with the clean target output: `mse` averages over all
elements; `kl` is KL(softmax(target) || softmax(masked)) summed over the last (vocabulary) axis and
averaged over the other axes.
"""

from spdjax.losses.config import FLAT_OPTIONS, LossConfig, loss_config_from  # noqa: I001  (after the terms)
from spdjax.losses.forward import (
    DIVERGENCES,
    CIOutputs,
    clean_forward,
    compute_ci,
    divergence,
    layerwise_forward_losses,
    masked_forward,
)
from spdjax.losses.loss import ci_l0, loss_fn
from spdjax.losses.registry import TERM_OPTIONS, TERMS, LossContext, OptionError, TermOptions, register_term
from spdjax.losses.terms import (
    RECON_TERMS,
    LayerwiseOptions,
    MinimalityOptions,
    PGDOptions,
    PGDSubsetOptions,
    Recon,
    SubsetOptions,
    annealed_p,
    hidden_acts_recon_loss,
    importance_minimality_loss,
    pgd_recon_loss,
    recon_options,
    stochastic_recon_layerwise_loss,
    stochastic_recon_loss,
    stochastic_recon_subset_loss,
)

__all__ = [
    "CIOutputs", "DIVERGENCES", "FLAT_OPTIONS", "LayerwiseOptions", "LossConfig", "LossContext", "MinimalityOptions",
    "OptionError", "PGDOptions", "PGDSubsetOptions", "RECON_TERMS", "Recon", "SubsetOptions", "TERMS",
    "TERM_OPTIONS", "TermOptions", "annealed_p", "ci_l0", "clean_forward", "compute_ci", "divergence",
    "hidden_acts_recon_loss", "importance_minimality_loss", "layerwise_forward_losses", "loss_config_from",
    "loss_fn", "masked_forward", "pgd_recon_loss", "recon_options", "register_term", "stochastic_recon_layerwise_loss",
    "stochastic_recon_loss", "stochastic_recon_subset_loss",
]

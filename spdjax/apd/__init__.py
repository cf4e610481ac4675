"""Attribution-based Parameter Decomposition (APD, Braun et al. 2025), SPD's predecessor, on spdjax's
target adapters, data, metrics and runner. Select it in a run config with `method = "apd"`.

Modules: `components` (A, B per site, the masked factored map, faithfulness), `forward` (masked
forwards via site handlers), `attributions` (gradient / activation / ablation), `topk` (batch and
per-sample top-k), `losses` (every term, `APDConfig`, `apd_loss_fn`), `config` (the `apd` config
section), `analysis`, `export`, and `method` (APD as a `spdjax.method.Method`: unit-norm A, optimiser
checks, export, analysis).
"""

from spdjax.apd.components import APDComponents, APDParams, init_apd, masked_site_output
from spdjax.apd.forward import masked_forward
from spdjax.apd.losses import APDConfig, apd_loss_fn
from spdjax.apd.topk import batch_topk_mask, sample_topk_mask, topk_mask

__all__ = [
    "APDComponents",
    "APDConfig",
    "APDParams",
    "apd_loss_fn",
    "batch_topk_mask",
    "init_apd",
    "masked_forward",
    "masked_site_output",
    "sample_topk_mask",
    "topk_mask",
]

"""TMS 40-10 + ID: the SPD recipe of toy_models.md (the reference's main recipe), with the
hidden identity inserted before `linear2` and decomposed too.

C = 200 per site (identity included), `linear2` tied to `linear1`; delta component, 200-step faithfulness warm-up, stochastic
+ layerwise reconstruction, importance minimality 1e-4 with p = 2, Adam 1e-3 cosine, 10k steps.

Arguments (`--config=configs/tms_40-10_id.py:paper,smoke`):
  paper      the paper's Table 1 recipe: no delta component, no warm-up, faithfulness 1 in the loss, 40k steps
  reference  a later PyTorch-reference recipe: CI `shared_mlp` with 200 hidden, PGD-recon-subset 1 as the
             only reconstruction term (random init, 2 steps of size 0.5, masks per example), minimality
             3e-5 (p = 2), delta component and warm-up, 20k steps
  smoke      a seconds-long run on CPU (accepts a target that drops features)
"""

import ml_collections
from ml_collections.config_dict import placeholder

from spdjax.config import parse_arg


def get_config(arg=None):
    a = parse_arg(arg, "tms_40-10_id", flags=("smoke",), recipe=("main", "paper", "reference"))
    C = 200
    cfg = ml_collections.ConfigDict()
    cfg.experiment = "tms"
    cfg.method = "spd"
    cfg.seed = 0
    cfg.target = dict(
        n_features=40, n_hidden=10, steps=10_000, batch_size=8192, lr=5e-3, weight_decay=0.01, feature_prob=0.05,
        seed=0, bias_init_zero=True, require_all_features=True, max_seed_tries=20, probe_value=0.75,
        # every feature of a trained 40-10 target answers 0.75 e_i with ~0.59-0.64 (interference
        # filtering), so the 5-2 tolerance 0.1 would reject every seed; 0.2 still flags dropped features
        probe_tol=0.2, weights_path="",
    )
    cfg.sites = (("linear1", C), ("linear2", C))
    cfg.tied = (("linear2", "linear1"),)
    cfg.identity = (("linear2", C),)
    cfg.ci = dict(type="mlp", hidden=(16,))
    cfg.loss = dict(
        terms=dict(
            stochastic_recon=dict(coeff=1.0),
            stochastic_recon_layerwise=dict(coeff=1.0, unroll=placeholder(int)),
            importance_minimality=dict(
                coeff=1e-4, pnorm=2.0, p_anneal_start_frac=1.0, p_anneal_final_p=placeholder(float),
                p_anneal_end_frac=1.0, beta=0.0,
            ),
        ),
        n_mask_samples=1, mask_type="continuous", use_delta_component=True, sigmoid="leaky_hard",
        output_loss="mse", ci_l0_threshold=0.1, remat=False,
    )
    cfg.optim = dict(
        steps=10_000, lr=1e-3, schedule="cosine", warmup_frac=0.0, final_lr_frac=0.0,
        clip_components=placeholder(float), clip_ci=placeholder(float),
        faithfulness_warmup_steps=200, faithfulness_warmup_lr=0.01, faithfulness_warmup_weight_decay=0.1,
    )
    cfg.batch_size = cfg.eval_batch_size = 4096
    cfg.log_every, cfg.checkpoint_every, cfg.keep_checkpoints, cfg.eval_every, cfg.figures_every = 100, 1000, 3, 1000, 0
    cfg.mesh = dict(data=0, model=1)  # data=0: every device (spdjax.sharding.MeshConfig)
    cfg.precision = dict(param_dtype="float32", compute_dtype="float32")

    if a.recipe == "paper":
        cfg.loss.terms = dict(faithfulness=dict(coeff=1.0), **cfg.loss.terms.to_dict())
        cfg.loss.use_delta_component = False
        cfg.optim.steps = 40_000
        cfg.optim.faithfulness_warmup_steps = 0
    if a.recipe == "reference":
        cfg.ci = dict(type="shared_mlp", hidden=(200,))
        cfg.loss.terms = dict(
            pgd_recon_subset=dict(
                coeff=1.0, routing="uniform_k", subset_p=0.5, init="random", n_steps=2, step_size=0.5,
                mask_scope="per_example",
            ),
            importance_minimality=cfg.loss.terms.importance_minimality.to_dict() | dict(coeff=3e-5),
        )
        cfg.optim.steps = 20_000
    if a.smoke:
        cfg.target.update(steps=300, batch_size=256, require_all_features=False)
        cfg.optim.steps = 30
        cfg.optim.faithfulness_warmup_steps = min(cfg.optim.faithfulness_warmup_steps, 10)
        cfg.batch_size = cfg.eval_batch_size = 256
        cfg.log_every = cfg.checkpoint_every = cfg.eval_every = 10
    return cfg

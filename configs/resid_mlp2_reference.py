"""ResidMLP 2 layers with the PyTorch reference's current recipe (the spec's recipe is
configs/resid_mlp.py:2): CI `shared_mlp` with 256 hidden, stochastic-recon-subset 2 + PGD-recon-subset 2
(uniform-k routing; one PGD step of size 1 from random sources shared across the batch), importance
minimality 1e-4 (p = 2), delta component and 200-step faithfulness warm-up, Adam 3e-4 constant, 25k
steps, batch 2048. `:smoke` shrinks it to run in seconds on CPU. `loss.low_rank_outputs`: the masked `mlp_out`
outputs stay factored through the residual stream (`spdjax.lowrank`; the same values with fewer FLOPs).
"""

import ml_collections
from ml_collections.config_dict import placeholder

from spdjax.config import parse_arg


def get_config(arg=None):
    a = parse_arg(arg, "resid_mlp2_reference", flags=("smoke",))
    C = 400
    cfg = ml_collections.ConfigDict()
    cfg.experiment = "resid_mlp"
    cfg.method = "spd"
    cfg.seed = 0
    cfg.target = dict(
        n_features=100, d_mlp=25, n_layers=2, d_embed=1000, steps=1_000, batch_size=2048, lr=3e-3,
        weight_decay=0.01, feature_prob=0.01, seed=0, weights_path="",
    )
    cfg.sites = (("layers.*.mlp_in", C), ("layers.*.mlp_out", C))
    cfg.tied = ()
    cfg.identity = ()
    cfg.ci = dict(type="shared_mlp", hidden=(256,))
    cfg.loss = dict(
        terms=dict(
            stochastic_recon_subset=dict(coeff=2.0, routing="uniform_k", subset_p=0.5),
            pgd_recon_subset=dict(
                coeff=2.0, routing="uniform_k", subset_p=0.5, init="random", n_steps=1, step_size=1.0,
                mask_scope="shared_across_batch",
            ),
            importance_minimality=dict(
                coeff=1e-4, pnorm=2.0, p_anneal_start_frac=1.0, p_anneal_final_p=placeholder(float),
                p_anneal_end_frac=1.0, beta=0.0,
            ),
        ),
        n_mask_samples=1, mask_type="continuous", use_delta_component=True, sigmoid="leaky_hard",
        output_loss="mse", ci_l0_threshold=0.1, remat=False, low_rank_outputs=True,
    )
    cfg.optim = dict(
        steps=25_000, lr=3e-4, schedule="constant", warmup_frac=0.0, final_lr_frac=0.0,
        clip_components=placeholder(float), clip_ci=placeholder(float),
        faithfulness_warmup_steps=200, faithfulness_warmup_lr=0.01, faithfulness_warmup_weight_decay=0.1,
    )
    cfg.batch_size = cfg.eval_batch_size = 2048
    cfg.log_every, cfg.checkpoint_every, cfg.keep_checkpoints, cfg.eval_every, cfg.figures_every = 100, 1000, 3, 1000, 0
    cfg.mesh = dict(data=0, model=1)  # data=0: every device (spdjax.sharding.MeshConfig)
    cfg.precision = dict(param_dtype="float32", compute_dtype="float32")

    if a.smoke:
        cfg.target.update(steps=100, batch_size=256)
        cfg.optim.steps = 10
        cfg.optim.faithfulness_warmup_steps = 10
        cfg.batch_size = cfg.eval_batch_size = 256
        cfg.log_every = cfg.checkpoint_every = cfg.eval_every = 5
    return cfg

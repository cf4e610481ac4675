"""The induction-head toy (experiments/ih; transformers.md): decompose q, k, v, o of both layers.

A starting point, not yet a recipe shown to succeed here (issue 25): the reference's last values with
C = 100 per site, CI `vector_mlp` [128], faithfulness 100, CI-masked recon 1, stochastic recon 1,
layerwise 1, importance minimality 1e-2 with p = 0.1, KL on the last position, batch 16, lr 1e-3
constant, 200-step faithfulness warm-up. The target trains to 0.99 last-token accuracy (up to 100k
steps) and is cached. `:smoke`: a few steps on a briefly trained target (no success expected).
"""

import ml_collections

from spdjax.config import parse_arg


def get_config(arg=None):
    a = parse_arg(arg, "ih", flags=("smoke",))
    C = 100
    cfg = ml_collections.ConfigDict()
    cfg.experiment = "ih"
    cfg.method = "spd"
    cfg.seed = 0
    cfg.target = dict(
        d_model=16, n_layers=2, lr=1e-3, weight_decay=0.01, warmup_steps=1000, batch_size=1024, max_steps=100_000,
        eval_every=500, eval_size=8192, target_accuracy=0.99, seed=0,
    )
    cfg.sites = (("blocks.*.attn.*", C),)
    cfg.ci = dict(type="vector_mlp", hidden=(128,))
    cfg.loss = dict(
        terms=dict(
            faithfulness=dict(coeff=100.0),
            ci_masked_recon=dict(coeff=1.0),
            stochastic_recon=dict(coeff=1.0),
            stochastic_recon_layerwise=dict(coeff=1.0),
            importance_minimality=dict(coeff=1e-2, pnorm=0.1),
        ),
        use_delta_component=False, output_loss="kl", sigmoid="leaky_hard", ci_l0_threshold=0.1,
    )
    cfg.optim = dict(steps=100_000, lr=1e-3, schedule="constant", faithfulness_warmup_steps=200)
    cfg.batch_size = cfg.eval_batch_size = 16
    cfg.log_every, cfg.checkpoint_every, cfg.eval_every = 100, 1000, 1000
    cfg.mesh = dict(data=0, model=1)
    if a.smoke:
        cfg.target.update(max_steps=20, eval_every=10, eval_size=256, batch_size=64, warmup_steps=5)
        cfg.sites = (("blocks.*.attn.*", 8),)
        cfg.ci = dict(type="vector_mlp", hidden=(8,))
        cfg.optim.steps = 6
        cfg.optim.faithfulness_warmup_steps = 5
        cfg.batch_size = cfg.eval_batch_size = 8
        cfg.log_every = cfg.checkpoint_every = cfg.eval_every = 3
    return cfg

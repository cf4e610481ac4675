"""A linear map applied to sparse inputs read from a host-side Grain dataset (experiments/sparse_linear):
SPD with C = 16 on a 8 -> 8 map, stochastic + layerwise reconstruction, minimality 3e-3 (p = 1),
Adam 3e-3 cosine, 4000 steps, batch 256: MMCS 0.9999 with 8 alive subcomponents, one per kernel row,
in 40 s on a 2-core CPU (docs/results.md). `:smoke`: seconds on CPU.
"""

import ml_collections

from spdjax.config import parse_arg


def get_config(arg=None):
    a = parse_arg(arg, "sparse_linear", flags=("smoke",))
    cfg = ml_collections.ConfigDict()
    cfg.experiment = "sparse_linear"
    cfg.method = "spd"
    cfg.seed = 0
    cfg.target = dict(n_features=8, d_out=8, n_examples=8192, feature_prob=0.1, seed=0)
    cfg.sites = (("map", 16),)
    cfg.ci = dict(type="mlp", hidden=(8,))
    cfg.loss = dict(
        terms=dict(
            stochastic_recon=dict(coeff=1.0),
            stochastic_recon_layerwise=dict(coeff=1.0),
            importance_minimality=dict(coeff=3e-3, pnorm=1.0),
        ),
        use_delta_component=True,
    )
    cfg.optim = dict(steps=4000, lr=3e-3, schedule="cosine", faithfulness_warmup_steps=100)
    cfg.batch_size = cfg.eval_batch_size = 256
    cfg.log_every, cfg.checkpoint_every, cfg.eval_every = 100, 500, 500
    if a.smoke:
        cfg.optim.steps = 12
        cfg.optim.faithfulness_warmup_steps = 5
        cfg.batch_size = cfg.eval_batch_size = 32
        cfg.log_every = cfg.checkpoint_every = cfg.eval_every = 4
    return cfg

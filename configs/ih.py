"""The induction-head toy (experiments/ih; transformers.md): decompose q, k, v, o of both layers.

Main recipe (found on this 2-core CPU, docs/results.md "Induction-head toy"): C = 32 per site, CI
`shared_mlp` [64] (per token), faithfulness 100, CI-masked recon 1, stochastic recon 1, layerwise 1,
importance minimality 0.1 with p = 0.1, KL on the last position, batch 64, lr 1e-3 constant, 200-step
faithfulness warm-up, 10k steps; the analysis uses 2048 held-out sequences. The target trains to 0.99
last-token accuracy (up to 100k steps; ~1500 here) and is cached.

`:reference`: the reference's last values (C = 100, CI `vector_mlp` [128], minimality 1e-2, batch 16,
100k steps; it ran 1M steps on a GPU): ~25 h on this CPU, for accelerators.
`:smoke`: a few steps on a briefly trained target (no success expected).
"""

import ml_collections

from spdjax.config import parse_arg


def get_config(arg=None):
    a = parse_arg(arg, "ih", flags=("smoke", "reference"))
    cfg = ml_collections.ConfigDict()
    cfg.experiment = "ih"
    cfg.method = "spd"
    cfg.seed = 0
    cfg.target = dict(
        d_model=16, n_layers=2, lr=1e-3, weight_decay=0.01, warmup_steps=1000, batch_size=1024, max_steps=100_000,
        eval_every=500, eval_size=8192, target_accuracy=0.99, seed=0,
    )
    cfg.sites = (("blocks.*.attn.*", 32),)
    cfg.ci = dict(type="shared_mlp", hidden=(64,))
    cfg.loss = dict(
        terms=dict(
            faithfulness=dict(coeff=100.0),
            ci_masked_recon=dict(coeff=1.0),
            stochastic_recon=dict(coeff=1.0),
            stochastic_recon_layerwise=dict(coeff=1.0),
            importance_minimality=dict(coeff=0.1, pnorm=0.1),
        ),
        use_delta_component=False, output_loss="kl", sigmoid="leaky_hard", ci_l0_threshold=0.1,
    )
    cfg.optim = dict(steps=10_000, lr=1e-3, schedule="constant", faithfulness_warmup_steps=200)
    cfg.batch_size, cfg.eval_batch_size = 64, 2048  # eval: the held-out sequences the analysis uses
    cfg.log_every, cfg.checkpoint_every, cfg.eval_every = 500, 2500, 2500
    cfg.mesh = dict(data=0, model=1)
    if a.reference:
        cfg.sites = (("blocks.*.attn.*", 100),)
        cfg.ci = dict(type="vector_mlp", hidden=(128,))
        cfg.loss.terms.importance_minimality.coeff = 1e-2
        cfg.optim.steps = 100_000
        cfg.batch_size = 16
        cfg.log_every, cfg.checkpoint_every, cfg.eval_every = 100, 1000, 5000
    if a.smoke:
        cfg.target.update(max_steps=20, eval_every=10, eval_size=256, batch_size=64, warmup_steps=5)
        cfg.sites = (("blocks.*.attn.*", 8),)
        cfg.ci = dict(type="shared_mlp", hidden=(8,))
        cfg.optim.steps = 6
        cfg.optim.faithfulness_warmup_steps = 5
        cfg.batch_size = cfg.eval_batch_size = 8
        cfg.log_every = cfg.checkpoint_every = cfg.eval_every = 3
    return cfg

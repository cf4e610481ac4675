"""ResidMLP with 1, 2 or 3 layers (y = x + ReLU(x), compressed): the SPD recipe of toy_models.md.

Every layer's `mlp_in` and `mlp_out` are sites with C subcomponents each; Adam with a constant LR,
batch 2048, one mask sample, stochastic + layerwise reconstruction, importance minimality with p = 2,
delta component and a 200-step faithfulness warm-up. `loss.low_rank_outputs`: the masked `mlp_out` outputs
stay factored through the residual stream (`spdjax.lowrank`; the same values with fewer FLOPs).

| layers | features | d_mlp | C | CI hidden | lr | minimality | steps | target steps |
|---|---|---|---|---|---|---|---|---|
| 1 | 100 | 50 | 100 | 16 | 2e-3 | 1e-5 | 20k | 1k |
| 2 | 100 | 25 | 400 | 16 | 1e-3 | 1e-5 | 50k | 1k |
| 3 | 102 | 17 | 500 | 128 | 1e-3 | 1e-5 | 50k | 10k |

Arguments (`--config=configs/resid_mlp.py:2,paper,smoke`):
  1, 2, 3  the layer count (default 1)
  paper    the SPD paper's appendix recipe: faithfulness 1 in the loss instead of the delta component (no
           warm-up), 30k / 50k / 200k steps, minimality 0.5e-5 with 3 layers
  smoke    a seconds-long run on CPU (no success expected)
The PyTorch reference's current 2-layer recipe is configs/resid_mlp2_reference.py.
"""

import ml_collections
from ml_collections.config_dict import placeholder

from spdjax.config import parse_arg

# layers -> (n_features, d_mlp, C, CI hidden, lr, minimality, steps, target steps): the table above
RECIPES = {
    1: (100, 50, 100, (16,), 2e-3, 1e-5, 20_000, 1_000),
    2: (100, 25, 400, (16,), 1e-3, 1e-5, 50_000, 1_000),
    3: (102, 17, 500, (128,), 1e-3, 1e-5, 50_000, 10_000),
}
PAPER = {1: dict(steps=30_000), 2: dict(steps=50_000), 3: dict(steps=200_000, minimality=0.5e-5)}


def get_config(arg=None):
    a = parse_arg(arg, "resid_mlp", flags=("paper", "smoke"), layers=("1", "2", "3"))
    n_layers = int(a.layers)
    n_features, d_mlp, C, hidden, lr, minimality, steps, target_steps = RECIPES[n_layers]
    cfg = ml_collections.ConfigDict()
    cfg.experiment = "resid_mlp"
    cfg.method = "spd"
    cfg.seed = 0
    cfg.target = dict(
        n_features=n_features, d_mlp=d_mlp, n_layers=n_layers, d_embed=1000, steps=target_steps, batch_size=2048,
        lr=3e-3, weight_decay=0.01, feature_prob=0.01, seed=0, weights_path="",
    )
    cfg.sites = (("layers.*.mlp_in", C), ("layers.*.mlp_out", C))
    cfg.tied = ()
    cfg.identity = ()
    cfg.ci = dict(type="mlp", hidden=hidden)
    cfg.loss = dict(
        terms=dict(
            stochastic_recon=dict(coeff=1.0),
            stochastic_recon_layerwise=dict(coeff=1.0, unroll=placeholder(int)),
            importance_minimality=dict(
                coeff=minimality, pnorm=2.0, p_anneal_start_frac=1.0, p_anneal_final_p=placeholder(float),
                p_anneal_end_frac=1.0, beta=0.0,
            ),
        ),
        n_mask_samples=1, mask_type="continuous", use_delta_component=True, sigmoid="leaky_hard",
        output_loss="mse", ci_l0_threshold=0.1, remat=False, low_rank_outputs=True,
    )
    cfg.optim = dict(
        steps=steps, lr=lr, schedule="constant", warmup_frac=0.0, final_lr_frac=0.0,
        clip_components=placeholder(float), clip_ci=placeholder(float),
        faithfulness_warmup_steps=200, faithfulness_warmup_lr=0.01, faithfulness_warmup_weight_decay=0.1,
    )
    cfg.batch_size = cfg.eval_batch_size = 2048
    cfg.log_every, cfg.checkpoint_every, cfg.keep_checkpoints, cfg.eval_every, cfg.figures_every = 100, 1000, 3, 1000, 0
    cfg.mesh = dict(data=0, model=1)  # data=0: every device (spdjax.sharding.MeshConfig)
    cfg.precision = dict(param_dtype="float32", compute_dtype="float32")

    if a.paper:
        paper = PAPER[n_layers]
        cfg.loss.terms = dict(faithfulness=dict(coeff=1.0), **cfg.loss.terms.to_dict())
        cfg.loss.terms.importance_minimality.coeff = paper.get("minimality", minimality)
        cfg.loss.use_delta_component = False
        cfg.optim.steps = paper["steps"]
        cfg.optim.faithfulness_warmup_steps = 0
    if a.smoke:
        cfg.target.update(steps=100, batch_size=256)
        cfg.optim.steps = 10
        cfg.optim.faithfulness_warmup_steps = min(cfg.optim.faithfulness_warmup_steps, 10)
        cfg.batch_size = cfg.eval_batch_size = 256
        cfg.log_every = cfg.checkpoint_every = cfg.eval_every = 5
    return cfg
